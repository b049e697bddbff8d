"""Closed-form objectives and tiny models for the analysis tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class Quadratic:
    """L(w0 + delta) = 1/2 (w0 + delta - center)^T H (w0 + delta - center), an objective with known answers."""

    def __init__(self, H: torch.Tensor, w0: torch.Tensor | None = None, center: torch.Tensor | None = None) -> None:
        self.H = H.double()
        self.dim = H.shape[0]
        self.dtype = torch.float64
        self.device = torch.device("cpu")
        self.w0 = torch.zeros(self.dim, dtype=torch.float64) if w0 is None else w0.double()
        self.center = self.w0 if center is None else center.double()
        self.n_products = 0
        self.evaluations = 0

    def point(self) -> torch.Tensor:
        return self.w0

    def loss(self, delta: torch.Tensor | None = None) -> float:
        self.evaluations += 1
        x = self.w0 - self.center + (0 if delta is None else delta)
        return float(0.5 * x @ self.H @ x)

    def loss_and_grad(self, delta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        x = self.w0 - self.center + (0 if delta is None else delta)
        self.evaluations += 1
        return float(0.5 * x @ self.H @ x), self.H @ x

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_products += 1
        return self.H @ v.double()


def symmetric_with_spectrum(eigenvalues, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ Q.T


class TinyRegression(nn.Module):
    """x -> W x with loss 1/2 mean ||W x - labels||^2 (quadratic in W)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_out, bias=False)

    def forward(self, x, labels=None):
        out = self.lin(x)
        loss = None if labels is None else 0.5 * (out - labels).square().sum(-1).mean()
        return SimpleNamespace(loss=loss, logits=out)


class TinyClassifier(nn.Module):
    """x -> tanh(W1 x) -> W2, cross-entropy: a non-quadratic loss with one LoRA-adapted layer."""

    def __init__(self, n_in: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.lin(x)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def lora_wrap(module: nn.Module, r: int = 2, alpha: float = 4, targets=("lin",), b_scale: float = 0.3, seed: int = 0):
    """peft LoRA on ``targets`` with B set away from zero (as in a trained adapter), float64."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(module, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets))).double()
    if b_scale:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, b_scale)
    return model


def model_state(model: nn.Module) -> dict:
    """Everything a measure must leave alone: values, grads, requires_grad, dtype, modes."""
    return {
        "params": {
            n: (p.detach().clone(), p.requires_grad, p.dtype, None if p.grad is None else p.grad.detach().clone())
            for n, p in model.named_parameters()
        },
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["modes"] == after["modes"]
    assert before["params"].keys() == after["params"].keys()
    for name, (value, flag, dtype, grad) in before["params"].items():
        value2, flag2, dtype2, grad2 = after["params"][name]
        assert torch.equal(value, value2), name
        assert (flag, dtype) == (flag2, dtype2), name
        assert (grad is None and grad2 is None) or torch.equal(grad, grad2), name


# ----------------------------------------------------------------------------- small runs on disk

REVIEW_WORDS = {0: ["awful", "bad", "boring", "dull"], 1: ["great", "good", "lovely", "fun"]}


def write_reviews_csv(path, n: int = 60, seed: int = 0):
    """A two-class CSV that a tiny BERT learns a little of."""
    import random

    rng = random.Random(seed)
    rows = ["text,label"]
    for i in range(n):
        label = i % 2
        rows.append(f"a {rng.choice(REVIEW_WORDS[label])} film number {i},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def train_tiny_runs(
    root, csv_file, model_dir, methods=("lora", "eflat-lora", "flat-lora"), seeds=(1,), steps=6, extra=()
):
    """Train tiny runs with the CLI into root/<method>-seed<seed>; eflat-lora logs Theorem 2 and a trajectory."""
    from flatlora import cli

    for method in methods:
        for seed in seeds:
            argv = [
                "train",
                "--method",
                method,
                "--data",
                str(csv_file),
                "--model",
                str(model_dir),
                "--shots",
                "6",
                "--steps",
                str(steps),
                "--batch-size",
                "4",
                "--save-every",
                "3",
                "--log-every",
                "1",
                "--trajectory-every",
                "2",
                "--seed",
                str(seed),
                "--lr",
                "0.01",
                "--no-progress",
                "--out",
                str(root / f"{method}-seed{seed}"),
                *extra,
            ]
            if method == "eflat-lora":
                argv += ["--diagnostics-every", "1"]
            assert cli.main(argv) == 0
    return root


def write_pairs_csv(path, n: int = 8):
    """A prompt/target CSV in the shape of E2E meaning representations and their references."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "target"])
        for i in range(n):
            writer.writerow([f"name[Place {i}], food[Thai]", f"Place {i} serves Thai food" + " nearby" * (i % 3)])
    return path


def train_tiny_causal_runs(
    root, pairs_csv, model_dir, methods=(("lora", 0.0), ("flat-lora", 0.5), ("eflat-lora", 0.5))
):
    """Tiny causal-LM runs into root/<method>, each decoding and scoring 3 test prompts (generations.jsonl)."""
    from flatlora import cli

    for method, rho in methods:
        argv = ["train", "--method", method, "--data", str(pairs_csv), "--model", str(model_dir), "--shots", "3",
                "--steps", "4", "--batch-size", "3", "--lr", "5e-3", "--generate", "3", "--test-cap", "none",
                "--no-progress", "--save-every", "2", "--log-every", "1", "--out", str(root / method)]  # fmt: skip
        if rho:
            argv += ["--rho", str(rho)]
        if method == "eflat-lora":
            argv += ["--diagnostics-every", "1"]
        assert cli.main(argv) == 0
    return root
