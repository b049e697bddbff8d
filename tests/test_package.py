"""The package surface: lazy notebook-facing exports, the version, one-way imports."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import flatlora


def _imported_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_import_flatlora_is_light_and_names_load_on_first_use():
    modules = _imported_after("import flatlora, flatlora.log_keys")
    assert not {"torch", "transformers", "peft"} & modules
    assert {"torch", "flatlora.trainer"} <= _imported_after("import flatlora; flatlora.FlatLoraTrainer")


def test_every_exported_name_resolves_and_the_version_is_the_installed_one():
    for name in flatlora.__all__:
        assert getattr(flatlora, name) is not None, name
    assert {"FlatLoraTrainer", "load_run", "list_runs", "make_method", "METHODS"} <= set(flatlora.__all__)
    assert flatlora.load_run is __import__("flatlora.runs", fromlist=["load_run"]).load_run
    assert flatlora.load_adapter is __import__("flatlora.adapters", fromlist=["load_adapter"]).load_adapter
    assert flatlora.tiny_model is __import__("flatlora.testing", fromlist=["tiny_model"]).tiny_model
    assert flatlora.LoraOptions is __import__("flatlora.models", fromlist=["LoraOptions"]).LoraOptions
    assert flatlora.__version__ == metadata.version("flatlora")
    assert "FlatLoraTrainer" in dir(flatlora)


def test_flatlora_never_imports_analysis_or_app():
    modules = _imported_after(
        "import flatlora.cli, flatlora.experiment, flatlora.trainer, flatlora.runs, flatlora.data, flatlora.models, "
        "flatlora.adapters, flatlora.testing"
    )
    assert not {m for m in modules if m.split(".")[0] in ("flatlora_analysis", "flatlora_app")}


def test_the_export_table_and_all_agree():
    assert set(flatlora.__all__) == {"FlatLoraError", "__version__", *flatlora._WHERE}


def test_the_measuring_names_are_the_functions_whatever_was_imported_first():
    """``sharpness`` is a function and a module name: the package must export the function."""
    code = (
        "import flatlora_analysis.sharpness, flatlora_analysis.report.measure; "
        "from flatlora_analysis import sharpness, plots; import flatlora_analysis as a; "
        "assert callable(sharpness) and callable(a.sharpness) and hasattr(plots, 'landscape_1d_figure')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
