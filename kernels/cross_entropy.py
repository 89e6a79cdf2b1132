"""Fused linear cross-entropy: lm_head matmul + next-token cross-entropy without the full (T, V) logits.

Shapes: T packed tokens, E hidden size, V vocab, C chunk rows (tokens per chunk).

Why: at T = 16K tokens and V = 152K (Qwen3) the full logits are 4.6 GiB in bf16 and eager PyTorch keeps
several (T, V) copies alive (measured 27.8 GiB extra). Here the tokens are processed in chunks of C rows:

    logits_c = hidden_c @ weight^T                 cuBLAS, into one preallocated (C, V) buffer (``out=``)
    one Triton pass over logits_c                  per-row max / logsumexp, the target's loss, and the
                                                   logits' gradient (softmax - onehot) x d softcap, written
                                                   IN PLACE into the same buffer (zero rows for ignored tokens)
    grad_hidden_c = dlogits_c @ weight             cuBLAS, straight into the (T, E) grad buffer (``out=``)
    grad_weight  += dlogits_c^T @ hidden_c         only when the weight trains (LoRA freezes lm_head: skipped)

The gradients are computed during the forward (nothing else needs the logits) and scaled in backward by the
incoming gradient of ``loss_sum`` (a 0-dim tensor: no host sync). The next-token shift is applied inside:
token t is scored against labels[t + 1]; the last token scores nothing.

Memory and chunk size (``chunk_bytes`` = the one (C, V) logits buffer; default ``None`` = automatic, 320 MiB):
C = 1024 rows at V = 151936 bf16. Extra memory = that buffer + grad_hidden (T x E) + O(T) vectors: 0.34 GiB at
T = 4K, 0.44 GiB at 16K (budget 0.5 GiB), plus grad_weight (V x E, in the weight's dtype) when the weight trains.
grad_weight is accumulated in place in that one buffer (``torch.mm(out=)`` for the first chunk, ``addmm_`` after):
no fp32 (V, E) accumulator and no second copy. Its rounding: one per chunk in bf16 (as Liger does); an fp32
weight accumulates in fp32.

Run 4 changes (H200 run 3: trainable 1.19 GiB beyond grad_weight at 4K; frozen 16K 66.9 ms vs Liger 63.3):
* Trainable weight: the buffer no longer grows to grad_weight's size (1.16 GiB = one 4096-row chunk); it stays
  at 320 MiB, so extra memory beyond grad_weight drops from 1.19 to ~0.34 GiB (4K) and from 1.29 to ~0.44 GiB
  (16K). Cost: 3 (4K) / 12 (16K) more ``addmm_`` read-modify-writes of grad_weight, each reading 1.16 GiB that
  cuBLAS streams under a K = 1024 GEMM (1.3 TFLOP, ~1.8 ms, so the 0.3 ms read mostly hides): predicted
  +0.5-1.5 ms at 4K (24.7 -> ~26, eager 28.6, Liger 54.6) and +2-4 ms at 16K (93 -> ~96, Liger 109).
* Row kernel, pass 1 (max / sum of exp): run 3 made two block-wide reductions per 2048 columns, each a shared-
  memory round trip and a barrier (6 ``bar.sync`` per loop iteration in the sm_90 PTX) that held the next block's
  loads back. Now each thread keeps running (max, sum) per 16-column segment; the loop has no barrier (0
  ``bar.sync``; 2 register shuffles per reduction) and the lanes are combined once per row. 1/16 more exps.
* Row kernel shape: 4096 columns x 8 warps (32 registers): the 1024 rows of a chunk are resident together with
  8 KB of loads per row per block, ~62 KB in flight per SM (was 2048 x 4 warps, ~31 KB).
* Pass 2 walks the row's blocks last to first: the blocks pass 1 read last are re-read first (some L2 hits).
The row kernel moves 3 x C x V x 2 bytes (two reads, one write): 15 GB at T = 16K = 3.5 ms at 4.2 TB/s, 0.9 ms
at 4K. Its run 3 rate is unknown (only end-to-end times were measured); if it ran at ~60-70% of copy, the
barrier-free, twice-as-deep pass 1 saves ~1-2 ms at 16K and ~0.3-0.5 ms at 4K (loss only: ~0.5 ms at 16K).
The two GEMMs (2 x 20.4 TFLOP at 16K, ~29 ms each at ~700 TFLOP/s) are the rest and unchanged: M = 1024 rows
per chunk keeps the memory budget; a larger C would help the grad_hidden GEMM (1024 x 4096 output, long K) but
costs 297 KiB of buffer per row.

Offsets: the Triton kernel widens its row index to int64 before multiplying by the row stride, so C x V past
2**31 elements is safe; column offsets within a row stay int32 (V < 2**31).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = [
    "FROZEN_WEIGHT_CHUNK_BYTES",
    "auto_chunk_bytes",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
]

# The logits buffer, frozen or trainable weight (the name is older than that rule). 320 MiB gives C = 1024 rows
# at V = 151936 in bf16: the grad_hidden matmul (C x E output = 1024 x 4096) then fills 2 waves of 128x128 tiles
# on 132 SMs, and at T = 16K the buffer plus grad_hidden (128 MiB) stays under 0.5 GiB.
FROZEN_WEIGHT_CHUNK_BYTES = 320 * 2**20
# Chunk rows are rounded down to a multiple of this (matmul tile size) when the budget allows it.
_ROW_QUANTUM = 128


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------


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
    (register shuffles), so the loop has no shared-memory reduction and no barrier (run 3 made two block-wide
    reductions per 2048 columns, each a shared-memory round trip with a barrier that held the next loads back).
    The lanes are combined once per row. Cost: one extra exp per segment per block (1 / SEGMENT more exps).
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


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _ce_row_config(vocab: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_V, SEGMENT, num_warps) of the row kernel, a pure function of the vocab size and logits dtype.

    4096 columns x 8 warps: 16 values per thread (two 16-byte bf16 loads), 32 registers on sm_90 (Triton 3.6
    offline compile; 38 with softcap), so the 1024 rows of a 320 MiB chunk are all resident at once (~7.75 per
    SM, 8 fit by threads) with 8 KB of loads per row per block: ~62 KB in flight per SM, against the ~32 KB a
    saturated HBM needs (run 3's 2048 x 4 warps had ~31 KB, and barriers in pass 1 held them back).
    SEGMENT 16: pass 1 reduces each block over 16 contiguous columns (within a thread and its lane neighbour).
    """
    del dtype  # the same shape serves bf16/fp16 (16 B per 8 values) and fp32 (48 registers at 4 warps)
    block = min(4096, triton.next_power_of_2(vocab))
    return block, min(16, block), 8 if block >= 4096 else 4


def _launch_ce_rows(
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
    block, segment, num_warps = _ce_row_config(vocab, logits.dtype)
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
    )


def auto_chunk_bytes(weight: torch.Tensor, weight_trains: bool) -> int:
    """The default logits-buffer size: 320 MiB, whether or not the weight trains.

    Run 3 let the buffer grow to grad_weight's size when the weight trains (one 1.16 GiB chunk at T = 4K): 1.19
    GiB extra, over the 0.5 GiB budget. With 320 MiB the extra is the buffer + grad_hidden (0.34 GiB at 4K, 0.44
    at 16K); grad_weight is then accumulated by one ``addmm_`` per 1024-row chunk, in place in the weight's dtype.
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


def _forward_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    chunk_bytes: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunk loop: (loss_sum, n_counted, grad_hidden or None, grad_weight or None), gradients unscaled."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    # Shifted targets on the device (no sync): token t is scored against labels[t + 1]; the last scores nothing.
    targets = labels.new_full((tokens,), ignore_index)
    targets[:-1] = labels[1:]
    n_counted = (targets != ignore_index).sum()
    row_loss = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_grad_hidden else None
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_grad_weight else None
    write_grad = need_grad_hidden or need_grad_weight

    rows = _chunk_rows(tokens, vocab, hidden.element_size(), chunk_bytes)
    logits_buffer = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
    weight_t = weight.t()
    for index, start in enumerate(range(0, tokens, rows)):
        stop = min(start + rows, tokens)
        hidden_c = hidden[start:stop]
        logits = logits_buffer[: stop - start]
        torch.mm(hidden_c, weight_t, out=logits)
        _launch_ce_rows(logits, targets[start:stop], row_loss[start:stop], ignore_index, softcap, write_grad)
        # ``logits`` now holds dlogits.
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            if index == 0:
                torch.mm(logits.t(), hidden_c, out=grad_weight)  # no zero-fill pass over V x E
            else:
                grad_weight.addmm_(logits.t(), hidden_c)
    if grad_weight is not None and tokens == 0:
        grad_weight.zero_()
    return row_loss.sum(), n_counted, grad_hidden, grad_weight


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Autocast would refuse the ``out=`` matmuls and change the logits' dtype; the inputs' dtype rules here.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss_sum, n_counted, grad_hidden, grad_weight = _forward_and_grads(
                hidden, weight, labels, ignore_index, softcap, chunk_bytes, need_grad_hidden, need_grad_weight
            )
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
            return (None,) * 8
        # Scale by the incoming gradient of loss_sum, a 0-dim device tensor: in place, no host sync.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None, None


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy losses of ``hidden @ weight.T`` and the count of counted tokens.

    hidden (T, E) final-norm hidden states; weight (V, E) lm_head weight (may be a tied embedding, frozen or
    trainable); labels (T,) integer, unshifted Hugging Face labels: token t is scored against labels[t + 1], the
    last token scores nothing, ``ignore_index`` labels are not counted. ``softcap``: Gemma 2's
    final_logit_softcapping (logits -> softcap * tanh(logits / softcap)). ``chunk_bytes``: size of the one
    (C, V) logits buffer; ``None`` picks ``auto_chunk_bytes``: 320 MiB (frozen or trainable weight). Smaller
    saves memory, larger is faster (fewer, deeper matmuls and fewer grad_weight read-modify-writes).

    Returns (loss_sum fp32 0-dim, n_counted int64 0-dim); differentiable in loss_sum w.r.t. hidden and weight.
    Never materialises the (T, V) logits and never syncs with the host. An out-of-range label (not
    ``ignore_index``, outside [0, V)) makes loss_sum NaN. Gradients are computed in the forward when grad mode
    is on and hidden or weight requires grad; a frozen weight skips its matmul. They stay alive with the graph
    (T x E, plus V x E when the weight trains) until backward or until loss_sum is freed. Backward may run once
    per call (it scales the stored gradients in place).
    """
    _check_inputs(hidden, weight, labels, chunk_bytes)
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
