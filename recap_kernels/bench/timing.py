"""How an optimizer step is timed, and the machine it is timed on.

A :class:`StepTimer` wraps one call per training step. On CPU each call is timed with
``time.perf_counter_ns``. On CUDA the device is synchronized first, so the forward/backward still
in flight is not billed to the step, and the call is bracketed by CUDA events, so the time covers
the host's dispatch and the kernels alike; the events are read once, after the last step, so
timing adds no synchronization inside the timed region. The host's own time in the call is kept
too: on CUDA it is the time to enqueue the step, which decides the speed of a small step.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch

QUANTILES = (0.5, 0.2, 0.8)  # p50 is the headline; p20/p80 show the spread (Liger's convention)


def quantiles(samples: list[float], qs: tuple[float, ...] = QUANTILES) -> tuple[float, ...]:
    """Linearly interpolated quantiles of ``samples`` (numpy's default method)."""
    if not samples:
        raise ValueError("no samples to summarize")
    ordered = sorted(samples)
    result = []
    for q in qs:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        result.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return tuple(result)


class StepTimer:
    """Times calls on ``device``; ``record=False`` runs a call untimed (warmup)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._cpu_ns: list[int] = []  # the host's time in each call (on CUDA: enqueueing the step)
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(self, fn: Callable[[], object], *, record: bool = True) -> None:
        if not record:
            fn()
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter_ns()
            fn()
            self._cpu_ns.append(time.perf_counter_ns() - t0)
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter_ns()
            fn()
            self._cpu_ns.append(time.perf_counter_ns() - t0)

    def samples_ms(self) -> list[float]:
        """Every recorded call's duration in milliseconds."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) for start, end in self._events]
        return self.host_samples_ms()

    def host_samples_ms(self) -> list[float]:
        """The host's time in every recorded call: on CUDA, the time to enqueue the step (no sync)."""
        return [ns / 1e6 for ns in self._cpu_ns]


def device_name(device: torch.device) -> str:
    """The GPU's name for CUDA, else the CPU model (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
