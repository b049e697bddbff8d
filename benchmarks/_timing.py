"""What the benchmarks share: timing calls (interleaved repeats, median or best of n) and peak memory.

Time: :func:`interleaved` times several calls round-robin (a, b, a, b, ...) in one process, so
machine noise falls on all of them alike. Memory: neither torch's allocator statistics nor
tracemalloc see CPU tensors, so a benchmark reads the resident set of a process from
``/proc`` (Linux), one route per fresh process (:func:`run_child`) so that routes share no heap.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def time_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Call ``fn(*args, **kwargs)`` once.

    Returns:
        (seconds it took, what it returned).
    """
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


@dataclass
class Timings:
    """The seconds of every timed call by name, in the order they ran, and each name's last result.

    Attributes:
        seconds: name -> the seconds of each timed call.
        results: name -> what its last timed call returned.
    """

    seconds: dict[str, list[float]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def median(self) -> dict[str, float]:
        """name -> median seconds."""
        return {name: statistics.median(t) for name, t in self.seconds.items()}

    def best(self) -> dict[str, float]:
        """name -> the fastest call's seconds."""
        return {name: min(t) for name, t in self.seconds.items()}


def interleaved(
    calls: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 0,
    on_time: Callable[[str, float], None] | None = None,
) -> Timings:
    """Time every call of ``calls`` ``repeats`` times, round-robin in the order given.

    Args:
        calls: name -> a call taking no argument.
        repeats: timed rounds.
        warmup: untimed rounds first (each call once per round, in the same order).
        on_time: called with (name, seconds) after each timed call, to show progress.

    Returns:
        The seconds of each call and its last result.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    out = Timings({name: [] for name in calls})
    for _ in range(repeats):
        for name, fn in calls.items():
            seconds, out.results[name] = time_call(fn)
            out.seconds[name].append(seconds)
            if on_time is not None:
                on_time(name, seconds)
    return out


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The median seconds of ``repeats`` calls of ``fn()``."""
    return interleaved({"call": fn}, repeats).median()["call"]


# ----------------------------------------------------------------------------- memory (Linux)


def rss_bytes() -> int:
    """This process's resident set now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def status_bytes(key: str) -> int:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes.

    Raises:
        RuntimeError: there is no such line.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset this process's peak resident set (``VmHWM``) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """This process's peak resident set since the start or :func:`reset_peak_rss`.

    The kernel refreshes the peak lazily (on unmap), so the current resident set counts too.
    """
    return max(status_bytes("VmHWM"), status_bytes("VmRSS"))


class PeakRss:
    """The peak resident set during a ``with`` block, sampled every millisecond by a thread.

    Attributes:
        before: the resident set on entering the block, in bytes.
        peak: the largest resident set seen in the block (entry and exit included), in bytes.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.before = self.peak = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def run_child(argv: list[str], env: dict[str, str] | None = None) -> str:
    """Run ``python argv`` in a fresh process (failing if it fails) and return its last line of output."""
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def children_peak_rss_bytes() -> int:
    """The largest peak resident set of any finished child process of this one (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
