"""Linear cross-entropy against a frozen lm_head weight that stays in host memory, streamed to the GPU in chunks.

Shapes: T packed tokens, E hidden size, V vocab, V_c vocab rows per streamed chunk, R tokens per row block.

Why: in the low-memory setting a frozen vocabulary matrix need not occupy GPU memory at all: Qwen3-4B's tied
embedding is 0.72 GiB in bf16, a quarter of its NF4 footprint, and Qwen3-8B/14B's untied lm_head is 1.16/1.45 GiB.
The weight sits in pinned host memory and crosses the bus once per micro-batch, in vocab chunks copied on a side stream
one chunk ahead of their use (778 MB for Qwen3-4B: about 16 ms at the 50 GB/s a pinned H100 copy reaches).

One pass over the vocabulary gives the loss and the hidden states' gradient together, with an online softmax kept
per counted token (fp32). Per chunk and row block:

    z  = hidden @ W_c^T                     cuBLAS, (R, V_c) logits in the inputs' dtype
    one Triton pass over z                  ``_online_rows_kernel``, per row: the chunk's max; the reference max m
                                            moves (and s and g are rescaled) only when the chunk's max passes it
                                            by more than a margin (8 nats; 0 in fp16); p = exp(z - m) written
                                            over z in place; s += rowsum p; the target's logit and weight row
                                            taken from the chunk that holds it
    g += p @ W_c                            cuBLAS into a (R, E) product, added to the fp32 sums g (T, E)

    loss_t = m + log s - z_t                grad_hidden_t = g / s - W_t

A lazy reference max keeps p <= exp(margin) (finite in bf16 and fp32) and leaves g alone for almost every chunk:
the rescale is a per-row branch inside the row kernel, not a pass over (T, E). With Gemma 2's ``softcap`` the
logits are ``softcap * tanh(z / softcap)`` and both terms carry the cap's derivative ``1 - tanh^2``. The arithmetic
matches :func:`padless.kernels.cross_entropy.fused_linear_cross_entropy` (logits in the inputs' dtype, softmax in
fp32, the softmax rounded to the inputs' dtype before its GEMM); the result is the same function, checked against
that module's reference. Only the hidden states get a gradient: the weight is frozen (a trainable lm_head stays on
the GPU with the fused kernel).

Memory on the GPU: two weight chunks (``vocab_chunk_bytes`` each), one row block's logits and product
(``work_bytes``: R x (V_c + E) elements), the running sums (T x E fp32), the target rows and, with
``counted_bound``, the counted rows (T x E each, in the inputs' dtype); grad_hidden (T x E) replaces the target
rows at the end. Like the fused kernel: no host sync, gradients computed in the forward and scaled in backward,
``counted_bound`` skips ignored tokens. Offsets: rows are widened to int64 before multiplying by a row stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cross_entropy import _tanh, check_loss_inputs, counted_first
from .launch import LAUNCH_OPTIONS

__all__ = ["DEFAULT_VOCAB_CHUNK_BYTES", "DEFAULT_WORK_BYTES", "streamed_linear_cross_entropy"]

# One streamed weight chunk (two are in flight): 32 MiB is 6,553 vocab rows at E = 2560, 4,096 at E = 4096.
DEFAULT_VOCAB_CHUNK_BYTES = 32 * 2**20
# One row block's logits (R x V_c) and product (R x E), in the inputs' dtype: 4,096 rows at E = V_c = 4096 in bf16.
DEFAULT_WORK_BYTES = 64 * 2**20
# The reference max moves only when a chunk's max passes it by more than this (natural log units): p <= e^8 ~ 2981.
# fp16 keeps p <= 1 (margin 0): a chunk's p @ W_c sums V_c products in fp16, whose range ends at 65504.
_RESCALE_MARGIN, _RESCALE_MARGIN_FP16 = 8.0, 0.0
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


@triton.jit
def _online_rows_kernel(
    logits_ptr,  # (R, n_cols) this chunk's logits, row stride n_cols; overwritten with p (times the cap's derivative)
    targets_ptr,  # (R,) int, already shifted and offset to the block
    ref_max_ptr,  # (R,) fp32 state: the reference max m
    sum_ptr,  # (R,) fp32 state: s = sum of exp(z - m) so far
    target_logit_ptr,  # (R,) fp32 out: the target's (capped) logit, set by the chunk that holds it
    target_cap_ptr,  # (R,) fp32 out: the cap's derivative at the target (HAS_SOFTCAP and WRITE_GRAD only)
    weighted_ptr,  # (R, E) fp32 state g, row stride E: rescaled here when m moves (WRITE_GRAD only)
    target_row_ptr,  # (R, E) out: the target's weight row (WRITE_GRAD only)
    weight_ptr,  # (n_cols, E) this chunk's weight rows
    stride_weight,  # the weight chunk's row stride
    stride_weight_e,  # its column stride (1 unless the weight is a transposed view)
    n_cols,
    v0,  # the chunk's first vocab id
    ignore_index,
    softcap,
    COLS: tl.constexpr,  # the chunk's row count (the last chunk may use fewer: n_cols)
    E: tl.constexpr,
    MARGIN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """One program per token row: the chunk's max (pass 1), then p, its sum and the target (pass 2)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * n_cols
    target = tl.load(targets_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    # A row not counted is skipped: its z row enters p @ W_c as it is, but only its own g row, which is masked with
    # its loss at the end.
    if target != ignore_index:
        NEG: tl.constexpr = -3.0e38
        top = tl.full([BLOCK_V], NEG, dtype=tl.float32)
        for start in range(0, COLS, BLOCK_V):
            mask = start + cols < n_cols
            z = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            top = tl.maximum(top, tl.where(mask, z, NEG))
        chunk_max = tl.max(top, axis=0)
        if HAS_SOFTCAP:  # the cap is increasing: the capped max is the cap of the max
            chunk_max = softcap * _tanh(chunk_max / softcap)
        old_ref = tl.load(ref_max_ptr + row)
        moves = chunk_max > old_ref + MARGIN  # always for the first chunk (old_ref = -inf)
        ref = tl.where(moves, chunk_max, old_ref)
        scale = tl.where(moves, tl.exp(old_ref - ref), 1.0)  # exp(-inf) = 0 for the first chunk

        local = target - v0
        if (local >= 0) & (local < n_cols):  # read before pass 2 overwrites the row
            z_t = tl.load(row_ptr + local).to(tl.float32)
            if HAS_SOFTCAP:
                t_t = _tanh(z_t / softcap)
                z_t = softcap * t_t
                if WRITE_GRAD:
                    tl.store(target_cap_ptr + row, 1.0 - t_t * t_t)
            tl.store(target_logit_ptr + row, z_t)
            if WRITE_GRAD:
                e_cols = tl.arange(0, BLOCK_E)
                for e0 in range(0, E, BLOCK_E):
                    e_mask = e0 + e_cols < E
                    w = tl.load(weight_ptr + local * stride_weight + (e0 + e_cols) * stride_weight_e, mask=e_mask)
                    tl.store(target_row_ptr + row * E + e0 + e_cols, w, mask=e_mask)

        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, COLS, BLOCK_V):
            mask = start + cols < n_cols
            x = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)  # exp(-inf) = 0
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                p = tl.where(mask, tl.exp(softcap * t - ref), 0.0)
            else:
                p = tl.where(mask, tl.exp(x - ref), 0.0)
            acc += p
            if WRITE_GRAD:
                if HAS_SOFTCAP:
                    p = p * (1.0 - t * t)
                tl.store(row_ptr + start + cols, p.to(logits_ptr.dtype.element_ty), mask=mask)
        tl.store(sum_ptr + row, tl.load(sum_ptr + row) * scale + tl.sum(acc, axis=0))
        tl.store(ref_max_ptr + row, ref)
        if WRITE_GRAD:  # noqa: SIM102 (a constexpr branch around a runtime one)
            if moves & (old_ref > NEG):  # g holds earlier chunks' sums: bring them to the new reference
                e_cols = tl.arange(0, BLOCK_E)
                for e0 in range(0, E, BLOCK_E):
                    e_mask = e0 + e_cols < E
                    g_ptr = weighted_ptr + row * E + e0 + e_cols
                    tl.store(g_ptr, tl.load(g_ptr, mask=e_mask) * scale, mask=e_mask)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


class _WeightChunks:
    """The weight's vocab chunks on the compute device, in order: from host memory through two device buffers
    (the copy of chunk i + 1 runs on a side stream while chunk i is used), or as slices of a weight already there."""

    def __init__(self, weight: torch.Tensor, device: torch.device, rows: int) -> None:
        self.weight, self.device, self.rows = weight, device, rows
        self.starts = list(range(0, weight.shape[0], rows))
        self.streamed = weight.device != device
        if self.streamed:
            self.side = _side_stream(device)
            self.buffers = [torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=device) for _ in range(2)]
            self.ready = [torch.cuda.Event() for _ in range(2)]
            self.free = [torch.cuda.Event() for _ in range(2)]
            self.side.wait_stream(torch.cuda.current_stream(device))  # the buffers were allocated there
            for index in range(min(2, len(self.starts))):
                self._copy(index)

    def _copy(self, index: int) -> None:
        slot, start = index % 2, self.starts[index]
        stop = min(start + self.rows, self.weight.shape[0])
        with torch.cuda.stream(self.side):
            if index >= 2:
                self.side.wait_event(self.free[slot])  # the compute stream is done with chunk index - 2
            self.buffers[slot][: stop - start].copy_(self.weight[start:stop], non_blocking=True)
            self.ready[slot].record(self.side)

    def close(self) -> None:
        """Order the compute stream after every copy issued (also when the pass stopped early, e.g. out of
        memory), so the buffers it frees are never still being written."""
        if self.streamed:
            torch.cuda.current_stream(self.device).wait_stream(self.side)

    def __iter__(self):
        for index, start in enumerate(self.starts):
            stop = min(start + self.rows, self.weight.shape[0])
            if not self.streamed:
                yield start, self.weight[start:stop]
                continue
            slot = index % 2
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready[slot])
            yield start, self.buffers[slot][: stop - start]
            self.free[slot].record(current)
            if index + 2 < len(self.starts):
                self._copy(index + 2)


def _forward_and_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    need_grad: bool,
    counted_bound: int | None,
    vocab_chunk_bytes: int,
    work_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    tokens, width = hidden.shape
    vocab = weight.shape[0]
    targets = labels.new_full((tokens,), ignore_index)
    targets[:-1] = labels[1:]
    n_counted = (targets != ignore_index).sum()
    if counted_bound is not None and counted_bound >= tokens:
        counted_bound = None
    keep = None
    rows_hidden = hidden
    if counted_bound is not None:
        keep = counted_first(targets != ignore_index)[:counted_bound]
        targets = targets.index_select(0, keep)
        rows_hidden = hidden.index_select(0, keep)
    n = targets.shape[0]
    device = hidden.device
    if n == 0:
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        if counted_bound is not None:  # a bound below the true count would drop tokens: make it loud, not wrong
            loss_sum = torch.where(n_counted > counted_bound, torch.full_like(loss_sum, float("nan")), loss_sum)
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_grad else None
        return loss_sum, n_counted, grad_hidden

    counted = targets != ignore_index
    in_range = (targets >= 0) & (targets < vocab)
    running_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    running_sum = torch.zeros(n, dtype=torch.float32, device=device)
    target_logit = torch.zeros(n, dtype=torch.float32, device=device)
    weighted = torch.zeros(n, width, dtype=torch.float32, device=device) if need_grad else None
    target_row = torch.zeros(n, width, dtype=weight.dtype, device=device) if need_grad else None
    target_cap = torch.ones(n, dtype=torch.float32, device=device) if need_grad and softcap is not None else None

    vocab_rows = max(1, min(vocab, vocab_chunk_bytes // (width * weight.element_size())))
    block = max(1, min(n, work_bytes // ((vocab_rows + width) * hidden.element_size())))
    chunks = _WeightChunks(weight, device, vocab_rows)
    try:
        _stream_chunks(chunks, rows_hidden, targets, ignore_index, softcap, block, running_max, running_sum,
                       target_logit, weighted, target_row, target_cap)  # fmt: skip
    finally:
        chunks.close()

    row_loss = running_max + torch.log(running_sum) - target_logit
    row_loss = torch.where(counted, row_loss, torch.zeros_like(row_loss))
    loss_sum = row_loss.sum()
    bad = (counted & ~in_range).any()
    if counted_bound is not None:  # a bound below the true count would drop tokens: make it loud, not wrong
        bad = bad | (n_counted > counted_bound)
    loss_sum = torch.where(bad, torch.full_like(loss_sum, float("nan")), loss_sum)
    if weighted is None:
        return loss_sum, n_counted, None
    # grad = softmax-weighted rows - the target's row (times the cap's derivative), in place in the fp32 sums; rows
    # not counted get exactly 0 (never NaN * 0). grad_hidden is allocated only now, after the working set is gone.
    weighted.div_(running_sum[:, None])
    if target_cap is None:
        weighted.sub_(target_row)
    else:
        weighted.sub_(target_row.float().mul_(target_cap[:, None]))
    del target_row
    weighted.masked_fill_(~counted[:, None], 0.0)
    if keep is None:
        return loss_sum, n_counted, weighted.to(hidden.dtype)
    grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
    grad_hidden.index_copy_(0, keep, weighted.to(hidden.dtype))
    return loss_sum, n_counted, grad_hidden


def _stream_chunks(
    chunks: _WeightChunks,
    rows_hidden: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    block: int,
    running_max: torch.Tensor,
    running_sum: torch.Tensor,
    target_logit: torch.Tensor,
    weighted: torch.Tensor | None,
    target_row: torch.Tensor | None,
    target_cap: torch.Tensor | None,
) -> None:
    """The online-softmax pass over every weight chunk and row block (updates the running tensors in place)."""
    n, width = rows_hidden.shape
    write_grad = weighted is not None
    logits_store = rows_hidden.new_empty(block * chunks.rows)
    product_store = rows_hidden.new_empty(block * width) if write_grad else None
    block_v = min(4096, triton.next_power_of_2(chunks.rows))
    margin = _RESCALE_MARGIN_FP16 if rows_hidden.dtype == torch.float16 else _RESCALE_MARGIN
    for v0, w in chunks:
        cols = w.shape[0]
        for r0 in range(0, n, block):
            r1 = min(r0 + block, n)
            z = torch.mm(rows_hidden[r0:r1], w.t(), out=logits_store[: (r1 - r0) * cols].view(r1 - r0, cols))
            _online_rows_kernel[(r1 - r0,)](
                z, targets[r0:r1], running_max[r0:r1], running_sum[r0:r1], target_logit[r0:r1],
                target_cap[r0:r1] if target_cap is not None else target_logit[r0:r1],
                weighted[r0:r1] if write_grad else running_sum, target_row[r0:r1] if write_grad else z,
                w, w.stride(0), w.stride(1), cols, v0, ignore_index, 1.0 if softcap is None else float(softcap),
                COLS=chunks.rows, E=width, MARGIN=margin, HAS_SOFTCAP=softcap is not None,
                WRITE_GRAD=write_grad, BLOCK_V=block_v, BLOCK_E=min(1024, triton.next_power_of_2(width)),
                num_warps=8 if block_v >= 4096 else 4, **LAUNCH_OPTIONS,
            )  # fmt: skip
            if write_grad:
                product = torch.mm(z, w, out=product_store[: (r1 - r0) * width].view(r1 - r0, width))
                weighted[r0:r1].add_(product)


class _StreamedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, need_grad, counted_bound, chunk, work):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss_sum, n_counted, grad_hidden = _forward_and_grad(
                hidden, weight, labels, ignore_index, softcap, need_grad, counted_bound, chunk, work
            )
        ctx.grad_hidden = grad_hidden
        ctx.mark_non_differentiable(n_counted)
        return loss_sum, n_counted

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_count):
        if ctx.grad_hidden is False:
            raise RuntimeError(
                "streamed_linear_cross_entropy: backward ran twice through the same graph; its gradient is computed "
                "in the forward and scaled in place once. Call the function again instead of retain_graph=True."
            )
        grad_hidden, ctx.grad_hidden = ctx.grad_hidden, False
        if grad_hidden is None or grad_loss is None:
            return (None,) * 9
        return grad_hidden.mul_(grad_loss), None, None, None, None, None, None, None, None


def streamed_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    counted_bound: int | None = None,
    vocab_chunk_bytes: int = DEFAULT_VOCAB_CHUNK_BYTES,
    work_bytes: int = DEFAULT_WORK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy losses of ``hidden @ weight.T`` and the count of counted tokens, with
    ``weight`` frozen and either on hidden's device or in (pinned) host memory while hidden is on a GPU.

    The contract is :func:`padless.kernels.cross_entropy.fused_linear_cross_entropy`'s: labels unshifted (token t is
    scored against labels[t + 1]), ``ignore_index`` labels not counted, an out-of-range label or a
    ``counted_bound`` below the true count makes loss_sum NaN, no host sync, backward once. Differentiable in
    loss_sum w.r.t. hidden only; a weight that requires grad is an error (train it with the fused kernel).
    """
    check_loss_inputs("streamed_linear_cross_entropy", hidden, weight, labels)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("streamed_linear_cross_entropy: the weight is frozen here; a trainable lm_head needs the GPU.")
    if weight.device != hidden.device and not (hidden.is_cuda and weight.device.type == "cpu"):
        raise ValueError(
            f"streamed_linear_cross_entropy: hidden on {hidden.device}, weight on {weight.device}; expected the same "
            "device, or the weight in host memory and hidden on a GPU."
        )
    if labels.device != hidden.device:
        raise ValueError(f"streamed_linear_cross_entropy: labels on {labels.device}, hidden on {hidden.device}.")
    if counted_bound is not None and (isinstance(counted_bound, bool) or not int(counted_bound) >= 0):
        raise ValueError(
            f"streamed_linear_cross_entropy: counted_bound={counted_bound!r}; expected None or an int >= the number "
            "of counted tokens."
        )
    if vocab_chunk_bytes <= 0 or work_bytes <= 0:
        raise ValueError("streamed_linear_cross_entropy: vocab_chunk_bytes and work_bytes must be positive.")
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _StreamedLinearCrossEntropy.apply(
        hidden, weight, labels, int(ignore_index), None if softcap is None else float(softcap), need_grad,
        None if counted_bound is None else int(counted_bound), int(vocab_chunk_bytes), int(work_bytes),
    )  # fmt: skip
