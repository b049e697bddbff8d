"""Several processes (``torchrun`` / ``accelerate launch``): ranks, and agreeing on a refusal.

The CLI checks everything a user can get wrong on every rank before any rank writes. A rank
that found a problem cannot just exit: the others would wait for it in the Trainer's first
collective. :func:`agreed` makes every rank learn every rank's outcome, so all of them stop
with the same one-line error (or all go on).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from flatlora.errors import FlatLoraError


def world_size() -> int:
    """The number of processes of this run (WORLD_SIZE, set by torchrun and accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when alone)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group (gloo on CPU, nccl on GPUs) if launched as several processes.

    accelerate and the HF Trainer reuse a group that is already there.
    """
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier(group=_object_group())


_GLOO_GROUP = None


def _object_group():
    """A gloo group for exchanging small Python objects (nccl would need them on a GPU)."""
    global _GLOO_GROUP
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None  # the default group
    if _GLOO_GROUP is None:
        _GLOO_GROUP = dist.new_group(backend="gloo")
    return _GLOO_GROUP


class AgreedError(FlatLoraError):
    """A user error that every rank raises together (from :func:`agreed`)."""


def exit_together(code: int) -> int:
    """Leave with ``code`` on every rank at once: at the end of a run, or after an :class:`AgreedError`.

    torchrun stops the other workers as soon as one fails, so a rank that took longer to tear
    down would end with SIGTERM instead of the exit code; and a rank that leaves while gloo
    still holds work of its last collectives can abort in the interpreter's finalization
    ("terminate called without an active exception"). So the ranks meet at a barrier, leave
    the process group, and exit at once. Alone, returns ``code``. Only for points every rank
    reaches: a rank that failed alone must not wait for the others here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if world_size() <= 1:
        return code
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier(group=_object_group())
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def agreed() -> Iterator[None]:
    """Run the body on every rank; if any rank fails, every rank fails the same way.

    A ``FlatLoraError`` on any rank ends every rank with the error of the lowest such rank
    (one line, the CLI's exit 2). Any other exception is re-raised on its rank, and the other
    ranks stop with a ``RuntimeError`` naming that rank. Alone, the body runs as it is.
    """
    if world_size() <= 1:
        yield
        return
    import torch.distributed as dist

    init()
    outcome: tuple[str, str] | None = None
    failure: BaseException | None = None
    try:
        yield
    except FlatLoraError as err:
        outcome, failure = ("user", str(err)), err
    except Exception as err:
        outcome, failure = ("bug", f"{type(err).__name__}: {err}"), err
    outcomes: list[tuple[str, str] | None] = [None] * world_size()
    dist.all_gather_object(outcomes, outcome, group=_object_group())
    users = [o[1] for o in outcomes if o is not None and o[0] == "user"]
    if users:
        raise AgreedError(users[0]) from None
    if failure is not None:
        raise failure
    bugs = [(i, o[1]) for i, o in enumerate(outcomes) if o is not None]
    if bugs:
        raise RuntimeError(f"rank {bugs[0][0]} failed while checking the run: {bugs[0][1]}")
