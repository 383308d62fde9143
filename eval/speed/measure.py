"""Instruments of the timing protocol: the device, a clock synchronised with it, the decoder-stack clock
(`LayerClock`), peak memory (CUDA allocator statistics, or the CPU allocator events of the torch profiler), and
which attention statistics pruners ask for (`record_statistics`). Used by the cases, the rows and the scaling study.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

MiB = 2.0**20


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """A timestamp after every queued kernel has finished (synchronised timing on CUDA)."""
    synchronize(device)
    return time.perf_counter()


class LayerClock:
    """Times the decoder stack inside a call: hooks on the first layer's input and the last layer's output."""

    def __init__(self, layers, device: torch.device) -> None:
        self.device = device
        self.start: float | None = None
        self.end: float | None = None
        self._handles = [
            layers[0].register_forward_pre_hook(self._on_start),
            layers[-1].register_forward_hook(self._on_end),
        ]

    def _on_start(self, module, args) -> None:
        self.start = clock(self.device)

    def _on_end(self, module, args, output) -> None:
        self.end = clock(self.device)

    def reset(self) -> None:
        self.start = self.end = None

    @property
    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("the decoder layers did not run in the timed call")
        return self.end - self.start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _profile_peak_bytes(prof) -> int | None:
    """Maximum prefix sum of the CPU allocator's (de)allocation events recorded by the profiler."""
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # pragma: no cover - profiler internals moved
        return None
    records = sorted(
        ((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """``with peak_memory(device) as box: ...``; afterwards ``box["bytes"]`` is the step's peak (see the docstring)."""
    box: dict[str, int | None] = {"bytes": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield box
        synchronize(device)
        box["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto logs "profiler_start/stop" lines on the C stderr at every start and stop
        prof.start()
    try:
        yield box
    finally:
        with _quiet_stderr():
            prof.stop()
    box["bytes"] = _profile_peak_bytes(prof)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C-level logging) for the duration of the block only."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def mb(nbytes: int | float | None) -> float | None:
    return None if nbytes is None else nbytes / MiB


@contextlib.contextmanager
def record_statistics():
    """Record which attention statistics pruners ask `VisualTokens` for (one untimed call; methods restored)."""
    from vtprune.tokens import VisualTokens

    used: set[str] = set()
    originals = {name: getattr(VisualTokens, name) for name in ("cls_attention", "global_attention", "keys")}

    def wrap(name, method):
        def recorded(self, layer):
            used.add(name)
            return method(self, layer)

        return recorded

    try:
        for name, method in originals.items():
            setattr(VisualTokens, name, wrap(name, method))
        yield used
    finally:
        for name, method in originals.items():
            setattr(VisualTokens, name, method)
