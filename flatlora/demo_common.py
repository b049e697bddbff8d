"""What both halves of ``flatlora demo`` share: whether a finished run can stand for a new one.

Kept apart so that ``demo`` may import ``demo_llm`` without ``demo_llm`` importing ``demo``.
"""

from __future__ import annotations

import json
from typing import Any


def reusable(previous: Any, config: Any) -> bool:
    """Whether ``previous`` is a finished run of ``config``'s settings, so a rerun can keep it.

    Args:
        previous: The run found in the run's folder (a :class:`flatlora.runs.Run`), or None.
        config: The settings of the run to make: anything with ``hparams()`` and
            ``data_spec()`` (a ``TrainConfig``, or its resolved causal-LM form).

    Returns:
        True when ``previous`` is done, with the same hyperparameters (compared as run.json
        stores them) and the same data settings.
    """
    return (
        previous is not None
        and previous.status == "done"
        and previous.hparams == json.loads(json.dumps(config.hparams()))
        and all(previous.info["data"].get(k) == v for k, v in config.data_spec().items())
    )
