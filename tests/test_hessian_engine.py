"""The Hessian engine II: block products, lockstep Lanczos, shared estimators, the reference mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from analysis_fixtures import TinyClassifier, lora_wrap, symmetric_with_spectrum
from test_analysis_hessian import classifier_probe, reference_hessian

from flatlora import FlatLoraError
from flatlora.testing import tiny_batches, tiny_model
from flatlora_analysis import ProbeSet, hessian_operator
from flatlora_analysis.hessian import DenseOperator, lanczos_eigenvalues
from flatlora_analysis.hessian.density import slq
from flatlora_analysis.hessian.lockstep import Lane, run_lockstep
from flatlora_analysis.hessian.operators import random_vectors
from flatlora_analysis.hessian.shared import shared_curvature
from flatlora_analysis.hessian.suite import _layer_indices, curvature
from flatlora_analysis.hessian.trace import hutchinson, hutchpp


def bert_float64():
    model = tiny_model("bert", r=2, dtype=torch.float64, target_modules=["query", "value"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model, ProbeSet.from_batches(tiny_batches("bert", 2, 3))


def two_layer_classifier():
    return lora_wrap(TinyClassifier(6, 5, 3), targets=("lin", "head")), classifier_probe()


def test_matmat_equals_k_matvecs_to_float64_round_off_on_a_transformer():
    model, probe = bert_float64()
    with hessian_operator(model, probe, "lora", hvp="autograd") as op:
        assert op.block_size == 1 and op.meta["block_size"] == 1  # a CPU's default: one product at a time
        V = torch.randn(op.dim, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        op.matmat(V[:, :2])
        assert op.meta["batched"] is False and "block_size 1" in op.meta["batched_reason"]
        op.block_size = 16
        columns = torch.stack([op.matvec(V[:, j]) for j in range(5)], 1)
        calls = op.n_calls
        block = op.matmat(V)
        assert op.meta["batched"] is True and "batched_reason" not in op.meta
        assert op.n_calls == calls + 1 and op.n_products == 12  # one backward pass for five products
    assert torch.max(torch.abs(block - columns)) <= 1e-12 * torch.max(torch.abs(columns))


def test_matmat_of_several_batches_and_block_size_chunks_equals_the_dense_hessian():
    model = lora_wrap(TinyClassifier(6, 5, 3))
    probe = classifier_probe()  # three uneven batches: graphs rebuilt per block, weighted per batch
    H = reference_hessian(model, probe, "lora")
    with hessian_operator(model, probe, "lora") as op:
        op.block_size = 3
        V = torch.randn(op.dim, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out = op.matmat(V)
    assert torch.max(torch.abs(out - H @ V)) < 1e-10


def test_matmat_falls_back_to_single_products_where_batching_fails(monkeypatch):
    model, probe = two_layer_classifier()
    H = reference_hessian(model, probe, "lora")
    with hessian_operator(model, probe, "lora") as op:
        op.matvec(torch.ones(op.dim, dtype=torch.float64))  # settle the method

        def no_rule(V):
            raise RuntimeError("Batching rule not implemented for aten::something")

        monkeypatch.setattr(op, "_autograd_block", no_rule)
        op.block_size = 4
        V = torch.randn(op.dim, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        out = op.matmat(V)
        assert op.meta["batched"] is False and "Batching rule" in op.meta["batched_reason"]
    assert torch.max(torch.abs(out - H @ V)) < 1e-10


def test_layer_matvec_is_the_diagonal_block_product():
    model, probe = bert_float64()
    H = reference_hessian(model, probe, "lora")
    with hessian_operator(model, probe, "lora") as op:
        names, indices = _layer_indices(op.space)
        assert len(names) >= 4
        for name, index in zip(names, indices):
            v = torch.randn(len(index), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            assert torch.max(torch.abs(op.layer_matvec(name, v) - H[index][:, index] @ v)) < 1e-10
        with pytest.raises(FlatLoraError, match="no layer"):
            op.layer_matvec("nowhere", v)


def test_lockstep_runs_equal_the_same_runs_one_after_another():
    A = symmetric_with_spectrum(np.linspace(-1, 5, 60), seed=4)
    index = torch.arange(10, 40)
    sequential = [lanczos_eigenvalues(DenseOperator(A), 2, tol=1e-8, seed=5)]
    block = DenseOperator(A[index][:, index])
    sequential.append(lanczos_eigenvalues(block, 1, tol=1e-8, seed=5))
    lanes = []
    for dim, ix, k in ((60, None, 2), (30, index, 1)):
        g = torch.Generator().manual_seed(5)
        lanes.append(
            Lane(random_vectors(dim, generator=g, unit=True), index=ix, k=k, tol=1e-8, max_iter=100, generator=g)
        )
    op = DenseOperator(A)
    calls = run_lockstep(op, lanes)
    for lane, ref in zip(lanes, sequential):
        assert np.allclose(sorted(lane.eigen()[0], reverse=True), ref.eigenvalues, rtol=1e-12, atol=1e-12)
        assert len(lane.it.alpha) == ref.iterations or ref.meta["verified"]
    assert calls == max(len(lane.it.alpha) for lane in lanes)


def test_batched_hutchinson_hutchpp_and_slq_equal_the_one_product_versions():
    A = symmetric_with_spectrum(np.r_[np.linspace(2, 10, 8), np.linspace(0, 0.2, 72)], seed=6)  # no exhaustion
    for batched in (False, True):
        op = DenseOperator(A)
        h = hutchinson(op, 40, seed=1, batched=batched)
        t = hutchinson(op, 40, tol=0.05, min_samples=4, seed=1, batched=batched)
        p = hutchpp(op, 30, seed=1, batched=batched)
        q = slq(op, 12, 3, seed=1, batched=batched)
        if not batched:
            ref = (h, t, p, q)
    assert np.allclose(h.samples, ref[0].samples, rtol=1e-12) and np.allclose(t.samples, ref[1].samples, rtol=1e-12)
    assert p.trace == pytest.approx(ref[2].trace, rel=1e-12)
    assert np.allclose(q.nodes, ref[3].nodes, rtol=1e-10) and np.allclose(q.weights, ref[3].weights, atol=1e-10)


def test_shared_estimators_are_exact_when_the_krylov_basis_spans_the_range():
    # rank 6 < the Lanczos basis: the residual part vanishes, so tr(H) and every block's trace are exact
    g = torch.Generator().manual_seed(7)
    U = torch.linalg.qr(torch.randn(50, 6, generator=g, dtype=torch.float64))[0]
    A = U @ torch.diag(torch.tensor([9.0, 5, 3, -2, 1, 0.5], dtype=torch.float64)) @ U.T
    layers = [torch.arange(0, 20), torch.arange(20, 35), torch.arange(35, 50)]
    found = shared_curvature(DenseOperator(A), 3, tol=1e-10, trace_samples=30, density_steps=8, layers=layers)
    assert np.allclose(found.eigen.eigenvalues, [9, 5, 3], rtol=1e-9)
    assert found.trace.trace == pytest.approx(float(A.trace()), abs=1e-9)
    for index, value, se in zip(layers, found.layer_traces, found.layer_stderr):
        assert value == pytest.approx(float(A[index][:, index].trace()), abs=1e-9) and se < 1e-9
        block_top = float(torch.linalg.eigvalsh(A[index][:, index])[-1])
    assert found.layer_eigenvalues[-1] == pytest.approx(block_top, rel=1e-3)


def test_shared_estimators_are_unbiased_with_honest_standard_errors():
    A = symmetric_with_spectrum(np.r_[20, 10, np.random.default_rng(0).normal(0.5, 1, 118)], seed=8)
    layers = [torch.arange(0, 40), torch.arange(40, 120)]
    truth = [float(A[ix][:, ix].trace()) for ix in layers]
    z_trace, z_layers = [], []
    for seed in range(30):
        found = shared_curvature(DenseOperator(A), 2, trace_samples=30, density_steps=10, layers=layers, seed=seed)
        z_trace.append((found.trace.trace - float(A.trace())) / found.trace.stderr)
        z_layers += list((found.layer_traces - truth) / found.layer_stderr)
    # means near 0 and spreads near 1: unbiased, and the stated errors are the real ones
    assert abs(np.mean(z_trace)) < 0.6 and 0.6 < np.std(z_trace) < 1.5
    assert abs(np.mean(z_layers)) < 0.5 and 0.6 < np.std(z_layers) < 1.5


def test_density_run_one_is_the_top_eigenvalue_runs_prefix():
    A = symmetric_with_spectrum(np.linspace(-2, 8, 70), seed=9)
    found = shared_curvature(DenseOperator(A), 1, trace_samples=0, density_steps=15, density_runs=2, seed=3)
    assert found.nodes.shape == (2, 15) and np.allclose(found.weights.sum(1), 1)
    ref = slq(DenseOperator(A), 15, 1, seed=3)  # the same first Rademacher draw of the same seed
    assert np.allclose(found.nodes[0], ref.nodes[0], rtol=1e-9, atol=1e-9)
    assert found.products["density"] == 15  # run 1 cost nothing extra


def test_shared_engine_agrees_with_the_reference_engine_on_a_transformer():
    model, probe = bert_float64()
    settings = dict(k=3, tol=1e-6, trace_samples=30, density_steps=10, density_runs=2, layers=True)
    shared = curvature(model, probe, **settings, engine="shared")
    reference = curvature(model, probe, **settings, engine="reference")
    assert shared.hvps < reference.hvps
    a, b = shared.parts(), reference.parts()
    assert np.allclose(a["top_eigenvalues"].eigenvalues, b["top_eigenvalues"].eigenvalues, rtol=1e-5)
    assert np.allclose(a["layers"].eigenvalues, b["layers"].eigenvalues, rtol=1e-8)  # the same runs per layer
    H = reference_hessian(model, probe, "lora")
    assert abs(a["trace"].trace - float(H.trace())) < 4 * a["trace"].stderr + 1e-9
    _, indices = _layer_indices(build_space_of(model))
    truth = np.array([float(H[ix][:, ix].trace()) for ix in indices])
    assert np.all(np.abs(a["layers"].traces - truth) < 4 * a["layers"].trace_stderr + 1e-9)
    assert set(shared.shares) == {"density", "trace", "layers.eigenvalues", "layers.traces"}
    assert reference.shares == {} and reference.meta["engine"] == "reference"


def build_space_of(model):
    from flatlora_analysis import build_space

    return build_space(model, "lora")


def test_engine_and_layer_settings_are_refused_in_one_line():
    model, probe = two_layer_classifier()
    with pytest.raises(FlatLoraError, match="unknown Hessian engine"):
        curvature(model, probe, engine="fast")
    with pytest.raises(FlatLoraError, match="trace_samples"):
        curvature(model, probe, layers=True, trace_samples=0)
    with pytest.raises(FlatLoraError, match="larger than the space"):
        curvature(model, probe, k=10**6)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_data_parallel_products_on_two_gloo_ranks_equal_one_process(tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("hessian_dp_worker.py")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    for cmd in ([sys.executable, str(worker), str(tmp_path / "one.json")],
                [torchrun, "--standalone", "--nproc_per_node=2", str(worker), str(tmp_path / "two.json")]):  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))

    def close(a, b) -> bool:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        return a.shape == b.shape and np.max(np.abs(a - b)) <= 1e-6 * np.max(np.abs(a))

    assert close(one["hv"], two["hv"])
    c1, c2 = one["curvature"], two["curvature"]
    assert c2["meta"]["data_parallel"] == {"ranks": 2} and c2["settings"]["n_examples"] == 10
    for part, key in [("top_eigenvalues", "eigenvalues"), ("trace", "trace"), ("trace", "stderr"),
                      ("density", "nodes"), ("layers", "eigenvalues"), ("layers", "traces")]:  # fmt: skip
        assert close(c1[part][key], c2[part][key]), (part, key)


def test_lanczos_rebuilds_every_product_from_its_coefficients():
    from flatlora_analysis.hessian.krylov import Lanczos

    A = symmetric_with_spectrum(np.linspace(-3, 4, 40), seed=10)
    g = torch.Generator().manual_seed(0)
    it = Lanczos(DenseOperator(A), random_vectors(40, generator=g, unit=True), g)
    for _ in range(12):
        it.step()
    Q = it.basis()
    assert torch.max(torch.abs(it.products() - Q @ A)) < 1e-12  # row j is A q_j
    index = torch.tensor([3, 7, 19])
    assert torch.max(torch.abs(it.products(index) - (Q @ A)[:, index])) < 1e-12


def test_a_start_toward_the_top_eigenvector_converges_in_fewer_products_and_misses_nothing():
    spectrum = np.r_[10.0, 9.0, np.linspace(-1, 8.5, 198)]
    g = torch.Generator().manual_seed(11)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.as_tensor(spectrum)) @ Q.T
    near_top = Q[:, 0] + 0.3 * Q[:, 1] + 0.05 * torch.randn(200, generator=g, dtype=torch.float64)
    plain = lanczos_eigenvalues(DenseOperator(A), 1, tol=1e-8, seed=0)
    toward = lanczos_eigenvalues(DenseOperator(A), 1, tol=1e-8, seed=0, toward=near_top)
    assert plain.eigenvalues[0] == pytest.approx(10.0, rel=1e-7) and toward.eigenvalues[0] == pytest.approx(
        10.0, rel=1e-7
    )
    assert toward.products < plain.products
    # a direction orthogonal to the top eigenvector: the random half still finds it
    blind = lanczos_eigenvalues(DenseOperator(A), 1, tol=1e-8, seed=0, toward=Q[:, 1])
    assert blind.eigenvalues[0] == pytest.approx(10.0, rel=1e-7)
    # no direction (None or zero): exactly the random start
    for none in (None, torch.zeros(200, dtype=torch.float64)):
        again = lanczos_eigenvalues(DenseOperator(A), 1, tol=1e-8, seed=0, toward=none)
        assert again.eigenvalues == plain.eigenvalues and again.products == plain.products


def test_shared_curvature_toward_a_direction_keeps_the_density_and_trace_honest():
    A = symmetric_with_spectrum(np.r_[20, 10, np.random.default_rng(1).normal(0.5, 1, 98)], seed=12)
    top = torch.linalg.eigh(A).eigenvectors[:, -1]
    plain = shared_curvature(DenseOperator(A), 1, tol=1e-8, trace_samples=12, density_steps=12, seed=4)
    toward = shared_curvature(DenseOperator(A), 1, tol=1e-8, trace_samples=12, density_steps=12, seed=4, toward=top)
    assert toward.eigen.eigenvalues[0] == pytest.approx(20.0, rel=1e-7)
    # SLQ run 1 runs on its own from the same Rademacher vector: the same quadrature to round-off
    assert np.allclose(toward.nodes, plain.nodes, rtol=1e-8, atol=1e-8)
    assert np.allclose(toward.weights, plain.weights, rtol=1e-8, atol=1e-10)
    assert toward.products["density"] == 12 and plain.products["density"] == 0
    assert plain.shares["density"].startswith("run 1 is") and "no SLQ run" in toward.shares["density"]
    z = [
        (shared_curvature(DenseOperator(A), 1, trace_samples=12, seed=s, toward=top).trace.trace - float(A.trace()))
        / shared_curvature(DenseOperator(A), 1, trace_samples=12, seed=s, toward=top).trace.stderr
        for s in range(20)
    ]
    assert abs(np.mean(z)) < 0.8  # the sketch toward the gradient leaves the residual probes unbiased


def test_curvature_and_top_eigenvalues_started_toward_the_gradient_agree_with_the_dense_hessian():
    from flatlora_analysis import top_eigenvalues

    model, probe = bert_float64()
    H = reference_hessian(model, probe, "lora")
    truth = float(torch.linalg.eigvalsh(H)[-1])
    for start in ("random", "gradient"):
        found = curvature(model, probe, k=1, tol=1e-8, trace_samples=6, start=start)
        eig = found.parts()["top_eigenvalues"]
        assert eig.eigenvalues[0] == pytest.approx(truth, rel=1e-6)
        assert eig.settings["start"] == start and found.settings["start"] == start
        assert found.parts()["trace"].meta["sketch_start"] == start
        alone = top_eigenvalues(model, probe, 1, tol=1e-8, start=start)
        assert alone.eigenvalues[0] == pytest.approx(truth, rel=1e-6) and alone.settings["start"] == start
    with pytest.raises(FlatLoraError, match="Lanczos start"):
        top_eigenvalues(model, probe, 1, solver="eigsh", start="gradient")
    with pytest.raises(FlatLoraError, match="unknown --eig-start"):
        curvature(model, probe, start="top")
