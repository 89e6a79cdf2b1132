"""Timers and memory probes for tools/bench_kernels.py: CUDA-graph replay, plain do_bench, peak memory.

Why two timers: a sub-0.1 ms kernel timed by ``triton.testing.do_bench`` measures the host's launch path
(Python checks, allocations, Triton's argument binding, the autograd engine) as much as the GPU: run 1 showed a
~0.08-0.1 ms floor for every implementation (RMSNorm at T = 4K: 0.093 ms forward for 17 us of traffic). The
graph timer captures N calls in one ``torch.cuda.CUDAGraph`` and times replays with CUDA events, so only
device time is left: what the bandwidth targets are about. The plain time is still reported, because a
training step pays the launch path too whenever the GPU is not already ahead of the host.

L2: the H200 has ~50-60 MB of L2. Graph replays call the same kernels back to back, so inputs would stay
cached between calls; ``rotation_sets`` gives each call its own inputs until the data touched between two uses
of one set is >= 4 x L2 (``do_bench`` flushes L2 itself by zeroing a buffer before each call).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "GiB",
    "Row",
    "Timer",
    "extra_memory_gib",
    "peak_minus_inputs_gib",
    "rotation_sets",
    "tbps",
    "try_import",
]

GiB = 2**30
_DEFAULT_L2_BYTES = 60 * 2**20
# Calls per replay: enough that one replay lasts >= ~2 ms (far above event resolution and the replay's own
# launch), at most 20 (at the smallest shapes 20 x ~10 us); a 10 ms eager call is captured once per set.
_MIN_GRAPH_CALLS = 20
_TARGET_REPLAY_MS = 2.0
_GRAPH_REPLAYS = 5
_MAX_SETS = 8


@dataclass
class Row:
    """One implementation of one kernel at one T. ``g_*``: CUDA-graph (device) time; ``p_*``: plain do_bench."""

    kernel: str
    T: int
    impl: str
    g_fwd_ms: float | None = None
    g_bwd_ms: float | None = None
    g_fwd_tbps: float | None = None
    g_bwd_tbps: float | None = None
    p_fwd_ms: float | None = None
    p_bwd_ms: float | None = None
    p_fwd_tbps: float | None = None
    p_bwd_tbps: float | None = None
    extra_gib: float | None = None
    sets: int = 1
    note: str = ""


def tbps(nbytes: float, ms: float | None) -> float | None:
    return None if not ms or ms <= 0 else nbytes / (ms * 1e-3) / 1e12


def try_import(module: str):
    import importlib

    try:
        return importlib.import_module(module), ""
    except Exception as error:  # an optional baseline: any failure to import means "n/a", said in the note
        return None, f"{module}: {type(error).__name__}: {error}"[:160]


def l2_bytes(device) -> int:
    import torch

    if device.type != "cuda":
        return _DEFAULT_L2_BYTES
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _DEFAULT_L2_BYTES)


def rotation_sets(bytes_per_call: int, device) -> int:
    """Input sets to cycle through so that >= 4 x L2 bytes are touched between two uses of one set (1..8)."""
    return max(1, min(_MAX_SETS, math.ceil(4 * l2_bytes(device) / max(1, bytes_per_call))))


class Timer:
    """``plain(fn)``: do_bench median (GPU) or wall clock (CPU); ``graph(fns)``: ms per call from graph replay.

    On the CPU (``--quick``, Triton interpreter) ``graph`` runs each function once eagerly and reports wall clock,
    so the smoke run exercises the same closures and set rotation as the GPU run.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def plain(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            import triton.testing

            # 10 ms warm-up and 50 ms of reps: hundreds of samples for the sub-ms kernels, and the whole table
            # stays inside the 100 s device budget.
            return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
        return self._wall(fn, reps=1)

    def slow(self, fn: Callable[[], object], reps: int = 3) -> float:
        """Median of ``reps`` event-timed calls after one warm-up: for 5-150 ms calls (fused linear CE)."""
        if not self.cuda:
            return self._wall(fn, reps=1)
        import torch

        fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def graph(self, fns: Sequence[Callable[[], object]], estimate_ms: float | None = None) -> float:
        """Milliseconds per call: ``fns[i % len(fns)]()`` for i < N captured in one CUDA graph, replays timed.

        ``estimate_ms`` (e.g. the plain time of one call) sizes N: about 2 ms of work per replay, 20 calls at most.

        Each fn must be capturable: no host sync (``.item()``, ``.cpu()``, data-dependent shapes), inputs
        allocated before capture. Allocations inside the capture come from the graph's private pool.
        """
        if not self.cuda:
            return self._wall(lambda: [fn() for fn in fns], reps=1) / len(fns)
        import torch

        n = len(fns)
        wanted = _MIN_GRAPH_CALLS if not estimate_ms else math.ceil(_TARGET_REPLAY_MS / estimate_ms)
        calls = n * math.ceil(max(1, min(_MIN_GRAPH_CALLS, wanted)) / n)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up on the capture stream: Triton compiles, autograd/allocator state settles
                for fn in fns:
                    fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # capture_begin/end rather than ``torch.cuda.graph``: that one runs gc.collect() per capture (tens of ms).
        with torch.cuda.stream(side):
            graph.capture_begin()
            try:
                for i in range(calls):
                    fns[i % n]()
            finally:
                graph.capture_end()  # always leave capture mode, or every later CUDA call fails
        try:
            graph.replay()
            torch.cuda.synchronize()
            times = []
            for _ in range(_GRAPH_REPLAYS):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / calls)
        finally:
            del graph
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return statistics.median(times)

    @staticmethod
    def _wall(fn: Callable[[], object], reps: int) -> float:
        # The interpreter compiles nothing, so there is no warm-up.
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def peak_minus_inputs_gib(fn: Callable[[], object], cuda: bool) -> float | None:
    """Peak allocated during one call minus what was allocated before it (the live inputs), in GiB; None on CPU.

    Everything the call creates counts, including the gradients it returns.
    """
    if not cuda:
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / GiB


def extra_memory_gib(fn: Callable[[], object], returned_bytes: int, cuda: bool) -> float | None:
    """Peak memory one call allocates beyond its inputs and the gradients it returns (GiB); None on the CPU."""
    peak = peak_minus_inputs_gib(fn, cuda)
    return None if peak is None else max(0.0, peak - returned_bytes / GiB)
