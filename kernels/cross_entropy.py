"""Fused linear cross-entropy: lm_head matmul + next-token cross-entropy without the full (T, V) logits.

Shapes: T packed tokens, E hidden size, V vocab, C chunk rows (tokens per chunk).

Why: at T = 16K tokens and V = 152K (Qwen3) the full logits are 4.6 GiB in bf16 and eager PyTorch keeps
several (T, V) copies alive (measured 27.8 GiB extra). Here the tokens are processed in chunks of C rows:

    logits_c = hidden_c @ weight^T                 cuBLAS, into a preallocated (C, V) buffer (``out=``), in the
                                                   inputs' dtype (bf16: half the bytes of fp32)
    one Triton pass over logits_c                  ``kernels.cross_entropy_rows``: per-row logsumexp in fp32, the
                                                   target's loss, and the logits' gradient written IN PLACE
    grad_hidden_c = dlogits_c @ weight             cuBLAS, straight into the (T, E) grad buffer (``out=``)
    grad_weight  += dlogits_c^T @ hidden_c         only when the weight trains (LoRA freezes lm_head: skipped)

The gradients are computed during the forward (nothing else needs the logits) and scaled in backward by the
incoming gradient of ``loss_sum`` (a 0-dim tensor: no host sync). The next-token shift is applied inside:
token t is scored against labels[t + 1]; the last token scores nothing.

Cost per C-row chunk at E = 4096, V = 151936, bf16 (C = 1024): two GEMMs of 2 C E V = 1.27 TFLOP each (1.65 ms
at the H200's ~774 TFLOP/s), each streaming the 1.16 GiB weight once, plus the row pass's 3 C V 2 = 0.93 GB
(0.23 ms at 4 TB/s). So ~93% of the time is GEMM, ~6% row pass, the rest launch gaps. The GEMM count and shape
are fixed by the math; what a schedule can change is (a) whether the row pass runs alone on the GPU or beside a
GEMM and (b) the GEMM shapes (C).

Schedules (``schedule=`` keyword; ``set_default_schedule`` changes the default, no env var; the loops live in
``kernels.cross_entropy_schedules``):
* ``"serial"`` (default): one (C, V) buffer, everything on the current stream in order. Row pass on the
  critical path: 16 x 0.23 ms = 3.7 ms at T = 16K.
* ``"overlap"``: two (C/2, V) buffers (the same bytes) and the row pass on a second, high-priority CUDA stream,
  so chunk i's row pass runs while chunk i+1's logits GEMM runs (stream order L0 L1 G0 L2 G1 ..., events
  between). At most saves the row pass (3.7 ms at 16K, 6%); costs 2x the launches and GEMMs of C/2 rows.
  Whether the two kernels really share the GPU depends on cuBLAS leaving SMs free, hence
* ``"overlap_smN"``: ``"overlap"`` with cuBLAS told to leave N SMs free for the row pass (torch's experimental
  SM carve-out, with cuBLASLt preferred, set and restored around each logits GEMM that runs beside a row pass;
  the gradient GEMMs keep every SM). Worth it only if the row pass on N SMs moves its bytes at well above its
  all-SM rate per SM (~30 GB/s per SM at 4 TB/s): the logits GEMMs lose ~N/132 of their speed meanwhile.
On a CPU (Triton interpreter) all schedules run in one stream; the two-buffer bookkeeping is still exercised.

Memory and chunk size (``chunk_bytes`` = all logits buffers together; default ``None`` = automatic, 372 MiB): C =
1280 rows at V = 151936 bf16 (4K tokens: 4 x 1024, 16K: 12 x 1280 + 1024). Extra memory = the buffers + grad_hidden
(T x E) + O(T) vectors: 0.32 GiB at T = 4K, 0.49 GiB at 16K (H200, session 3; budget 0.5 GiB), plus grad_weight (V x
E, in the weight's dtype) when the weight trains. 1280 rather than 1024 rows: 63.9 vs 65.2 ms at 16K with a frozen
weight, 98.4 vs 100.8 ms trainable (Liger 66.5 / 109.7; ``tools/bench_ce_variants.py``). grad_weight is accumulated
in place in that one buffer (``torch.mm(out=)`` for the first chunk, ``addmm_`` after): no fp32 (V, E) accumulator.
Its rounding: one per chunk in bf16 (as Liger does); an fp32 weight accumulates in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from padless.kernels.cross_entropy_rows import ce_row_config, launch_ce_rows
from padless.kernels.cross_entropy_schedules import SCHEDULES, Chunks, parse_schedule, run_overlap, run_serial

__all__ = [
    "FROZEN_WEIGHT_CHUNK_BYTES",
    "SCHEDULES",
    "auto_chunk_bytes",
    "default_schedule",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "set_default_schedule",
]

# Older names, used by tools/bench_kernels_ce.py; the kernel lives in kernels.cross_entropy_rows.
_launch_ce_rows = launch_ce_rows
_ce_row_config = ce_row_config

# The logits buffer(s), frozen or trainable weight (the name is older than that rule). 372 MiB gives C = 1280 rows
# at V = 151936 in bf16 (fewer, deeper chunks: measured faster than 1024 at 16K tokens on the H200), and at T = 16K
# the buffer plus grad_hidden (128 MiB) stays under 0.5 GiB (0.49 measured).
FROZEN_WEIGHT_CHUNK_BYTES = 372 * 2**20
# Chunk rows are rounded down to a multiple of this (matmul tile size) when the budget allows it.
_ROW_QUANTUM = 128

_default_schedule = "serial"


def set_default_schedule(schedule: str) -> None:
    """Make ``schedule`` the default of ``fused_linear_cross_entropy`` (for an A/B or a chosen default)."""
    global _default_schedule
    parse_schedule(schedule)
    _default_schedule = schedule


def default_schedule() -> str:
    """The schedule ``fused_linear_cross_entropy`` uses when none is passed."""
    return _default_schedule


def auto_chunk_bytes(weight: torch.Tensor, weight_trains: bool) -> int:
    """The default logits-buffer size: 372 MiB (1280 rows at V = 151936 bf16), whether or not the weight trains.

    Run 3 let the buffer grow to grad_weight's size when the weight trains (one 1.16 GiB chunk at T = 4K): 1.19
    GiB extra, over the 0.5 GiB budget. With 372 MiB the extra is the buffer + grad_hidden (0.32 GiB at 4K, 0.49
    at 16K); grad_weight is then accumulated by one ``addmm_`` per chunk, in place in the weight's dtype.
    """
    del weight, weight_trains  # kept in the signature: callers pass both, and the rule may depend on them again
    return FROZEN_WEIGHT_CHUNK_BYTES


def _chunk_rows(tokens: int, vocab: int, element_size: int, chunk_bytes: int) -> int:
    """Rows per chunk: as many as fit ``chunk_bytes`` of logits, rounded to the matmul tile, split evenly."""
    budget_rows = max(1, chunk_bytes // (vocab * element_size))
    if budget_rows >= _ROW_QUANTUM:
        budget_rows -= budget_rows % _ROW_QUANTUM
    if tokens <= budget_rows:
        return max(tokens, 1)
    # Even split (e.g. 4096 tokens at 1024 rows: 4 equal chunks, not 3 full and a sliver).
    n_chunks = triton.cdiv(tokens, budget_rows)
    rows = triton.cdiv(tokens, n_chunks)
    if rows >= _ROW_QUANTUM:
        rows = min(budget_rows, triton.cdiv(rows, _ROW_QUANTUM) * _ROW_QUANTUM)
    return rows


def _counted_first(counted: torch.Tensor) -> torch.Tensor:
    """Token indices, counted ones first, each group in order: a permutation built from two prefix sums and a
    scatter (no sort, no host sync, capturable in a CUDA graph)."""
    n_counted = counted.sum()
    rank_counted = torch.cumsum(counted, 0) - 1
    rank_ignored = n_counted + torch.cumsum(~counted, 0) - 1
    slot = torch.where(counted, rank_counted, rank_ignored)
    order = torch.empty_like(slot)
    return order.scatter_(0, slot, torch.arange(counted.numel(), device=counted.device))


def _forward_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    chunk_bytes: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    schedule: str = "serial",
    skip_ignored: bool = False,
    counted_bound: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunk loop: (loss_sum, n_counted, grad_hidden or None, grad_weight or None), gradients unscaled."""
    overlap, sm_carveout = parse_schedule(schedule)
    tokens, vocab = hidden.shape[0], weight.shape[0]
    # Shifted targets on the device (no sync): token t is scored against labels[t + 1]; the last scores nothing.
    targets = labels.new_full((tokens,), ignore_index)
    targets[:-1] = labels[1:]
    n_counted = (targets != ignore_index).sum()
    keep = None
    if skip_ignored and counted_bound is None:
        counted_bound = int(n_counted)  # one host sync: the exact count
    if counted_bound is not None and counted_bound >= tokens:
        counted_bound = None  # every token: the plain path (nothing to skip, nothing to check)
    if counted_bound is not None:
        # No sync: the counted tokens first (in order), then the ignored ones; the first ``counted_bound`` rows
        # (>= the count) are processed, the ignored among them score 0.
        bound = max(int(counted_bound), 0)
        keep = _counted_first(targets != ignore_index)[:bound]
        targets = targets.index_select(0, keep)
    row_loss = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    if not need_grad_hidden:
        grad_hidden = None
    elif keep is None:
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    else:
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)  # skipped rows stay 0
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_grad_weight else None

    # "overlap" splits the same bytes over two buffers.
    rows = _chunk_rows(targets.shape[0], vocab, hidden.element_size(), chunk_bytes // 2 if overlap else chunk_bytes)
    chunks = Chunks(hidden, weight, targets, row_loss, grad_hidden, grad_weight, rows, ignore_index, softcap, keep)
    if overlap:
        run_overlap(chunks, rows, vocab, sm_carveout)
    else:
        run_serial(chunks, rows, vocab)
    if grad_weight is not None and not chunks.bounds:
        grad_weight.zero_()
    loss_sum = row_loss.sum()
    if counted_bound is not None:  # a bound below the true count would drop tokens: make it loud, not wrong
        loss_sum = torch.where(n_counted > bound, torch.full_like(loss_sum, float("nan")), loss_sum)
    return loss_sum, n_counted, grad_hidden, grad_weight


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------------------------


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        softcap: float | None,
        chunk_bytes: int,
        need_grad_hidden: bool,
        need_grad_weight: bool,
        schedule: str,
        skip_ignored: bool,
        counted_bound: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Autocast would refuse the ``out=`` matmuls and change the logits' dtype; the inputs' dtype rules here.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss_sum, n_counted, grad_hidden, grad_weight = _forward_and_grads(
                hidden, weight, labels, ignore_index, softcap, chunk_bytes, need_grad_hidden, need_grad_weight,
                schedule, skip_ignored, counted_bound,
            )  # fmt: skip
        # Intermediates, not inputs/outputs: kept on ctx so backward can scale them in place and drop them.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.mark_non_differentiable(n_counted)
        return loss_sum, n_counted

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor | None, _grad_count: torch.Tensor | None):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice through the same graph; its gradients are "
                "computed in the forward and scaled in place once. Call the function again instead of "
                "backward(retain_graph=True)."
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_loss is None:
            return (None,) * 11
        # Scale by the incoming gradient of loss_sum, a 0-dim device tensor: in place, no host sync.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_bytes: int | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
            "2-D, (T, E) and (V, E); flatten the batch first (hidden.reshape(-1, E))."
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear_cross_entropy: hidden size {hidden.shape[1]} != weight's {weight.shape[1]}; expected "
            "hidden (T, E) and weight (V, E) (lm_head.weight, not its transpose)."
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"fused_linear_cross_entropy: labels {tuple(labels.shape)} must be 1-D with T = {hidden.shape[0]} "
            "entries (unshifted Hugging Face labels, one per token)."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"fused_linear_cross_entropy: labels dtype {labels.dtype}; expected an integer dtype (int64).")
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise TypeError(
            f"fused_linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} must share one floating "
            "dtype (bf16, fp16 or fp32); cast hidden to lm_head.weight.dtype first."
        )
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(
            f"fused_linear_cross_entropy: hidden on {hidden.device}, weight on {weight.device}, labels on "
            f"{labels.device}; move all three to one device."
        )
    if chunk_bytes is not None and chunk_bytes <= 0:
        raise ValueError(f"fused_linear_cross_entropy: chunk_bytes={chunk_bytes}; expected a positive byte count.")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    *,
    chunk_bytes: int | None = None,
    schedule: str | None = None,
    skip_ignored: bool = False,
    counted_bound: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy losses of ``hidden @ weight.T`` and the count of counted tokens.

    hidden (T, E) final-norm hidden states; weight (V, E) lm_head weight (may be a tied embedding, frozen or
    trainable); labels (T,) integer, unshifted Hugging Face labels: token t is scored against labels[t + 1], the
    last token scores nothing, ``ignore_index`` labels are not counted. ``softcap``: Gemma 2's
    final_logit_softcapping (logits -> softcap * tanh(logits / softcap)). ``chunk_bytes``: size of the one
    (C, V) logits buffer (both buffers together for the overlap schedules); ``None`` picks ``auto_chunk_bytes``:
    372 MiB (frozen or trainable weight). Smaller saves memory, larger means fewer, deeper matmuls and fewer
    grad_weight read-modify-writes. ``schedule``: ``"serial"``, ``"overlap"`` or ``"overlap_sm<N>"`` (module
    docstring); ``None`` = ``default_schedule()``. Every schedule computes the same values. ``skip_ignored``:
    process only the counted tokens (gathered chunk by chunk), so ignored ones (prompt tokens in SFT, often
    30-60%) cost no GEMM and no row pass; costs one host sync per call (not CUDA-graph capturable), hence off
    by default. ``counted_bound``: the same skipping without the sync, for callers that know on the host an
    upper bound of the counted tokens (the trainer: the micro-batch's trainable-token count from the shards):
    the first ``counted_bound`` tokens of a stable counted-first order get the GEMMs; a bound below the true
    count makes loss_sum NaN rather than silently dropping tokens.

    Returns (loss_sum fp32 0-dim, n_counted int64 0-dim); differentiable in loss_sum w.r.t. hidden and weight.
    Never materialises the (T, V) logits and never syncs with the host (except with ``skip_ignored`` and no
    ``counted_bound``). An
    out-of-range label (not ``ignore_index``, outside [0, V)) makes loss_sum NaN. Gradients are computed in the
    forward when grad mode is on and hidden or weight requires grad; a frozen weight skips its matmul. They stay
    alive with the graph (T x E, plus V x E when the weight trains) until backward or until loss_sum is freed.
    Backward may run once per call (it scales the stored gradients in place).
    """
    _check_inputs(hidden, weight, labels, chunk_bytes)
    if counted_bound is not None and (isinstance(counted_bound, bool) or not int(counted_bound) >= 0):
        raise ValueError(
            f"fused_linear_cross_entropy: counted_bound={counted_bound!r}; expected None or an int >= the number of "
            "counted tokens (e.g. the micro-batch's trainable-token count)."
        )
    schedule = _default_schedule if schedule is None else schedule
    parse_schedule(schedule)
    grad_on = torch.is_grad_enabled()
    need_grad_hidden = grad_on and hidden.requires_grad
    need_grad_weight = grad_on and weight.requires_grad
    return _FusedLinearCrossEntropy.apply(
        hidden,
        weight,
        labels,
        int(ignore_index),
        None if softcap is None else float(softcap),
        auto_chunk_bytes(weight, need_grad_weight) if chunk_bytes is None else int(chunk_bytes),
        need_grad_hidden,
        need_grad_weight,
        schedule,
        bool(skip_ignored),
        None if counted_bound is None else int(counted_bound),
    )


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch, differentiable reference: materialises the full (T, V) logits.

    hidden (T, E), weight (V, E), labels (T,) unshifted Hugging Face labels. Token t is scored against
    labels[t + 1] (the shift is inside); the last token scores nothing; labels equal to ``ignore_index`` are
    not counted. Logits are computed in fp32 (fp64 for fp64 inputs), optionally soft-capped as
    ``softcap * tanh(logits / softcap)`` (Gemma 2's final_logit_softcapping).

    Returns (loss_sum, n_counted): the fp32 (fp64 for fp64 inputs) sum of token losses and the int64 count of
    counted tokens, both 0-dim. Normalisation is the caller's job.
    """
    compute = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    logits = hidden.to(compute) @ weight.to(compute).T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    targets = labels.new_full(labels.shape, ignore_index)
    targets[:-1] = labels[1:]
    loss_sum = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    n_counted = (targets != ignore_index).sum()
    return loss_sum, n_counted
