"""Embedding rows gathered on the GPU straight out of a weight in pinned host memory (zero-copy reads).

Shapes: T token ids, V vocab rows, E row width.

Why: ``--memory low`` keeps a frozen embedding in pinned host memory. Gathering its rows on the host needs the ids
there (a copy or a sync) and CPU work that a CUDA graph cannot replay. Pinned memory is mapped into the GPU's
address space, so a kernel can read it directly: each program copies part of one row over the bus (Qwen3-4B at
8K tokens reads 42 MB, about 1 ms at the ~50 GB/s a pinned H100 copy reaches). The launch needs only device ids,
so it has no host sync and records into a CUDA graph like any kernel. A weight already on the GPU works too.

An id outside ``[0, V)`` gives a row of zeros (a kernel cannot raise); the packed loss turns the same id, as a
label, into a NaN loss, which stops training with its own message.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .launch import LAUNCH_OPTIONS

__all__ = ["gather_rows", "gather_rows_reference"]

_BLOCK_E = 512  # row elements per program: 1 KiB of bf16, whole 128-byte transactions over the bus


@triton.jit
def _gather_rows_kernel(W, IDS, OUT, vocab, width, stride_w, stride_o, BLOCK_E: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    token = tl.load(IDS + row).to(tl.int64) + tl.zeros([BLOCK_E], dtype=tl.int64)  # the row's id, per lane
    valid = (token >= 0) & (token < vocab)
    in_row = cols < width
    values = tl.load(W + tl.where(valid, token, 0) * stride_w + cols, mask=in_row & valid, other=0.0)
    tl.store(OUT + row.to(tl.int64) * stride_o + cols, values, mask=in_row)


def gather_rows_reference(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` on ids' device, an out-of-range id giving a row of zeros."""
    valid = (ids >= 0) & (ids < weight.shape[0])
    rows = weight.index_select(0, torch.where(valid, ids, 0).to(weight.device)).to(ids.device)
    return rows.masked_fill(~valid[:, None], 0)


def gather_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` as a new (T, E) tensor on ids' device, read by a kernel from ``weight`` on that device or in
    pinned host memory; an id outside ``[0, V)`` gives a row of zeros. No host sync."""
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"gather_rows: weight {tuple(weight.shape)} with strides {weight.stride()}; expected (V, E) "
                         "with contiguous rows.")  # fmt: skip
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"gather_rows: ids {tuple(ids.shape)} {ids.dtype}; expected (T,) int32 or int64.")
    if weight.device != ids.device and not (ids.is_cuda and weight.device.type == "cpu" and weight.is_pinned()):
        raise ValueError(
            f"gather_rows: weight on {weight.device} ({'pinned' if weight.is_pinned() else 'pageable'}), ids on "
            f"{ids.device}; expected the same device, or the weight in pinned host memory and the ids on a GPU."
        )
    out = torch.empty((ids.shape[0], weight.shape[1]), dtype=weight.dtype, device=ids.device)
    if out.numel() == 0:
        return out
    grid = (ids.shape[0], triton.cdiv(weight.shape[1], _BLOCK_E))
    # Triton launches on the current device and maps the host pointer there: make that the ids' device.
    with torch.cuda.device(ids.device) if ids.is_cuda else contextlib.nullcontext():
        _gather_rows_kernel[grid](weight, ids, out, weight.shape[0], weight.shape[1], weight.stride(0), out.stride(0),
                                  BLOCK_E=_BLOCK_E, **LAUNCH_OPTIONS)  # fmt: skip
    return out
