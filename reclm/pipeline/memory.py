"""What a stage costs in memory and CPU, as its manifest records it.

``PeakMemory`` measures the peak resident memory of the process during a stage (and the CUDA peak),
after ``release_free_memory`` hands back what earlier stages of the same process freed, so a stage is
not charged with another's memory. ``cpu_seconds`` tells how much work a stage was on a shared machine.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path


def process_status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere only a garbage collection).
    glibc keeps what a process frees for reuse: after PPO (21 GB) the next stage in the same process started
    at 16 GB of resident memory it no longer used, and would have reported that as its own peak."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak resident memory of this process during a block (Linux: VmHWM reset through
    /proc/self/clear_refs; elsewhere a 50 ms sampler), plus the CUDA peak when a GPU is used. The block
    starts from the memory in use: what earlier work freed is handed back first."""

    def __init__(self) -> None:
        self.rss_mb = 0.0
        self.gpu_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.rss_mb = max(self.rss_mb, process_status_mb("VmRSS") or 0.0)

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm = process_status_mb("VmHWM") is not None
        except OSError:
            self._hwm = False
        if not self._hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._cuda = self._cuda_available()
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    @staticmethod
    def _cuda_available() -> bool:
        import sys

        torch = sys.modules.get("torch")
        return bool(torch is not None and torch.cuda.is_available())

    def __exit__(self, *exc: object) -> None:
        if self._hwm:
            self.rss_mb = process_status_mb("VmHWM") or 0.0
        else:
            self._stop.set()
            if self._thread:
                self._thread.join()
        if self._cuda or self._cuda_available():
            import torch

            self.gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system): on a shared machine it
    tells how much work a stage was, whatever else was running."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
