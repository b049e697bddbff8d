"""Cost of a 2-D loss landscape: flatlora against 121 bare forward passes and against loss-landscapes 3.0.6.

all-MiniLM-L6-v2 + LoRA r = 8 on query/value (B away from zero, as in a trained adapter), eval
mode, a probe set of 64 tweets (two batches of 32, up to 64 tokens), CPU, an 11 x 11 grid.

- flatlora: ``landscape_2d(steps=11)`` in the merged space (filter-normalized directions);
- floor: 121 x the median time of one clean forward pass over the probe set;
- loss-landscapes 3.0.6 ``random_plane`` (filter normalization, 11 steps) on the same model
  and probe batches, if installed (``pip install loss-landscapes==3.0.6``, benchmark only).
  On the whole peft model its filter normalization raises ZeroDivisionError (a 1-D tensor of
  zeros -- the bias of peft's saved original classifier -- is scaled to zero, then divided by
  its own zero norm); the run reports that and then works around it by giving it the
  adapted layers' base Linear modules only (the same merged weights flatlora perturbs), with
  ``deepcopy_model=True`` (it otherwise leaves the model displaced).

    python benchmarks/landscape.py [--quick]

Last line: ``ratio: X`` with X = flatlora's time / (121 x one forward pass); goal <= 1.10.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _timing import median_seconds, time_call

from flatlora_analysis import ProbeSet, landscape_2d


def build(quick: bool):
    from flatlora.data import load_tweets
    from flatlora.models import LoraOptions, load_classifier

    model, tokenizer = load_classifier(None, num_labels=3, lora=LoraOptions(r=8, alpha=16, lora_dropout=0.0), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    tweets = load_tweets()
    n, length = (16, 32) if quick else (64, 64)
    batches = []
    for start in range(0, n, 32):
        chunk = [tweets[i] for i in range(start, min(n, start + 32))]
        enc = tokenizer([e.text for e in chunk], padding=True, truncation=True, max_length=length, return_tensors="pt")
        batches.append({**dict(enc), "labels": torch.tensor([e.label for e in chunk])})
    return model, ProbeSet.from_batches(batches)


@torch.no_grad()
def forward_time(model, probe, repeats: int) -> float:
    """Median seconds of one clean forward pass over the probe set."""

    def forward() -> None:
        for batch in probe.batches:
            model(**batch).loss.item()

    return median_seconds(forward, repeats)


def loss_landscapes_time(model, probe, steps: int) -> tuple[float | None, str]:
    try:
        import loss_landscapes
        from loss_landscapes.metrics import Metric
        from loss_landscapes.model_interface.model_wrapper import GeneralModelWrapper
    except ImportError:
        return None, "not installed (pip install loss-landscapes==3.0.6)"

    class ProbeLoss(Metric):
        def __call__(self, wrapper) -> float:
            with torch.no_grad():
                return sum(float(wrapper.forward(b)) * len(b["labels"]) for b in probe.batches) / probe.n_examples

    def forward_fn(m, batch):
        return m(**batch).loss

    note = ""
    try:
        loss_landscapes.random_plane(
            GeneralModelWrapper(model, [model], forward_fn),
            ProbeLoss(),
            distance=1,
            steps=steps,
            normalization="filter",
            deepcopy_model=True,
        )
    except ZeroDivisionError:
        note = "the whole model: ZeroDivisionError in filter normalization; timed on the adapted layers' base modules"
    from flatlora.lora import find_lora_pairs

    modules = [p.layer.get_base_layer() for p in find_lora_pairs(model)]
    wrapper = GeneralModelWrapper(model, modules, forward_fn)
    seconds, _ = time_call(
        loss_landscapes.random_plane,
        wrapper,
        ProbeLoss(),
        distance=1,
        steps=steps,
        normalization="filter",
        deepcopy_model=True,
    )
    return seconds, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 examples of 32 tokens, a 5 x 5 grid")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model, probe = build(args.quick)
    steps = 5 if args.quick else 11
    points = steps * steps
    one = forward_time(model, probe, 5)
    ours, result = time_call(landscape_2d, model, probe, steps=steps, span=1.0)
    one_after = forward_time(model, probe, 5)  # the machine may drift: take the mean of before and after
    floor = points * (one + one_after) / 2
    theirs, note = loss_landscapes_time(model, probe, steps)
    print(
        f"# MiniLM + LoRA r=8, {probe.n_examples} examples, {steps} x {steps} grid, CPU; clean loss "
        f"{result.clean_loss:.4f} (grid centre {result.z[steps // 2, steps // 2]:.4f})"
    )
    print()
    print("| route | seconds | ratio to the floor |")
    print("|---|---:|---:|")
    print(f"| floor: {points} x one forward pass over the probe set | {floor:.1f} | 1.000 |")
    print(f"| flatlora landscape_2d | {ours:.1f} | {ours / floor:.3f} |")
    if theirs is None:
        print(f"| loss-landscapes 3.0.6 random_plane | {note} | |")
    else:
        print(f"| loss-landscapes 3.0.6 random_plane | {theirs:.1f} | {theirs / floor:.3f} |")
        print()
        print(f"flatlora / loss-landscapes: {ours / theirs:.3f}")
        if note:
            print(f"loss-landscapes: {note}")
    print(f"ratio: {ours / floor:.3f}")


if __name__ == "__main__":
    main()
