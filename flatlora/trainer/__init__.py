"""Training loops: a plain loop over dict batches and ``FlatLoraTrainer`` under the HF Trainer.

* ``loop.py``: :func:`train_loop`, :func:`evaluate` (tests, notebooks, the demo);
* ``hf.py``: :class:`FlatLoraTrainer`, built from
  ``two_pass.py`` (the first pass of two-pass methods), ``loss_scaling.py`` (how the
  Trainer scales a micro-batch loss) and ``method_log.py`` (the method's quantities in the log).
"""

from flatlora.trainer.hf import FlatLoraTrainer
from flatlora.trainer.loop import Batch, BatchLossFn, evaluate, model_loss, to_device, train_loop
from flatlora.trainer.two_pass import PERTURBATION_SYNC

__all__ = [
    "PERTURBATION_SYNC",
    "Batch",
    "BatchLossFn",
    "FlatLoraTrainer",
    "evaluate",
    "model_loss",
    "to_device",
    "train_loop",
]
