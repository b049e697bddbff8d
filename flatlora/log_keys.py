"""Every key that training writes to ``metrics.jsonl``: the contract with the analysis and the app.

One constant per key, each with one line of meaning. Per-step records come from the methods
(``LoRAMethod.train_step`` / ``pop_log``) and from ``FlatLoraTrainer`` (averaged over each
logging interval, so a Trainer record's value is the mean over the steps since the last one);
the run's final records come from ``flatlora.experiment``. This module imports nothing, so
``analysis`` and ``app`` can read it without torch.
"""

from __future__ import annotations

# -- every step (plain loop and Trainer) ------------------------------------------------------

STEP = "step"
"""Optimizer steps done when the record was made (1 for the first step)."""
LR = "lr"
"""Plain loop: the learning rate the step used."""
LOSS = "loss"
"""Loss of the first forward of the step: clean (lora, lora-sam, flat-lora, bar), EMA (eflat-lora), noisy (rwp-lora)."""
PERTURBED_LOSS = "perturbed_loss"
"""Two-pass methods: loss of the second forward, at the perturbed point (summed over accumulation micro-batches)."""
SKIPPED = "skipped"
"""1.0 when the step's gradient was not finite (or the fp16 loss scaler skipped it) and no update was made, else 0.0."""
RHO = "rho"
"""rho_t: the radius (bar: the coefficient mu_t) of this step after its schedule."""
BALANCEDNESS = "balancedness"
"""Sum over layers of ||A_l||_F^2 - ||B_l||_F^2 after the step (the paper's Theorem 1)."""
BALANCEDNESS_PER_LAYER = "balancedness_per_layer"
"""||A_l||_F^2 - ||B_l||_F^2 per LoRA layer, in module order (plain loop only: lists are not averaged)."""

# -- perturbations ---------------------------------------------------------------------------

EPS_NORM = "eps_norm"
"""lora-sam: ||eps|| over every A and B (rho, or ASAM's rescaled norm)."""
EPS_B_NORM = "eps_b_norm"
"""flat-lora: ||eps_B|| of this step over all layers; eflat-lora: ||e_bar_{t-1}||, the EMA applied in this pass."""
EPS_B_NORM_PER_LAYER = "eps_b_norm_per_layer"
"""The same norm per LoRA layer, in module order (plain loop only)."""
REALIZED_NORM = "realized_norm"
"""Norm of the full-weight perturbation actually applied, sqrt(sum_l ||s eps_B A||_F^2) (at most rho)."""
TARGET_EPS_B_NORM = "target_eps_b_norm"
"""eflat-lora: ||eps_B_t||, the exact Flat-LoRA perturbation at the clean point that the EMA takes in."""
REALIZED_RATIO = "realized_ratio"
"""flat-lora / eflat-lora: realized_norm / rho, the share of its radius a step perturbs (absent when rho = 0)."""
EPS_ROTATION_COSINE = "eps_rotation_cosine"
"""flat-lora / eflat-lora: cos(eps_B_t, eps_B_{t-1}) over all layers, how far the exact perturbation turns per
step (null on the first step); the lag-1 correlation that shrinks an EMA of unit directions."""
EMA_COSINE = "ema_cosine"
"""eflat-lora: cos(e_bar_{t-1}, eps_B_t), the EMA this step applies against the exact perturbation (the cheap
part of the Theorem-2 check: no extra forward pass)."""
NOISE_SCALE = "noise_scale"
"""rwp-lora: f_t * rho, the noise's standard deviation per unit of row norm ||W'_i|| / sqrt(n)."""
BAR_COEFFICIENT_MEAN = "bar_coefficient_mean"
"""bar: mean over layers of the drift coefficient c = mu_t D / (||A||^2 + ||B||^2)."""

# -- the live check of the paper's Theorem 2 (eflat-lora, every diagnostics_every steps) ------

T2_CLEAN_LOSS = "t2_clean_loss"
"""Loss at the clean point on the step's batch."""
T2_SAM_LOSS = "t2_sam_loss"
"""Loss at B + eps_B, the exact Flat-LoRA perturbation (same dropout masks as the step)."""
T2_EMA_LOSS = "t2_ema_loss"
"""Loss at B + e_bar, EFlat-LoRA's EMA perturbation (same dropout masks as the step)."""
T2_LOSS_GAP = "t2_loss_gap"
"""t2_ema_loss - t2_sam_loss."""
T2_REL_ERROR = "t2_rel_error"
"""||e_bar - eps_B|| / ||eps_B|| (NaN, written null, when eps_B = 0)."""
T2_COSINE = "t2_cosine"
"""cos(e_bar, eps_B) (NaN, written null, when either is 0)."""

# -- written by the HF Trainer into each record -------------------------------------------------

LEARNING_RATE = "learning_rate"
"""Trainer: the learning rate of the last step of the interval."""
GRAD_NORM = "grad_norm"
"""Trainer: the gradient norm before clipping, of the last step of the interval."""
EPOCH = "epoch"
"""Trainer: epochs done (fractional)."""

# -- the records of a CLI run's metrics.jsonl (flatlora.run_callbacks) ----------------------------

PHASE = "phase"
"""What a record of metrics.jsonl is: one of the four PHASE_* values below (absent in older runs)."""
PHASE_TRAIN = "train"
"""A training record: the step's method quantities, averaged over the logging interval."""
PHASE_EVAL = "eval"
"""A dev-set evaluation during training (--eval-every): eval_loss, eval_accuracy, ..."""
PHASE_SUMMARY = "summary"
"""The end of training, once per run: train_runtime (this attempt's seconds) and train_loss."""
PHASE_FINAL = "final"
"""A final evaluation of one split: <split>_loss and <split>_accuracy, as in run.json's metrics."""
TRAIN_RUNTIME = "train_runtime"
"""Seconds the attempt spent training (summary record; final train-split evaluation: its own seconds)."""
TRAIN_LOSS = "train_loss"
"""Summary record: the mean step loss of the whole run, resumes included; final record: loss on the train split."""
FINAL_SPLITS = ("train", "dev", "test")
"""Splits evaluated once at the end, each as a record with ``<split>_loss`` and ``<split>_accuracy``
(causal-LM runs: ``<split>_loss``, the mean over target tokens, and ``<split>_perplexity``)."""
ACCURACY = "accuracy"
"""Classification: share of examples whose arg-max class is the label (``test_accuracy``, ...)."""
PERPLEXITY = "perplexity"
"""Causal LM: exp of the split's token-mean loss over target tokens (``test_perplexity``, ...)."""
GENERATION_METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
"""Causal LM with --generate N: the E2E metrics of N test generations, final keys ``test_bleu``, ``test_nist``,
``test_meteor``, ``test_rouge_l``, ``test_cider`` (null where a metric could not be computed, e.g. no Java)."""


def final_key(split: str, what: str) -> str:
    """The key of a final evaluation: ``final_key("test", "accuracy") == "test_accuracy"``."""
    return f"{split}_{what}"


METHOD_KEYS: frozenset[str] = frozenset(
    {
        LOSS,
        PERTURBED_LOSS,
        SKIPPED,
        RHO,
        BALANCEDNESS,
        BALANCEDNESS_PER_LAYER,
        EPS_NORM,
        EPS_B_NORM,
        EPS_B_NORM_PER_LAYER,
        REALIZED_NORM,
        TARGET_EPS_B_NORM,
        REALIZED_RATIO,
        EPS_ROTATION_COSINE,
        EMA_COSINE,
        NOISE_SCALE,
        BAR_COEFFICIENT_MEAN,
        T2_CLEAN_LOSS,
        T2_SAM_LOSS,
        T2_EMA_LOSS,
        T2_LOSS_GAP,
        T2_REL_ERROR,
        T2_COSINE,
    }
)
"""Every key a method's step log can hold (``LoRAMethod.train_step`` / ``pop_log``)."""
