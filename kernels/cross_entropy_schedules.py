"""Chunk schedules of the fused linear cross-entropy: the order and streams of its per-chunk GEMMs and row pass.

Why a module of its own: ``kernels.cross_entropy`` keeps the public function, the autograd glue and the chunk
size rule; this file holds the loops that issue each chunk's three steps (split at ~450 lines). Every schedule
computes the same values; they differ in what runs beside what (see ``kernels.cross_entropy``'s docstring for the
cost model and the A/B in ``tools/bench_ce_variants.py``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from padless.kernels.cross_entropy_rows import launch_ce_rows

__all__ = ["SCHEDULES", "Chunks", "parse_schedule", "run_overlap", "run_serial"]

# "serial", "overlap", or "overlap_sm<N>" (N SMs left free by cuBLAS for the row pass); kernels.cross_entropy says why.
SCHEDULES = ("serial", "overlap", "overlap_sm16")
_SCHEDULE_RE = re.compile(r"^(serial|overlap)(?:_sm(\d+))?$")


def parse_schedule(schedule: str) -> tuple[bool, int | None]:
    """(overlap, SM carve-out or None) of a schedule name; raises on anything else."""
    match = _SCHEDULE_RE.match(schedule) if isinstance(schedule, str) else None
    if match is None or (match.group(1) == "serial" and match.group(2) is not None):
        raise ValueError(
            f"fused_linear_cross_entropy: schedule={schedule!r}; expected 'serial', 'overlap' or 'overlap_sm<N>' "
            "(e.g. 'overlap_sm16': cuBLAS leaves 16 SMs to the row pass)."
        )
    return match.group(1) == "overlap", None if match.group(2) is None else int(match.group(2))


# One high-priority side stream per device for the row pass of the "overlap" schedules (created on first use).
_side_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        # High priority: the row pass of chunk i is on the critical path (chunk i's grad GEMM waits for it), so
        # its blocks should take SMs as soon as the concurrent logits GEMM frees any.
        _side_streams[index] = torch.cuda.Stream(device=index, priority=-1)
    return _side_streams[index]


@contextlib.contextmanager
def _sm_carveout(sms: int | None) -> Iterator[None]:
    """cuBLAS leaves ``sms`` SMs free inside the block (torch's experimental carve-out), restored after.

    torch applies the carve-out on its cuBLASLt path (``CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET``), so the block also
    prefers cuBLASLt for plain matmuls; both are process-wide settings, restored on exit (not thread-safe).
    """
    if sms is None:
        yield
        return
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    getter = getattr(torch._C, "_get_sm_carveout_experimental", None)
    if setter is None or getter is None:
        raise RuntimeError(
            f"fused_linear_cross_entropy: schedule 'overlap_sm{sms}' needs torch._C._set_sm_carveout_experimental "
            f"(torch {torch.__version__} lacks it); use schedule='overlap' or 'serial'."
        )
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    if not 0 <= sms < total:
        raise ValueError(
            f"fused_linear_cross_entropy: schedule 'overlap_sm{sms}' leaves {sms} of {total} SMs to the row pass; "
            f"expected fewer than {total} (e.g. 'overlap_sm16')."
        )
    previous, previous_blas = getter(), torch.backends.cuda.preferred_blas_library()
    setter(sms)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        setter(previous)
        torch.backends.cuda.preferred_blas_library(previous_blas)


class Chunks:
    """The chunk loop's shared state and its three steps (logits GEMM, row pass, gradient GEMMs) per chunk.

    ``keep`` (optional, int64 token indices): only those tokens are processed (``targets`` and ``row_loss`` are
    then already compacted to them); each chunk gathers its hidden rows (C x E) and scatters its grad_hidden rows
    back, so the skipped tokens cost no GEMM and no row pass. ``grad_hidden`` must then start zeroed.
    """

    def __init__(
        self, hidden, weight, targets, row_loss, grad_hidden, grad_weight, rows, ignore_index, softcap, keep=None
    ):
        self.hidden, self.weight, self.targets, self.row_loss = hidden, weight, targets, row_loss
        self.grad_hidden, self.grad_weight = grad_hidden, grad_weight
        self.ignore_index, self.softcap = ignore_index, softcap
        self.write_grad = grad_hidden is not None or grad_weight is not None
        self.keep = keep
        tokens = targets.shape[0]
        self.bounds = [(start, min(start + rows, tokens)) for start in range(0, tokens, rows)]
        self.weight_t = weight.t()  # a view: cuBLAS reads W (V, E) row-major as the transposed operand, no copy
        self._gathered: dict[int, torch.Tensor] = {}  # chunk -> its gathered hidden rows, until its grads ran

    def _hidden(self, index: int) -> torch.Tensor:
        start, stop = self.bounds[index]
        if self.keep is None:
            return self.hidden[start:stop]
        if index not in self._gathered:
            self._gathered[index] = self.hidden.index_select(0, self.keep[start:stop])
        return self._gathered[index]

    def logits(self, index: int, buffer: torch.Tensor) -> torch.Tensor:
        start, stop = self.bounds[index]
        logits = buffer[: stop - start]
        torch.mm(self._hidden(index), self.weight_t, out=logits)
        return logits

    def rows(self, index: int, logits: torch.Tensor) -> None:
        start, stop = self.bounds[index]
        launch_ce_rows(
            logits, self.targets[start:stop], self.row_loss[start:stop], self.ignore_index, self.softcap,
            self.write_grad,
        )  # fmt: skip

    def grads(self, index: int, dlogits: torch.Tensor) -> None:
        start, stop = self.bounds[index]
        hidden_c = self._hidden(index)
        if self.grad_hidden is not None:
            if self.keep is None:
                torch.mm(dlogits, self.weight, out=self.grad_hidden[start:stop])
            else:
                self.grad_hidden.index_copy_(0, self.keep[start:stop], torch.mm(dlogits, self.weight))
        if self.grad_weight is not None:
            if index == 0:
                torch.mm(dlogits.t(), hidden_c, out=self.grad_weight)  # no zero-fill pass over V x E
            else:
                self.grad_weight.addmm_(dlogits.t(), hidden_c)
        self._gathered.pop(index, None)


def run_serial(chunks: Chunks, rows: int, vocab: int) -> None:
    """One (C, V) buffer; logits GEMM, row pass, gradient GEMMs of each chunk in order on the current stream."""
    if not chunks.bounds:
        return
    buffer = torch.empty(rows, vocab, dtype=chunks.hidden.dtype, device=chunks.hidden.device)
    for index in range(len(chunks.bounds)):
        logits = chunks.logits(index, buffer)
        chunks.rows(index, logits)  # ``logits`` now holds dlogits
        chunks.grads(index, logits)


def run_overlap(chunks: Chunks, rows: int, vocab: int, sm_carveout: int | None) -> None:
    """Two (C, V) buffers; chunk i's row pass on a side stream beside chunk i+1's logits GEMM.

    Current stream: L0 L1 [wait R0] G0 L2 [wait R1] G1 L3 ... (L = logits GEMM, G = gradient GEMMs); side stream:
    R_i after an event recorded behind L_i. Buffer i % 2 is rewritten by L_{i+2}, which the current stream issues
    after G_i (which waited for R_i): no chunk's buffer is overwritten while read. Every side-stream op is waited
    for by the current stream before the next one and before return, so the caching allocator (which frees the
    buffers, targets and row_loss in the current stream's order) needs no ``record_stream``.
    """
    n_chunks = len(chunks.bounds)
    if n_chunks == 0:
        return
    device = chunks.hidden.device
    buffers = [
        torch.empty(rows, vocab, dtype=chunks.hidden.dtype, device=device) for _ in range(min(2, n_chunks))
    ]  # fmt: skip
    on_cuda = device.type == "cuda"
    main = torch.cuda.current_stream(device) if on_cuda else None
    side = _side_stream(device) if on_cuda else None
    logits = chunks.logits(0, buffers[0])
    for index in range(n_chunks):
        if on_cuda:
            side.wait_event(main.record_event())
            with torch.cuda.stream(side):
                chunks.rows(index, logits)
            done = side.record_event()
        else:
            chunks.rows(index, logits)  # CPU / interpreter: one stream, the same buffer bookkeeping
        following = None
        if index + 1 < n_chunks:
            # Only this GEMM runs beside a row pass, so only it leaves SMs free: a carve-out on every GEMM would
            # cost ~N/132 of all GEMM time, more than the whole row pass (~6%) at N = 16.
            with _sm_carveout(sm_carveout if on_cuda else None):
                following = chunks.logits(index + 1, buffers[(index + 1) % 2])
        if on_cuda:
            main.wait_event(done)
        chunks.grads(index, logits)
        logits = following
