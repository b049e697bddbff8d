"""The tasks a run can train: one module each, each returning a :class:`TaskSetup`.

``flatlora.tasks.classification`` (few-shot text classification) and ``flatlora.tasks.causal``
(causal-LM fine-tuning on prompt/target pairs, with generation) build what a run needs;
``flatlora.tasks.resolve`` says which task a config is. ``flatlora.experiment.train_run``
calls :func:`setup_task` and orchestrates the rest the same way for every task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flatlora.tasks.base import TaskSetup
from flatlora.tasks.resolve import data_task, resolve_task

if TYPE_CHECKING:
    from flatlora.config import TrainConfig

__all__ = ["TaskSetup", "data_task", "resolve_task", "setup_task"]


def setup_task(config: TrainConfig) -> TaskSetup:
    """The data, model and metrics of a resolved config's task.

    Args:
        config: A config through :func:`resolve_task` (its ``task`` set).

    Returns:
        The task's :class:`TaskSetup`.

    Raises:
        FlatLoraError: the data, the model or the encoding cannot be done as asked.
    """
    from flatlora.data.causal import CAUSAL_LM

    if config.task == CAUSAL_LM:
        from flatlora.tasks.causal import causal_setup

        return causal_setup(config)
    from flatlora.tasks.classification import classification_setup

    return classification_setup(config)
