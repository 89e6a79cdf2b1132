"""The row pass of the fused linear cross-entropy: one Triton program per token row of a (C, V) logits chunk.

Why a module of its own: ``kernels.cross_entropy`` holds the chunk loop, its schedules and the autograd glue;
this file holds the one Triton kernel they all launch (split at ~450 lines).

Per row: pass 1 (running max and sum of exp, fp32) over the row's V logits, the target's loss, and pass 2 the
logits' gradient (softmax - onehot) x d softcap, written IN PLACE into the same buffer in its dtype (bf16 for a
bf16 model: the GEMM output dtype, half the bytes of fp32; the math is fp32 inside). Ignored rows get loss 0 and
a zero gradient row (one write, no read). Bytes per chunk: 3 x C x V x element_size (two reads, one write).

Run 4 (H200 run 3 -> run 4), kept because the numbers still hold:
* Pass 1 keeps one running (max, sum) per 16-column segment lane: no block-wide reduction and no barrier in the
  loop (run 3 had 6 ``bar.sync`` per iteration); the lanes are combined once per row. 1/16 more exps.
* 4096 columns x 8 warps (32 registers): a 1024-row chunk is resident at once, ~62 KB of loads in flight per SM.
* Pass 2 walks the row's blocks last to first: the blocks pass 1 read last are re-read first (some L2 hits).
Measured (H200, 1024 x 151936 bf16): 0.23-0.28 ms with the gradient, 3.4-4.0 TB/s of the 3 passes.

Offsets: the row index is widened to int64 before multiplying by the row stride (C x V may pass 2**31); column
offsets within a row stay int32 (V < 2**31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ce_row_config", "launch_ce_rows"]


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


def ce_row_config(vocab: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_V, SEGMENT, num_warps) of the row kernel, a pure function of the vocab size and logits dtype.

    4096 columns x 8 warps: 16 values per thread (two 16-byte bf16 loads), 32 registers on sm_90 (Triton 3.6
    offline compile; 38 with softcap), so 1024 rows of a chunk are all resident at once (~7.75 per SM, 8 fit by
    threads; the default 1280-row chunk adds a partial second wave, cheaper than its deeper GEMMs save) with 8
    KB of loads per row per block: ~62 KB in flight per SM, against the ~32 KB a saturated HBM needs (run 3's
    2048 x 4 warps had ~31 KB, and barriers in pass 1 held them back).
    SEGMENT 16: pass 1 reduces each block over 16 contiguous columns (within a thread and its lane neighbour).
    """
    del dtype  # the same shape serves bf16/fp16 (16 B per 8 values) and fp32 (48 registers at 4 warps)
    block = min(4096, triton.next_power_of_2(vocab))
    return block, min(16, block), 8 if block >= 4096 else 4


def launch_ce_rows(
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
    block, segment, num_warps = ce_row_config(vocab, logits.dtype)
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
