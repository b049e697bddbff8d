"""The layers, read from the sources: core -> measuring -> showing, one way; no import cycle; installed names."""

from __future__ import annotations

import ast
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = {"flatlora": ROOT / "flatlora", "flatlora_analysis": ROOT / "analysis", "flatlora_app": ROOT / "app"}
FRONT = ("cli", "demo")  # the command-line front of flatlora/: cli*.py, demo*.py


def module_name(package: str, path: Path) -> str:
    rel = path.relative_to(PACKAGES[package]).with_suffix("")
    parts = [package, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(pkg, p): p for pkg, folder in PACKAGES.items() for p in sorted(folder.rglob("*.py"))}


def imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, at module level or inside a function (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}  # a submodule imported by name
    return out


def test_the_training_core_never_imports_the_measuring_or_showing_package():
    offenders = []
    for name, path in modules().items():
        if not name.startswith("flatlora.") and name != "flatlora":
            continue
        if path.parent == PACKAGES["flatlora"] and path.stem.startswith(FRONT):
            continue
        bad = {m for m in imports(path, name) if m.split(".")[0] in ("flatlora_analysis", "flatlora_app")}
        offenders += [f"{path.relative_to(ROOT)} imports {m}" for m in sorted(bad)]
    assert not offenders, offenders


def test_the_measuring_package_never_imports_the_showing_package():
    offenders = [
        f"{path.relative_to(ROOT)} imports {m}"
        for name, path in modules().items()
        if name.startswith("flatlora_analysis")
        for m in sorted(imports(path, name))
        if m.split(".")[0] == "flatlora_app"
    ]
    assert not offenders, offenders


def test_measuring_and_showing_never_import_the_command_line_front():
    """The demo's presets are report presets, the commands live beside their packages: nothing reaches back."""
    offenders = [
        f"{path.relative_to(ROOT)} imports {m}"
        for name, path in modules().items()
        if name.startswith(("flatlora_analysis", "flatlora_app"))
        for m in sorted(imports(path, name))
        if m.startswith(("flatlora.cli", "flatlora.demo"))
    ]
    assert not offenders, offenders


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (module level or inside a function), over all three packages."""
    known = modules()
    graph = {name: {m for m in imports(path, name) if m in known and m != name} for name, path in known.items()}
    # a package's __init__ re-exports its submodules: importing a submodule runs it, so it is no edge back
    return {name: {m for m in edges if not name.startswith(m + ".")} for name, edges in graph.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each import cycle found by a depth-first walk, as ``a -> b -> a``."""
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle_anywhere():
    """flatlora, flatlora_analysis and flatlora_app: no module reaches itself, function-level imports included."""
    cycles = find_cycles(import_graph())
    assert not cycles, cycles


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    """The check itself fails where it should: a function-level import that closes a circle in flatlora/."""
    fake = tmp_path / "flatlora"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("from flatlora.b import thing\n")
    (fake / "b.py").write_text("thing = 1\n\n\ndef later():\n    from flatlora import a\n\n    return a\n")
    monkeypatch.setitem(PACKAGES, "flatlora", fake)
    assert find_cycles(import_graph()) == ["flatlora.a -> flatlora.b -> flatlora.a"]


def test_no_module_is_much_longer_than_one_job():
    """Modules near 300 lines: none of the three packages holds one over 350."""
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 350}
    assert not long, long


def test_the_installed_distribution_adds_no_generic_top_level_name():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    declared = {p.split(".")[0] for p in config["packages"]}
    assert declared == {"flatlora", "flatlora_analysis", "flatlora_app"}
    assert config["package-dir"] == {"flatlora_analysis": "analysis", "flatlora_app": "app"}  # the layout stays
    installed = [d for d in metadata.distributions(name="flatlora") if Path(d.locate_file("")).resolve() != ROOT]
    assert installed, "flatlora is not installed (pip install -e .)"
    for dist in installed:  # the environment's own record, not a stale egg-info of the checkout
        assert set(dist.read_text("top_level.txt").split()) == declared
