"""Fused linear cross-entropy: lm_head matmul + next-token cross-entropy without the full (T, V) logits.

Shapes: T packed tokens, E hidden size, V vocab, C chunk rows (tokens per chunk).

Why: at T = 16K tokens and V = 152K (Qwen3) the full logits are 4.6 GiB in bf16 and eager PyTorch keeps
several (T, V) copies alive (measured 27.8 GiB extra). Here the tokens are processed in chunks of C rows:

    logits_c = hidden_c @ weight^T                 cuBLAS, into a preallocated (C, V) buffer (``out=``), in the
                                                   inputs' dtype (bf16: half the bytes of fp32)
    one Triton pass over logits_c                  ``_ce_rows_kernel``: per-row logsumexp in fp32, the target's
                                                   loss, and the logits' gradient written IN PLACE
    grad_hidden_c = dlogits_c @ weight             cuBLAS, straight into the (T, E) grad buffer (``out=``)
    grad_weight  += dlogits_c^T @ hidden_c         only when the weight trains (LoRA freezes lm_head: skipped)

The gradients are computed during the forward (nothing else needs the logits) and scaled in backward by the
incoming gradient of ``loss_sum`` (a 0-dim tensor: no host sync). The next-token shift is applied inside:
token t is scored against labels[t + 1]; the last token scores nothing.

Cost per C-row chunk at E = 4096, V = 151936, bf16 (C = 1024): two GEMMs of 2 C E V = 1.27 TFLOP each (1.65 ms
at the H200's ~774 TFLOP/s), each streaming the 1.16 GiB weight once, plus the row pass's 3 C V 2 = 0.93 GB
(0.23-0.28 ms at 3.4-4.0 TB/s measured). So ~93% of the time is GEMM, ~6% row pass, the rest launch gaps.

Memory and chunk size (``chunk_bytes``, default ``DEFAULT_CHUNK_BYTES`` = 372 MiB): C = 1280 rows at V = 151936
bf16 (4K tokens: 4 x 1024, 16K: 12 x 1280 + 1024). Extra memory = the buffer + grad_hidden (T x E) + O(T)
vectors: 0.32 GiB at T = 4K, 0.49 GiB at 16K (H200), plus grad_weight (V x E, in the weight's dtype) when the
weight trains. 1280 rather than 1024 rows: 63.9 vs 65.2 ms at 16K with a frozen weight, 98.4 vs 100.8 ms
trainable (Liger-Kernel 66.5 / 109.7, H200). grad_weight is accumulated in place in that one buffer
(``torch.mm(out=)`` for the first chunk, ``addmm_`` after): no fp32 (V, E) accumulator. Its rounding: one per
chunk in bf16 (as Liger does); an fp32 weight accumulates in fp32.

Offsets: the row kernel widens the row index to int64 before multiplying by the row stride (C x V may pass
2**31); column offsets within a row stay int32 (V < 2**31).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import LAUNCH_OPTIONS

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "check_loss_inputs",
    "counted_first",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
]

# The logits buffer: 372 MiB gives C = 1280 rows at V = 151936 in bf16 (fewer, deeper chunks: faster than 1024 at
# 16K tokens on the H200), and at T = 16K the buffer plus grad_hidden (128 MiB) stays under 0.5 GiB.
DEFAULT_CHUNK_BYTES = 372 * 2**20
# Chunk rows are rounded down to a multiple of this (matmul tile size) when the budget allows it.
_ROW_QUANTUM = 128


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _tanh(x):
    # tanh from exp: saturates correctly at +-inf (exp -> inf gives 1, exp -> 0 gives -1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # (C, V) chunk logits, row stride ``stride_row``; overwritten with dlogits when WRITE_GRAD
    targets_ptr,  # (C,) int, already shifted: targets[r] = labels[r + 1]
    row_loss_ptr,  # (C,) fp32 out: the token's loss, 0 for ignored tokens, NaN for out-of-range targets
    stride_row,
    ignore_index,
    softcap,
    # V is constexpr: fixed per model (one compile), and under TRITON_INTERPRET a runtime loop bound fails
    # (numpy 2.4 refuses int() of the interpreter's 1-element scalars).
    V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SEGMENT: tl.constexpr,  # pass 1 keeps one running (max, sum) per SEGMENT contiguous columns of a block
):
    """One program per token row: pass 1 (max, sum of exp) over the row, pass 2 the gradient in place.

    Pass 1 views each block of BLOCK_V columns as (BLOCK_V / SEGMENT, SEGMENT) and keeps a running max and sum
    per segment lane: the per-block reductions stay inside a thread or between neighbouring lanes of a warp
    (register shuffles), so the loop has no shared-memory reduction and no barrier that would hold the next
    loads back. The lanes are combined once per row. Cost: one extra exp per segment per block (1 / SEGMENT
    more exps).
    Pass 2 walks the blocks last to first, so its first re-reads are the blocks pass 1 read last (the likeliest
    still in L2).
    """
    # Int64 row index: C * V passes 2**31 for big chunks.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    N_BLOCKS: tl.constexpr = (V + BLOCK_V - 1) // BLOCK_V
    if target == ignore_index:
        # Ignored token: loss 0, gradient row 0 (one write pass, no reads).
        tl.store(row_loss_ptr + row, 0.0)
        if WRITE_GRAD:
            zero = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                tl.store(row_ptr + start + cols, zero, mask=start + cols < V)
    else:
        # Pass 1: running max and sum of exp per segment lane, in fp32. Masked columns (past V) hold a finite
        # stand-in for -inf: exp of it is 0 against any real max, and a lane that has seen only masked columns
        # (V < BLOCK_V) never makes inf - inf = NaN; its count is wiped by exp(-huge) when lanes are combined.
        NEG: tl.constexpr = -3.0e38
        LANES: tl.constexpr = BLOCK_V // SEGMENT
        offs = tl.arange(0, LANES)[:, None] * SEGMENT + tl.arange(0, SEGMENT)[None, :]
        m = tl.full([LANES], NEG, dtype=tl.float32)
        s = tl.zeros([LANES], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            mask = start + offs < V
            z = tl.load(row_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = tl.where(mask, z, NEG)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
        m_row = tl.max(m, axis=0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
        # The target's logit, read before pass 2 overwrites the row. Out-of-range targets give a NaN loss (no
        # host sync to raise on; NaN makes the bad label visible) and read column 0 instead of stray memory.
        in_range = (target >= 0) & (target < V)
        z_t = tl.load(row_ptr + tl.where(in_range, target, 0)).to(tl.float32)
        if HAS_SOFTCAP:
            z_t = softcap * _tanh(z_t / softcap)
        tl.store(row_loss_ptr + row, tl.where(in_range, lse - z_t, float("nan")))
        if WRITE_GRAD:
            # Pass 2, last block first: d loss / d logit = softmax - onehot, times d softcap / d logit = 1 - tanh^2.
            for i in range(0, N_BLOCKS):
                start = (N_BLOCKS - 1 - i) * BLOCK_V
                mask = start + cols < V
                x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(x / softcap)
                    g = tl.exp(softcap * t - lse)
                    g = tl.where(start + cols == target, g - 1.0, g) * (1.0 - t * t)
                else:
                    g = tl.exp(x - lse)
                    g = tl.where(start + cols == target, g - 1.0, g)
                tl.store(row_ptr + start + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- host launchers
def _row_config(vocab: int) -> tuple[int, int, int]:
    """(BLOCK_V, SEGMENT, num_warps) of the row kernel, a pure function of the vocab size and logits dtype.

    4096 columns x 8 warps: 16 values per thread (two 16-byte bf16 loads), 32 registers on sm_90 (Triton 3.6
    offline compile; 38 with softcap), so 1024 rows of a chunk are all resident at once (~7.75 per SM, 8 fit by
    threads; the default 1280-row chunk adds a partial second wave, cheaper than its deeper GEMMs save) with 8
    KB of loads per row per block: ~62 KB in flight per SM, against the ~32 KB a saturated HBM needs.
    SEGMENT 16: pass 1 reduces each block over 16 contiguous columns (within a thread and its lane neighbour).
    """
    block = min(4096, triton.next_power_of_2(vocab))
    return block, min(16, block), 8 if block >= 4096 else 4


def _launch_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_loss: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    write_grad: bool,
) -> None:
    """Row-wise CE over a (C, V) logits chunk; writes row_loss (C,) and, if asked, dlogits into ``logits``."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    block, segment, num_warps = _row_config(vocab)
    _ce_rows_kernel[(rows,)](
        logits,
        targets,
        row_loss,
        logits.stride(0),
        ignore_index,
        1.0 if softcap is None else float(softcap),
        V=vocab,
        HAS_SOFTCAP=softcap is not None,
        WRITE_GRAD=write_grad,
        BLOCK_V=block,
        SEGMENT=segment,
        num_warps=num_warps,
        **LAUNCH_OPTIONS,
    )


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


def counted_first(counted: torch.Tensor) -> torch.Tensor:
    """Token indices, counted ones first, each group in order: a permutation built from two prefix sums and a
    scatter (no sort, no host sync, capturable in a CUDA graph)."""
    n_counted = counted.sum()
    rank_counted = torch.cumsum(counted, 0) - 1
    rank_ignored = n_counted + torch.cumsum(~counted, 0) - 1
    slot = torch.where(counted, rank_counted, rank_ignored)
    order = torch.empty_like(slot)
    return order.scatter_(0, slot, torch.arange(counted.numel(), device=counted.device))


def _run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_loss: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    keep: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    chunk_bytes: int,
) -> None:
    """Per chunk, in order on the current stream: logits GEMM into one (C, V) buffer, the row pass (loss, and
    dlogits in place), then the gradient GEMMs. ``keep`` (int64 token indices, or None for all tokens): only those
    tokens are processed (``targets`` and ``row_loss`` are already compacted to them); each chunk gathers its
    hidden rows and scatters its grad_hidden rows back, which must then start zeroed."""
    tokens, vocab = targets.shape[0], weight.shape[0]
    if tokens == 0:
        if grad_weight is not None:
            grad_weight.zero_()
        return
    rows = _chunk_rows(tokens, vocab, hidden.element_size(), chunk_bytes)
    buffer = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
    weight_t = weight.t()  # a view: cuBLAS reads W (V, E) row-major as the transposed operand, no copy
    write_grad = grad_hidden is not None or grad_weight is not None
    for index, start in enumerate(range(0, tokens, rows)):
        stop = min(start + rows, tokens)
        hidden_c = hidden[start:stop] if keep is None else hidden.index_select(0, keep[start:stop])
        logits = buffer[: stop - start]
        torch.mm(hidden_c, weight_t, out=logits)
        _launch_rows(logits, targets[start:stop], row_loss[start:stop], ignore_index, softcap, write_grad)
        # ``logits`` now holds dlogits.
        if grad_hidden is not None:
            if keep is None:
                torch.mm(logits, weight, out=grad_hidden[start:stop])
            else:
                grad_hidden.index_copy_(0, keep[start:stop], torch.mm(logits, weight))
        if grad_weight is not None:
            if index == 0:
                torch.mm(logits.t(), hidden_c, out=grad_weight)  # no zero-fill pass over V x E
            else:
                grad_weight.addmm_(logits.t(), hidden_c)


def _forward_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    chunk_bytes: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    counted_bound: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss_sum, n_counted, grad_hidden or None, grad_weight or None), gradients unscaled."""
    tokens = hidden.shape[0]
    # Shifted targets on the device (no sync): token t is scored against labels[t + 1]; the last scores nothing.
    targets = labels.new_full((tokens,), ignore_index)
    targets[:-1] = labels[1:]
    n_counted = (targets != ignore_index).sum()
    if counted_bound is not None and counted_bound >= tokens:
        counted_bound = None  # every token: the plain path (nothing to skip, nothing to check)
    keep = None
    if counted_bound is not None:
        # No sync: the counted tokens first (in order), then the ignored ones; the first ``counted_bound`` rows
        # (>= the count) are processed, the ignored among them score 0.
        keep = counted_first(targets != ignore_index)[:counted_bound]
        targets = targets.index_select(0, keep)
    row_loss = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    if not need_grad_hidden:
        grad_hidden = None
    elif keep is None:
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    else:
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)  # skipped rows stay 0
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_grad_weight else None
    _run_chunks(hidden, weight, targets, row_loss, grad_hidden, grad_weight, keep, ignore_index, softcap, chunk_bytes)
    loss_sum = row_loss.sum()
    if counted_bound is not None:  # a bound below the true count would drop tokens: make it loud, not wrong
        loss_sum = torch.where(n_counted > counted_bound, torch.full_like(loss_sum, float("nan")), loss_sum)
    return loss_sum, n_counted, grad_hidden, grad_weight


# ------------------------------------------------------------------------------------------ autograd.Function
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
        counted_bound: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Autocast would refuse the ``out=`` matmuls and change the logits' dtype; the inputs' dtype rules here.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss_sum, n_counted, grad_hidden, grad_weight = _forward_and_grads(
                hidden, weight, labels, ignore_index, softcap, chunk_bytes, need_grad_hidden, need_grad_weight,
                counted_bound,
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
            return (None,) * 9
        # Scale by the incoming gradient of loss_sum, a 0-dim device tensor: in place, no host sync.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ public API
def check_loss_inputs(name: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    """The shapes and dtypes every linear cross-entropy of this package takes (``name`` starts each message):
    hidden (T, E) and weight (V, E) of one floating dtype, labels (T,) integer."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{name}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be 2-D, (T, E) and (V, E); "
            "flatten the batch first (hidden.reshape(-1, E))."
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}: hidden size {hidden.shape[1]} != weight's {weight.shape[1]}; expected (T, E) and (V, E): the "
            "hidden states and lm_head.weight, not its transpose."
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"{name}: labels {tuple(labels.shape)} must be 1-D with T = {hidden.shape[0]} integer labels "
            "(unshifted Hugging Face labels, one per token)."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name}: labels dtype {labels.dtype}; expected an integer dtype (int64).")
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise TypeError(
            f"{name}: hidden {hidden.dtype} and weight {weight.dtype} differ or are not floating; they must share one "
            "floating dtype (bf16, fp16 or fp32): cast hidden to lm_head.weight.dtype first."
        )


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_bytes: int | None) -> None:
    check_loss_inputs("fused_linear_cross_entropy", hidden, weight, labels)
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
    counted_bound: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy losses of ``hidden @ weight.T`` and the count of counted tokens.

    hidden (T, E) final-norm hidden states; weight (V, E) lm_head weight (may be a tied embedding, frozen or
    trainable); labels (T,) integer, unshifted Hugging Face labels: token t is scored against labels[t + 1], the
    last token scores nothing, ``ignore_index`` labels are not counted. ``softcap``: Gemma 2's
    final_logit_softcapping (logits -> softcap * tanh(logits / softcap)). ``chunk_bytes``: size of the (C, V)
    logits buffer (None: ``DEFAULT_CHUNK_BYTES``, 372 MiB). Smaller saves memory, larger means fewer, deeper
    matmuls and fewer grad_weight read-modify-writes. ``counted_bound``: an upper bound of the counted tokens
    known on the host (the trainer: the micro-batch's trainable-token count from the shards): only the first
    ``counted_bound`` tokens of a stable counted-first order get the GEMMs and the row pass, so ignored tokens
    (prompt tokens in SFT, often 30-60%) cost nothing, with no host sync; a bound below the true count makes
    loss_sum NaN rather than silently dropping tokens.

    Returns (loss_sum fp32 0-dim, n_counted int64 0-dim); differentiable in loss_sum w.r.t. hidden and weight.
    Never materialises the (T, V) logits and never syncs with the host. An out-of-range label (not
    ``ignore_index``, outside [0, V)) makes loss_sum NaN. Gradients are computed in the forward when grad mode is
    on and hidden or weight requires grad; a frozen weight skips its matmul. They stay alive with the graph
    (T x E, plus V x E when the weight trains) until backward or until loss_sum is freed.
    Backward may run once per call (it scales the stored gradients in place).
    """
    _check_inputs(hidden, weight, labels, chunk_bytes)
    if counted_bound is not None and (isinstance(counted_bound, bool) or not int(counted_bound) >= 0):
        raise ValueError(
            f"fused_linear_cross_entropy: counted_bound={counted_bound!r}; expected None or an int >= the number of "
            "counted tokens (e.g. the micro-batch's trainable-token count)."
        )
    grad_on = torch.is_grad_enabled()
    need_grad_hidden = grad_on and hidden.requires_grad
    need_grad_weight = grad_on and weight.requires_grad
    return _FusedLinearCrossEntropy.apply(
        hidden,
        weight,
        labels,
        int(ignore_index),
        None if softcap is None else float(softcap),
        DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes),
        need_grad_hidden,
        need_grad_weight,
        None if counted_bound is None else int(counted_bound),
    )


# ------------------------------------------------------------------------------------------------ reference
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
