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

Memory and chunk size (``chunk_bytes`` = the one (C, V) logits buffer; default ``None`` = automatic):
    weight frozen (LoRA): 320 MiB -> C = 1024 rows at V = 151936 bf16; at T = 16K, E = 4096 the extra memory is
        that buffer + grad_hidden (128 MiB) ~ 0.42 GiB (budget 0.5 GiB).
    weight trains: the buffer may grow to the size of the weight's gradient (V x E, which must exist anyway):
        C = E = 4096 rows at Qwen3-8B, so grad_weight is accumulated in few, full-depth (K = 4096) matmuls
        instead of one read-modify-write of V x E (2.5 GB in bf16) per small chunk.

Predicted H200 times, fwd+bwd at T x 4096 x 151936 bf16. Each matmul is 2*T*E*V FLOP = 5.1 TFLOP at T = 4K,
20.4 TFLOP at 16K; cuBLAS at ~700 TFLOP/s on these shapes; the Triton pass moves 3 x C x V x 2 bytes (two
reads, one write) at ~4 TB/s = 0.9 ms per 4K tokens:
    weight frozen  (2 matmuls): 4K ~ 14.6 + 0.9 ~ 16 ms;   16K ~ 58 + 3.6 ~ 62 ms
    weight trains  (3 matmuls): 4K ~ 22 + 1.0 ~ 23 ms;     16K ~ 87 + 4   ~ 91 ms
If the lead's eager 21.1 ms at 4K includes grad_weight, cuBLAS runs nearer 800 TFLOP/s and the trainable case
is ~19 + 1 ~ 20 ms. Against eager (21.1 / 88 ms, lead's H200 numbers) we save the (T, V) fp32 passes and
allocations; against Liger (23.9 / 70 ms) we run larger matmuls (Liger's chunks are 128 rows at 4K, 512 at 16K:
small-M matmuls, and 32 grad_weight read-modify-writes), fill a bf16 buffer by ``out=`` (no copies), write
dlogits in place, and skip ignored rows' reads.

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

# The logits buffer when the weight is frozen. 320 MiB gives C = 1024 rows at V = 151936 in bf16: the
# grad_hidden matmul (C x E output = 1024 x 4096) then fills 2 waves of 128x128 tiles on 132 SMs, and at T = 16K
# the buffer plus grad_hidden (128 MiB) stays under 0.5 GiB.
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
):
    # One program per token row. Int64 row index: C * V passes 2**31 for big chunks.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        # Ignored token: loss 0, gradient row 0 (one write pass, no reads).
        tl.store(row_loss_ptr + row, 0.0)
        if WRITE_GRAD:
            zero = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                tl.store(row_ptr + start + cols, zero, mask=start + cols < V)
    else:
        # Pass 1: running max and sum of exp over the row, in fp32.
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:
                z = tl.where(mask, softcap * _tanh(z / softcap), float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        # The target's logit, read before pass 2 overwrites the row. Out-of-range targets give a NaN loss (no
        # host sync to raise on; NaN makes the bad label visible) and read column 0 instead of stray memory.
        in_range = (target >= 0) & (target < V)
        z_t = tl.load(row_ptr + tl.where(in_range, target, 0)).to(tl.float32)
        if HAS_SOFTCAP:
            z_t = softcap * _tanh(z_t / softcap)
        tl.store(row_loss_ptr + row, tl.where(in_range, lse - z_t, float("nan")))
        if WRITE_GRAD:
            # Pass 2: d loss / d logit = softmax - onehot, times d softcap / d logit = 1 - tanh^2.
            for start in range(0, V, BLOCK_V):
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
    # 2048 columns x 4 warps: 16 values per thread (two 16-byte bf16 loads). ptxas for sm_90a: 52 registers, so ~9
    # CTAs (rows) per SM and ~36 KB of loads in flight per SM, against 1 CTA / 16 KB for 8192 x 16 warps
    # (94-99 registers); a memory-bound row loop wants the bytes in flight. (Register counts, not yet timed.)
    block = min(2048, triton.next_power_of_2(vocab))
    num_warps = 4
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
        num_warps=num_warps,
    )


def auto_chunk_bytes(weight: torch.Tensor, weight_trains: bool) -> int:
    """The default logits-buffer size: 320 MiB, or up to the weight gradient's own size when the weight trains."""
    if weight_trains:
        return max(FROZEN_WEIGHT_CHUNK_BYTES, weight.numel() * weight.element_size())
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
    (C, V) logits buffer; ``None`` picks ``auto_chunk_bytes``: 320 MiB with a frozen weight, up to the weight
    gradient's size when it trains (fewer, deeper grad_weight matmuls). Smaller saves memory, larger is faster.

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
