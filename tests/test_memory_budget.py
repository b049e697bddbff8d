"""Memory-bounded measuring: the budget, the graph estimate, and micro-batches that change nothing but memory."""

from __future__ import annotations

import gc

import pytest
import torch

from flatlora.errors import FlatLoraError
from flatlora_analysis import ProbeSet
from flatlora_analysis.guard import measuring
from flatlora_analysis.hessian.operator import HessianOperator
from flatlora_analysis.memory import MemoryBudget, max_memory, parse_memory, resolve_budget
from flatlora_analysis.micro_batch import measure_graph, plan_graphs
from flatlora_analysis.objective import ModelObjective
from flatlora_analysis.spaces import build_space

pytest.importorskip("gguf", reason="causal-LM probe tests use the default LLM's tokenizer (pip install gguf)")


@pytest.mark.parametrize(
    ("text", "size"),
    [("6GB", 6 * 10**9), ("512MiB", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("2e9", 2 * 10**9), ("4g", 4 * 2**30)],
)
def test_sizes_parse_as_accelerate_writes_them(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["six GB", "6 parsecs", "-1GB", "0"])
def test_a_size_that_is_not_one_is_refused_in_one_line(text):
    with pytest.raises(FlatLoraError, match="--max-memory") as err:
        parse_memory(text)
    assert "\n" not in str(err.value)


def test_auto_is_a_share_of_the_free_memory_and_says_so():
    budget = resolve_budget("auto", "cpu")
    assert budget.bytes > 0 and budget.source.startswith("auto: 10% of") and budget.source.endswith("free on cpu")
    assert parse_memory("auto") is None and resolve_budget("3GB").bytes == 3 * 10**9


def test_a_containers_page_cache_is_room_not_usage(tmp_path):
    """A container whose page cache filled its cgroup up to the limit (CI after a pip install) still has
    room: the inactive file pages are reclaimable (v2 and v1); no limit is no bound."""
    from flatlora_analysis.memory import _cgroup_room

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{24 * 2**30}\n")
    (v2 / "memory.current").write_text(f"{24 * 2**30 - 2**20}\n")  # 1 MiB short of the limit
    (v2 / "memory.stat").write_text(f"anon {3 * 2**30}\nfile {21 * 2**30}\ninactive_file {20 * 2**30}\n")
    assert _cgroup_room(v2) == 20 * 2**30 + 2**20
    (v2 / "memory.stat").write_text("anon 0\n")  # no inactive_file counter: the usage as it is
    assert _cgroup_room(v2) == 2**20
    (v2 / "memory.max").write_text("max\n")
    assert _cgroup_room(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{8 * 2**30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{8 * 2**30}\n")
    (v1 / "memory.stat").write_text(f"cache {6 * 2**30}\ntotal_inactive_file {5 * 2**30}\n")
    assert _cgroup_room(v1.parent) == 5 * 2**30
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert _cgroup_room(v1.parent) is None
    assert _cgroup_room(tmp_path / "none") is None


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from test_causal_probe import trained_like

    return trained_like(tiny_llama_dir)


@pytest.fixture(scope="module")
def probe(model, pairs_csv):
    _, tok = model
    return ProbeSet.from_data(pairs_csv, tok, task="causal-lm", split="train", n=7, batch_size=7)


def _operator(m, probe, budget, **kw):
    space = build_space(m, "lora")
    objective = ModelObjective(m, probe, space, torch.device("cpu"), budget=budget)
    return objective, HessianOperator(objective, "autograd", **kw)


def test_micro_batches_give_the_whole_probe_values_in_float64(model, probe):
    """Loss, gradient, H v and H V of a one-row stream equal the kept one-batch graph's to round-off."""
    m, _ = model
    big, tiny = MemoryBudget(2**40, "test"), MemoryBudget(1, "test")
    with measuring(m, "cpu"):
        obj_kept, kept = _operator(m, probe, big)
        obj_streamed, streamed = _operator(m, probe, tiny)
        assert kept.plan.mode == "kept" and kept.retain_graph
        assert streamed.plan.mode == "micro-batches" and streamed.plan.rows == 1 and not streamed.retain_graph
        assert streamed.plan.over_budget and len(streamed.batches) == probe.n_examples >= 5
        v = torch.randn(kept.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        V = torch.randn(kept.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(streamed.matvec(v), kept.matvec(v), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(streamed.matmat(V), kept.matmat(V), rtol=1e-10, atol=1e-12)
        builds = streamed.graph_builds
        streamed.matmat(V)
        assert streamed.graph_builds - builds == probe.n_examples  # one graph per micro-batch for all three columns
        loss_k, grad_k = obj_kept.loss_and_grad()
        loss_s, grad_s = obj_streamed.loss_and_grad()
        assert obj_streamed.plan.mode == "micro-batches" and obj_kept.plan.mode == "batches"
        assert loss_s == pytest.approx(loss_k, rel=1e-12)
        torch.testing.assert_close(grad_s, grad_k, rtol=1e-10, atol=1e-12)
        kept.close()
        streamed.close()


def test_the_estimate_grows_with_rows_and_the_plan_fits_the_budget(model, probe):
    m, _ = model
    with measuring(m, "cpu"):
        objective = ModelObjective(m, probe, build_space(m, "lora"), torch.device("cpu"))
        hvp = measure_graph(objective, create_graph=True)
        grad = measure_graph(objective, create_graph=False)
        assert hvp.per_row > grad.per_row > 0  # a product's graph holds the backward's saved tensors too
        budget = MemoryBudget(hvp.bytes(3), "test")
        plan = plan_graphs(objective, budget, hessian=True)
        assert plan.mode == "micro-batches" and plan.rows == 3 and plan.graph_bytes <= budget.bytes
        assert plan.kept_bytes == hvp.bytes(probe.n_examples) > budget.bytes
        assert "micro-batches of 3 row(s)" in plan.describe() and "budget" in plan.describe()


def test_estimating_a_graph_leaves_none_of_its_tensors_alive(model, probe):
    """The estimate's saved tensors go with it: a saved output held as itself would keep its own grad_fn
    alive in a cycle, a quarter GiB per plan on SmolLM2-135M (every measure makes a plan)."""
    m, _ = model

    def tensors_alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    with measuring(m, "cpu"):
        objective = ModelObjective(m, probe, build_space(m, "lora"), torch.device("cpu"))
        measure_graph(objective, create_graph=True)  # lazily built module state, once
        before = tensors_alive()
        for create_graph in (False, True, False):
            measure_graph(objective, create_graph=create_graph)
        assert tensors_alive() == before


def test_measures_record_the_plan_and_the_context_sets_the_budget(model, probe):
    from flatlora_analysis import sharpness, top_eigenvalues

    m, _ = model
    with max_memory(1, "cpu"):
        eig = top_eigenvalues(m, probe, k=1, tol=1e-6)
        sam = sharpness(m, probe, rho=0.05, kind="sam")
    full = top_eigenvalues(m, probe, k=1, tol=1e-6)
    assert eig.meta["memory"]["mode"] == "micro-batches" and eig.meta["memory"]["budget_source"] == "--max-memory 1"
    assert full.meta["memory"]["mode"] == "kept"
    assert eig.lambda_max == pytest.approx(full.lambda_max, rel=1e-8)
    assert sam.meta["memory"]["micro_batch_rows"] == 1
    assert sam.meta["memory"]["mode"] == "micro-batches"


def test_the_timed_gradient_of_a_report_is_the_clean_gradient_its_measures_take(model, probe):
    from flatlora_analysis import sharpness
    from flatlora_analysis.report.cost import gradient_seconds

    m, _ = model
    lora_b = next(p for n, p in m.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.mul_(1.0)  # a new version: no clean value of an earlier test is served
    assert gradient_seconds(m, probe) > 0
    shared = sharpness(m, probe, rho=0.05, kind="flat-lora")
    assert shared.meta["backward_passes"] == 0  # the clean gradient came from the timing
    with torch.no_grad():
        lora_b.mul_(1.0)
    alone = sharpness(m, probe, rho=0.05, kind="flat-lora")
    assert alone.meta["backward_passes"] > 0 and alone.value == shared.value


def test_the_clean_gradient_is_shared_and_a_changed_weight_is_not_served_stale(model, probe):
    """sam and worst start from the same L(w) and gradient: the second measure takes them from the first."""
    from flatlora_analysis import sharpness

    m, _ = model
    lora_b = next(p for n, p in m.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.mul_(1.0)  # in place: a new version of the weights, so nothing shared is served
    alone = sharpness(m, probe, rho=0.05, kind="worst", steps=2, space="lora")
    with torch.no_grad():
        lora_b.mul_(1.0)
    sam = sharpness(m, probe, rho=0.05, kind="sam", space="lora")
    worst = sharpness(m, probe, rho=0.05, kind="worst", steps=2, space="lora")
    assert sam.clean_loss == worst.clean_loss == alone.clean_loss and worst.value == alone.value  # bit-exact
    assert worst.meta["backward_passes"] == alone.meta["backward_passes"] - 1  # the clean gradient was sam's
    with torch.no_grad():
        lora_b.mul_(1.5)  # changed in place: the shared values are stale
    try:
        again = sharpness(m, probe, rho=0.05, kind="sam", space="lora")
        assert again.meta["backward_passes"] == 1 and again.clean_loss != sam.clean_loss
    finally:
        with torch.no_grad():
            lora_b.div_(1.5)


def test_the_dashboard_takes_the_budget_from_its_command_line(monkeypatch, tmp_path):
    pytest.importorskip("streamlit")
    from flatlora import cli
    from flatlora_app.cli import app_command
    from flatlora_app.loaders import max_memory_setting

    cmd = app_command(str(tmp_path), 8501, "127.0.0.1", None, "6GB")
    assert cmd[-2:] == ["--max-memory", "6GB"]
    monkeypatch.setattr("sys.argv", ["main.py", "--runs", str(tmp_path), "--max-memory", "6GB"])
    assert max_memory_setting() == "6GB"
    monkeypatch.setattr("sys.argv", ["main.py"])
    monkeypatch.setenv("FLATLORA_MAX_MEMORY", "512MiB")
    assert max_memory_setting() == "512MiB"
    monkeypatch.delenv("FLATLORA_MAX_MEMORY")
    assert max_memory_setting() == "auto"
    assert cli.main(["app", str(tmp_path), "--max-memory", "lots"]) == 2  # refused before any server starts


def test_report_and_landscape_refuse_a_bad_budget_in_one_line(tmp_path, capsys):
    from flatlora import cli

    for argv in (["report", str(tmp_path), "--out", str(tmp_path / "r")], ["landscape", str(tmp_path)]):
        assert cli.main([*argv, "--max-memory", "plenty"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--max-memory 'plenty' is not a size" in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_a_probe_with_another_loss_is_not_served_the_shared_clean_loss(model, probe):
    """The same batches under a custom loss_fn are another objective: its clean loss is its own."""
    import dataclasses

    from flatlora_analysis import evaluate_loss

    m, _ = model
    doubled = dataclasses.replace(probe, loss_fn=lambda outputs, batch: 2 * outputs.loss)
    plain = evaluate_loss(m, probe)
    assert evaluate_loss(m, doubled) == pytest.approx(2 * plain, rel=1e-6)  # not the shared plain loss (1x)
    assert evaluate_loss(m, probe) == plain
