"""The memory a measure may spend on autograd graphs: ``--max-memory``, parsed and resolved once.

The budget bounds what measuring holds beyond the weights: the saved tensors of the probe's
forward and backward graphs (:mod:`flatlora_analysis.micro_batch` splits the probe to fit it).
``auto`` (the default) is :data:`AUTO_SHARE` of the memory free on the device when it is first
resolved: the command's start for ``flatlora report`` / ``landscape``, the first measure of a
Python session otherwise. Sizes follow accelerate's ``max_memory``: ``GB``/``MB``/``KB`` are
powers of 10, ``GiB``/``MiB``/``KiB`` powers of 2, a bare number is bytes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

from flatlora.errors import FlatLoraError

AUTO = "auto"
# A tenth of the free memory: on a 24 GB machine about 2 GB of graphs, so measuring a small LLM
# peaks near its training step (weights + one batch's graph) and the rest stays free for the
# other jobs of a shared machine. A GPU's 80 GB give 8 GB, micro-batches of many rows.
AUTO_SHARE = 0.10
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes of autograd graphs a measure may hold, and where that number came from.

    Attributes:
        bytes: the budget.
        source: ``"auto: 10% of 20.1 GiB free on cpu"`` or ``"--max-memory 6GB"``.
    """

    bytes: int
    source: str

    def to_dict(self) -> dict[str, object]:
        return {"bytes": self.bytes, "source": self.source}


def parse_memory(value: str | int | float | None) -> int | None:
    """Bytes of a size such as ``6GB``, ``512MiB``, ``1.5GiB`` or ``2e9``; None for ``auto`` (or None).

    Raises:
        FlatLoraError: not a size, or a size <= 0.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
        if match is None or match.group(2) not in _UNITS:
            raise FlatLoraError(f"--max-memory {value!r} is not a size: pass auto, or a size such as 6GB or 512MiB")
        number, unit = float(match.group(1)), match.group(2)
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise FlatLoraError(f"--max-memory {value!r} is not above zero: pass auto, or a size such as 6GB")
    return size


def free_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free now: ``torch.cuda.mem_get_info`` on a GPU; on a CPU, MemAvailable within the cgroup's limit."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = _meminfo_available()
    room = _cgroup_room()
    known = [b for b in (available, room) if b is not None]
    if known:
        return min(known)
    try:  # not Linux: psutil where installed, else assume 8 GiB
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 8 * 2**30


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The container's memory limit less what it holds and cannot drop, where a limit is set.

    The cgroup's usage counts its page cache, which fills up to the limit after enough file
    I/O (a pip install, a suite of tests) and is reclaimed on demand: the inactive file pages
    are subtracted, as the kubelet's and ``docker stats``'s working set does. cgroup v2, else v1.
    """
    for limit_file, usage_file, inactive_key in (
        ("memory.max", "memory.current", "inactive_file"),  # v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file"),  # v1
    ):
        try:
            limit_text = (root / limit_file).read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 2**60:  # v1 writes "no limit" as a huge number
            return None
        stat = (root / usage_file).parent / "memory.stat"
        return limit - max(usage - _stat_value(stat, inactive_key), 0)
    return None


def _stat_value(path: Path, key: str) -> int:
    """One counter of a cgroup's ``memory.stat`` (0 where the file or the key is missing)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def resolve_budget(value: str | int | float | None = AUTO, device: str | torch.device = "cpu") -> MemoryBudget:
    """The budget ``value`` names; ``auto`` reads the free memory now.

    Raises:
        FlatLoraError: a value that is not a size.
    """
    size = parse_memory(value)
    if size is not None:
        return MemoryBudget(size, f"--max-memory {value}")
    device = torch.device(device)
    free = free_memory(device)
    return MemoryBudget(int(AUTO_SHARE * free), f"auto: {AUTO_SHARE:.0%} of {format_bytes(free)} free on {device.type}")


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``512 MiB``, ``12 KiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


_BUDGET: ContextVar[MemoryBudget | None] = ContextVar("flatlora_memory_budget", default=None)
_AUTO: dict[str, MemoryBudget] = {}  # auto budgets resolved in this process, per device type


def set_max_memory(value: str | int | float | None = AUTO, device: str | torch.device = "cpu") -> MemoryBudget:
    """Set the budget of every later measure in this context (``auto`` resolved now); returns it."""
    budget = resolve_budget(value, device)
    _BUDGET.set(budget)
    return budget


@contextlib.contextmanager
def max_memory(value: str | int | float | None, device: str | torch.device = "cpu") -> Iterator[MemoryBudget]:
    """The measures in the body keep their graphs within ``value`` (``"6GB"``, bytes, ``"auto"``)."""
    token = _BUDGET.set(resolve_budget(value, device))
    try:
        yield _BUDGET.get()
    finally:
        _BUDGET.reset(token)


def current_budget(device: str | torch.device = "cpu") -> MemoryBudget:
    """The budget set by :func:`set_max_memory` / :func:`max_memory`, else ``auto`` resolved once per device type."""
    budget = _BUDGET.get()
    if budget is not None:
        return budget
    kind = torch.device(device).type
    if kind not in _AUTO:
        _AUTO[kind] = resolve_budget(AUTO, device)
    return _AUTO[kind]


# Where the plan of a measure is told once (the CLI prints it; the Python API stays quiet).
_ANNOUNCE: list[Callable[[str], None]] = []
_TOLD: set[str] = set()


def announce_to(callback: Callable[[str], None] | None) -> None:
    """Send each distinct memory plan, once, to ``callback`` (None: stop)."""
    _ANNOUNCE[:] = [] if callback is None else [callback]


def announce(message: str) -> None:
    if _ANNOUNCE and message not in _TOLD:
        _TOLD.add(message)
        _ANNOUNCE[0](message)
