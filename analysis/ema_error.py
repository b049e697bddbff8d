"""The paper's Theorem 2: how far EFlat-LoRA's EMA perturbation e_bar is from Flat-LoRA's exact eps_B.

At a step: ||e_bar - eps_B|| / ||eps_B||, their cosine, and the sharpness gap
L(B + e_bar) - L(B + eps_B) on the same batch, eps_B the exact Flat-LoRA perturbation at the
clean point. Two sources: the live series the trainer logs (``--diagnostics-every k``, keys
``t2_*``), and a recomputation at a saved checkpoint, whose optimizer state holds e_bar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flatlora.errors import FlatLoraError
from flatlora_analysis.results import Result

T2_KEYS = ("t2_rel_error", "t2_cosine", "t2_loss_gap", "t2_sam_loss", "t2_ema_loss")


@dataclass(frozen=True)
class EmaErrorResult(Result):
    """Theorem-2 quantities at one or more steps (``source``: ``log`` or ``checkpoint``)."""

    steps: np.ndarray
    rel_error: np.ndarray
    cosine: np.ndarray
    loss_gap: np.ndarray
    sam_loss: np.ndarray
    ema_loss: np.ndarray
    source: str
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _arrays = ("steps", "rel_error", "cosine", "loss_gap", "sam_loss", "ema_loss")

    @property
    def final_rel_error(self) -> float:
        finite = self.rel_error[np.isfinite(self.rel_error)]
        return float(finite[-1]) if finite.size else float("nan")


def _run(run):
    from flatlora.runs import Run, load_run

    return run if isinstance(run, Run) else load_run(run)


def ema_error_series(run: str | Path | Any) -> EmaErrorResult:
    """The live Theorem-2 series an ``eflat-lora`` run logged (train with ``--diagnostics-every k``).

    Raises:
        FlatLoraError: not an eflat-lora run, or no ``t2_*`` records in its log.
    """
    run = _run(run)
    if run.method != "eflat-lora":
        raise FlatLoraError(f"{run.path} is a {run.method} run: the Theorem-2 error exists for eflat-lora runs only")
    rows = [r for r in run.metrics if r.get("t2_rel_error", None) is not None or "t2_loss_gap" in r]
    if not rows:
        raise FlatLoraError(f"{run.path} logged no Theorem-2 check: train it with --diagnostics-every k")

    def column(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])

    return EmaErrorResult(
        steps=np.array([int(r.get("step", 0)) for r in rows], dtype=float),
        rel_error=column("t2_rel_error"),
        cosine=column("t2_cosine"),
        loss_gap=column("t2_loss_gap"),
        sam_loss=column("t2_sam_loss"),
        ema_loss=column("t2_ema_loss"),
        source="log",
        settings={
            "run": str(run.path),
            "beta": run.hparams.get("beta"),
            "diagnostics_every": run.hparams.get("diagnostics_every"),
        },
        meta={"note": "each value is the trainer's average over its logging interval"},
    )


def _checkpoint_state(folder: Path) -> dict[str, Any]:
    path = folder / "optimizer.pt"
    if not path.is_file():
        raise FlatLoraError(f"{folder} holds no optimizer.pt: pass a Trainer checkpoint folder (checkpoint-N)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = state.get("flatlora") if isinstance(state, dict) else None
    if not own or own.get("method") != "eflat-lora":
        raise FlatLoraError(f"{folder} is not an eflat-lora checkpoint: its optimizer state holds no EMA")
    return own


def ema_error_at_checkpoint(
    run: str | Path | Any,
    probe=None,
    *,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
) -> EmaErrorResult:
    """Theorem 2 recomputed at a checkpoint: e_bar from its optimizer state against the exact eps_B.

    Args:
        run: an ``eflat-lora`` run directory.
        probe: the batch(es) of the comparison; by default the run's own train split.
        checkpoint: a ``checkpoint-N`` folder; by default the run's latest.
        device: where to measure.
        dtype: the base weights' dtype (None: the run's own).

    Raises:
        FlatLoraError: not an eflat-lora run, no checkpoint, or EMA shapes that do not match.
    """
    from flatlora.lora import find_lora_pairs
    from flatlora.perturbation import flat_lora_eps_b
    from flatlora.runs import latest_checkpoint
    from flatlora.schedules import RhoSchedule
    from flatlora_analysis.guard import measuring
    from flatlora_analysis.loading import Target, load_model
    from flatlora_analysis.objective import ModelObjective
    from flatlora_analysis.probe import ProbeSet
    from flatlora_analysis.spaces import build_space

    run = _run(run)
    if run.method != "eflat-lora":
        raise FlatLoraError(f"{run.path} is a {run.method} run: the Theorem-2 error exists for eflat-lora runs only")
    folder = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run.path / "checkpoint")
    if folder is None:
        raise FlatLoraError(f"{run.path} kept no checkpoint: train with --save-every k")
    own = _checkpoint_state(folder)
    emas = [
        v["ema_perturbation"]
        for _, v in sorted(own["state"].items(), key=lambda kv: int(kv[0]))
        if "ema_perturbation" in v
    ]
    h = run.hparams
    rho = RhoSchedule(h.get("rho", 0.05), h.get("rho_schedule", "constant"), h.get("rho_min", 0.0), h.get("steps"))(
        int(own["steps_done"])
    )
    model, _ = load_model(
        Target("run", run.path, run.adapter_path or folder, run), adapter=folder, device=device, dtype=dtype
    )
    probe = probe if probe is not None else ProbeSet.from_run(run, "train")
    with measuring(model, device) as dev:
        pairs = find_lora_pairs(model)
        if len(emas) != len(pairs) or any(tuple(e.shape) != tuple(p.B.shape) for e, p in zip(emas, pairs)):
            raise FlatLoraError(
                f"the EMA tensors in {folder} do not match the adapter's B matrices: pass the checkpoint of this run"
            )
        space = build_space(model, "lora")
        objective = ModelObjective(model, probe, space, dev)
        _, grad = objective.loss_and_grad(None)
        parts = space.split(grad)
        As = [p.a_matrix.detach() for p in pairs]
        eps = flat_lora_eps_b(
            As,
            [p.b_matrix.detach() for p in pairs],
            [g.flatten(1) for g in parts[0::2]],
            [g.flatten(1) for g in parts[1::2]],
            [p.scaling for p in pairs],
            rho,
            h.get("norm", "global"),
        )
        eps = [e.reshape(p.B.shape) for e, p in zip(eps, pairs)]
        emas = [e.to(device=dev, dtype=p.B.dtype) for e, p in zip(emas, pairs)]

        def flat_b(deltas):
            return space.flatten([t for a, d in zip(parts[0::2], deltas) for t in (torch.zeros_like(a), d)])

        sam_loss = objective.loss(flat_b(eps))
        ema_loss = objective.loss(flat_b(emas))
        e_vec = torch.cat([e.double().reshape(-1) for e in eps])
        m_vec = torch.cat([m.double().reshape(-1) for m in emas])
    n_eps, n_ema = float(e_vec.norm()), float(m_vec.norm())
    rel = float((m_vec - e_vec).norm()) / n_eps if n_eps > 0 else float("nan")
    cos = float(m_vec @ e_vec) / (n_eps * n_ema) if n_eps > 0 and n_ema > 0 else float("nan")
    return EmaErrorResult(
        steps=np.array([float(own["steps_done"])]),
        rel_error=np.array([rel]),
        cosine=np.array([cos]),
        loss_gap=np.array([ema_loss - sam_loss]),
        sam_loss=np.array([sam_loss]),
        ema_loss=np.array([ema_loss]),
        source="checkpoint",
        settings={
            "run": str(run.path),
            "checkpoint": str(folder),
            "rho": rho,
            "beta": h.get("beta"),
            "norm": h.get("norm", "global"),
            "n_examples": probe.n_examples,
            **probe.weighting_settings(),
        },
        meta={"eps_b_norm": n_eps, "ema_norm": n_ema, "eval_mode": True},
    )


def ema_norm_ratio(beta: float, cosine: float | np.ndarray, steps: int | None = None) -> float | np.ndarray:
    """||e_bar|| / ||eps||: the norm an EMA of equal-norm directions keeps when they turn from step to step.

    e_bar_t = beta e_bar_{t-1} + (1 - beta) eps_t with ||eps_t|| = 1 and a stationary rotation,
    <eps_a, eps_b> = c^|a-b| (lag-1 cosine c, as ``eps_rotation_cosine`` measures). Then

        ||e_bar_t||^2 = (1-beta)^2 sum_{i,j<t} beta^(i+j) c^|i-j|,

    and as t -> infinity (i, j >= 0: the diagonal sum_i beta^(2i) = 1/(1-beta^2), each lag k >= 1
    twice with sum_i beta^(2i+k) c^k = (beta c)^k / (1-beta^2), and sum_k (beta c)^k = beta c/(1-beta c))

        ||e_bar||^2 = (1-beta)/(1+beta) * (1 + beta c)/(1 - beta c).

    c = 1 gives 1 (no rotation, no shrinkage); c = 0 gives sqrt((1-beta)/(1+beta)), 0.229 at beta 0.9.

    Args:
        beta: EMA weight of the previous average, in [0, 1).
        cosine: lag-1 cosine c in [-1, 1] (scalar or array).
        steps: None for the stationary limit; else the t-step value from e_bar_0 = 0 (the warm-up).

    Returns:
        The ratio, shaped like ``cosine``.
    """
    if not 0 <= beta < 1:
        raise FlatLoraError(f"beta must lie in [0, 1), got {beta}")
    c = np.asarray(cosine, dtype=float)
    if np.any(np.abs(c) > 1):
        raise FlatLoraError("cosines must lie in [-1, 1]")
    if steps is None:
        value = np.sqrt((1 - beta) / (1 + beta) * (1 + beta * c) / (1 - beta * c))
    else:
        if steps < 1:
            raise FlatLoraError(f"steps must be >= 1, got {steps}")
        lag = np.abs(np.subtract.outer(np.arange(steps), np.arange(steps)))
        weights = np.outer(beta ** np.arange(steps), beta ** np.arange(steps))
        value = (1 - beta) * np.sqrt(np.array([np.sum(weights * ci**lag) for ci in np.atleast_1d(c).ravel()]))
        value = value.reshape(c.shape)
    return float(value) if value.ndim == 0 else value
