"""RMSNorm over the last dim, Llama/Qwen3 (``offset=0``) and Gemma ``(1 + w)`` (``offset=1``) casts.

Shapes: T packed tokens, E normalized size: the hidden size for the model's norms (x (T, E)), or D for Qwen3's
per-head q/k norms (x (T, H, D), weight (D,)). x is flattened to R rows of E; rows may be strided, a row's E
values must be contiguous. P: programs of the persistent backward grid.

Why fused: eager RMSNorm makes ~6 passes over (T, E) (fp32 cast, square, mean, scale, cast, weight product).
The forward here reads x once and writes y once, plus one fp32 rstd per row kept for the backward; the backward
reads dy and x once and writes dx once. The weight gradient is deterministic: every backward program sums its
rows into its own fp32 row of a (P, E) workspace, and a second small kernel sums those rows in program order (no
float atomics). A frozen weight (LoRA) compiles the backward without any dw work and launches no reduction.

On sm_90+ every kernel is launched with programmatic dependent launch (PDL): it waits (``griddepcontrol.wait``)
for the kernel before it to finish before touching memory, and at once lets the next one launch, so launch and
block dispatch overlap the previous kernel's tail while every load still happens after the previous kernel is
complete (same values; a PDL chain replayed in a CUDA graph is bitwise equal to plain launches, tested).

Measured on an H200 (bf16, E 4096, CUDA-graph device time, % of the same-size copy rate): T = 4K forward 90%,
backward 77% with dw (91% with a frozen weight); T = 16K 97% / 92%; T = 64K 98% / 97%. At 4K the backward is
~24 us of traffic, so the grid-wide dw reduction (3-5 us) decides what is left. ``tools/bench_kernels.py``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .indexing import needs_long_indexing
from .launch import LAUNCH_OPTIONS

__all__ = ["rms_norm", "rms_norm_reference"]


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (R, E) rows of stride_x
    w_ptr,  # (E,)
    y_ptr,  # (R, E) contiguous
    rstd_ptr,  # (R,) fp32
    R,
    E,
    stride_x,
    eps,
    offset,
    GEMMA_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    LONG_INDEXING: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One program normalizes BLOCK_R whole rows (BLOCK_E >= E)."""
    if PDL:  # launched early: wait for the previous kernel before any access, then let the next one launch
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    if LONG_INDEXING:
        pid = pid.to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols[None, :] < E)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / E + eps)
    normed = x * rstd[:, None]
    if GEMMA_CAST:
        # Gemma: (normed * (offset + w)) in fp32, one rounding to x's dtype.
        y = normed * (offset + w[None, :])
    else:
        # Llama/Qwen3: round normed to x's dtype first, then multiply by the weight (rounded to y's dtype).
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(y_ptr + rows[:, None] * E + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


# Sizes that change with T are not specialized (Triton would compile again for each "== 1" / "divisible by 16"
# pattern of them); strides and pointers are, for 16-byte vector loads.
@triton.jit(do_not_specialize=["R", "n_blocks", "n_programs"])
def _rms_norm_bwd_kernel(
    dy_ptr,  # (R, E) rows of stride_dy
    x_ptr,  # (R, E) rows of stride_x
    w_ptr,  # (E,)
    rstd_ptr,  # (R,) fp32
    dx_ptr,  # (R, E) contiguous
    dw_partial_ptr,  # (P, E) fp32, one row per program
    R,
    n_blocks,  # cdiv(R, BLOCK_R)
    n_programs,  # P, the grid size
    stride_dy,
    stride_x,
    offset,
    E: tl.constexpr,  # fixed per model (hidden size or head dim): E == BLOCK_E drops every column mask
    GEMMA_CAST: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    LONG_INDEXING: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program p handles row blocks p, p + P, p + 2P, ...; dx per row, dw summed per program.

    With g = dy * (offset + w) and n = x * rstd: dx = rstd * (g - n * mean(g * n)), dw = sum_rows(dy * n')
    where n' is n rounded to x's dtype for the Llama cast (the value the weight multiplied in the forward).
    Each iteration loads the next (BLOCK_R, BLOCK_E) tile of dy, x and rstd before computing the current one, so
    loads stay in flight during the compute. dw accumulates in a (BLOCK_R, BLOCK_E) fp32 register tile, reduced
    over rows once at the end and stored as this program's partial row.
    """
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel before any access
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if GEMMA_CAST:
        w = offset + w
    dw_acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    block = pid
    if LONG_INDEXING:
        block = pid.to(tl.int64)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    if E == BLOCK_E:  # full rows: only the row mask (broadcast), so the compiler keeps no per-column predicates
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & col_mask[None, :]
    dy_next = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    x_next = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    rstd_next = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    # Interleaved blocks (neighbouring programs read neighbouring rows). A while loop, not tl.range: Triton 3.6's
    # interpreter cannot take a runtime bound in range() with numpy 2 (int() of a 1-element array).
    while block < n_blocks:
        dy = dy_next.to(tl.float32)
        x = x_next.to(tl.float32)
        rstd = rstd_next
        cur_rows = rows
        cur_mask = mask
        block += n_programs
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        if E == BLOCK_E:
            mask = row_mask[:, None]
        else:
            mask = row_mask[:, None] & col_mask[None, :]
        # The next block's loads go out now (fully masked past the end: no memory access).
        dy_next = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        x_next = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        rstd_next = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        normed = x * rstd[:, None]
        if COMPUTE_DX:
            g = dy * w[None, :]
            mean_gn = tl.sum(g * normed, axis=1) * (1.0 / E)
            dx = rstd[:, None] * (g - normed * mean_gn[:, None])
            tl.store(dx_ptr + cur_rows[:, None] * E + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=cur_mask)
        if COMPUTE_DW:
            if GEMMA_CAST:
                dw_acc += dy * normed
            else:
                dw_acc += dy * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * E + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


@triton.jit
def _dw_reduce_kernel(
    partial_ptr,  # (P, E) fp32 partial rows
    dw_ptr,  # (E,) in the weight's dtype
    P,
    E,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """dw[c] = sum over p of partial[p, c], in a fixed order (tiles of BLOCK_P rows, in sequence), cast once."""
    if PDL:  # see _rms_norm_bwd_kernel
        gdc_wait()
        gdc_launch_dependents()
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < E
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = 0
    while start < P:  # a while loop for the interpreter (see the backward kernel)
        prow = start + tl.arange(0, BLOCK_P)
        tile_mask = (prow < P)[:, None] & col_mask[None, :]
        tile = tl.load(partial_ptr + prow[:, None] * E + cols[None, :], mask=tile_mask, other=0.0)
        acc += tl.sum(tile, axis=0)
        start += BLOCK_P
    tl.store(dw_ptr + cols, acc.to(dw_ptr.dtype.element_ty), mask=col_mask)


# ------------------------------------------------------------------------------------- launch configuration
# Registers per SM on sm_80/sm_90 (and the CPU stand-in): the budget the backward's register cap divides.
REGS_PER_SM = 65536
# The dw reduction: 16 columns (64 B of each partial row) per program, all partial rows in one tile of up to
# 512 x 16 fp32: one round of loads per program (~1-2 us); E 4096 -> 256 programs.
REDUCE_BLOCK_C = 16
REDUCE_MAX_ROWS = 512


def fwd_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_E, num_warps) of the forward: about 4096 elements per program (whole rows, at least one),
    4 warps below 2048 elements a program, 8 below 16384, else 16.

    E 4096 -> 1 row x 4096 with 8 warps (16 elements, two 16-byte loads per thread); per-head E 128 -> 32 rows per
    program so that small rows still make wide programs. Register counts (Triton 3.6, sm_90): E 4096 at 8 warps
    takes 64 registers x 256 threads, so 4 programs (32 KB of loads) fit per SM; per-head 32 x 128 at 8 warps 80
    registers, 3 programs (24 KB). 95-96% of copy for both at T = 64K on an H200.
    """
    block_e = triton.next_power_of_2(n_cols)
    block_r = max(1, min(64, 4096 // block_e))
    program = block_r * block_e
    return block_r, block_e, 16 if program >= 16384 else 8 if program >= 2048 else 4


class BwdConfig(NamedTuple):
    """Launch configuration of the backward (see :func:`bwd_config`)."""

    block_r: int  # rows per tile
    block_e: int  # next power of two >= E
    num_warps: int
    programs: int  # persistent grid size (one wave)
    maxnreg: int  # register cap that makes the planned programs per SM fit
    reduce_block_p: int  # partial rows per step of the dw reduction


def register_cap(programs_per_sm: int, num_warps: int) -> int:
    """Registers per thread that let ``programs_per_sm`` programs of ``num_warps`` warps share an SM."""
    return min(255, REGS_PER_SM // (programs_per_sm * num_warps * 32)) // 8 * 8  # ptxas allocates in 8s


def bwd_config(n_rows: int, n_cols: int, sms: int) -> BwdConfig:
    """The backward's launch configuration, a pure function of (rows, E, SM count).

    Bytes in flight per SM are what a memory-bound loop needs (~4.2 TB/s x ~1 us / 132 SMs ~ 32 KB): the tile
    each resident program has loaded plus the next tile's loads, in flight while the current one computes.
    Register counts (Triton 3.6 offline compile for sm_90, E a constexpr, dx and dw):
    * wide rows (E >= 1024): one row per tile, 16 elements per thread (E 4096 -> 8 warps): 124-128 registers
      (cap 128, no spill), 2 programs x (16 KB loaded + 16 KB prefetched) per SM. E 8192: 16 warps, 1 program;
      E 2048: 4 warps, 4 programs.
    * narrow rows (per-head E 128; 64, 256): 2048 elements per tile (E 128 -> 16 rows), 4 warps: 122-128
      registers, 4 programs per SM; E 64 needs up to 151, so 3 programs (cap 168).
    The register cap is always set, so the occupancy the persistent grid is sized for is what the hardware gets:
    one wave (a second, partial wave would double the slowest SM's time). Measured on an H200 at T = 4K, E 4096,
    one 16-warp program per SM instead is slower (35.6 vs 30.7 us), and so is a lower cap with more programs per
    SM at 16K/64K.
    """
    block_e = triton.next_power_of_2(n_cols)
    if block_e >= 1024:
        block_r = 1
        num_warps = max(4, min(16, block_e // 512))  # 16 elements per thread up to E 8192
        per_sm = max(1, 16 // num_warps)
    else:
        block_r = max(1, 2048 // block_e)
        num_warps = 4
        per_sm = 4 if block_e >= 128 else 3  # E 64: 32 rows x 64 need up to 151 registers
    n_blocks = triton.cdiv(max(n_rows, 1), block_r)
    programs = max(1, min(n_blocks, per_sm * sms))
    reduce_p = max(1, min(triton.next_power_of_2(programs), REDUCE_MAX_ROWS))
    return BwdConfig(block_r, block_e, num_warps, programs, register_cap(per_sm, num_warps), reduce_p)


# ------------------------------------------------------------------------------------------- host launchers
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A whole row lives in registers; past 64K elements it would spill (no model we train is near that).
_MAX_BLOCK_E = 65536


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., E) -> (R, E) with contiguous rows (a view when the strides allow it, else a copy)."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _sm_count(x: torch.Tensor) -> int:
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return 2  # Triton's CPU interpreter: few programs, each looping over many rows, is fastest


@functools.lru_cache(maxsize=16)
def _has_pdl(device_index: int) -> bool:
    """Programmatic dependent launch needs an NVIDIA sm_90 (Hopper) or newer (not ROCm, whose capability numbers
    mean something else); asked once per device, not per launch."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def _pdl_kwargs(x: torch.Tensor) -> dict:
    """The PDL constexpr and Triton's ``launch_pdl`` attribute on sm_90+ CUDA devices; nothing elsewhere (older
    GPUs and Triton's interpreter run the plain kernels)."""
    if not (x.is_cuda and _has_pdl(x.device.index if x.device.index is not None else 0)):
        return {}
    return {"PDL": True, "launch_pdl": True}


def _check_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() == 0:
        raise ValueError("x is a scalar: expected (..., E).")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}: expected ({x.shape[-1]},) to match x's last dim "
            f"(x {tuple(x.shape)}; per-head norms take x (T, H, D) with weight (D,))."
        )
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"x is {x.dtype}, weight {weight.dtype}: expected each one of {_DTYPES}.")
    if triton.next_power_of_2(x.shape[-1]) > _MAX_BLOCK_E:
        raise ValueError(f"x's last dim E={x.shape[-1]} is too large: rms_norm supports E <= {_MAX_BLOCK_E}.")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight on {weight.device}: expected one device.")


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    # Llama's ``weight * normed.to(x.dtype)`` promotes (bf16 x with an fp32 weight gives fp32); Gemma casts to x.
    return x.dtype if offset != 0.0 else torch.promote_types(x.dtype, weight.dtype)


def _launch_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y and the fp32 rstd per row."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight, offset), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block_r, block_e, num_warps = fwd_config(n_cols)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), eps, offset,
        GEMMA_CAST=offset != 0.0, BLOCK_R=block_r, BLOCK_E=block_e, LONG_INDEXING=needs_long_indexing(x2, y),
        num_warps=num_warps, **_pdl_kwargs(x), **LAUNCH_OPTIONS,
    )  # fmt: skip
    return y, rstd


def _launch_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    compute_dx: bool,
    compute_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dx and dw, each only if asked: the persistent backward, then (dw only) the fixed-order reduction."""
    x2, dy2 = _rows(x), _rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    if n_rows == 0:
        return dx, torch.zeros_like(weight) if compute_dw else None
    if not (compute_dx or compute_dw):
        return None, None
    cfg = bwd_config(n_rows, n_cols, _sm_count(x))
    dw_partial = torch.empty((cfg.programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else rstd
    pdl = _pdl_kwargs(x)  # both launches
    _rms_norm_bwd_kernel[(cfg.programs,)](
        dy2, x2, weight, rstd,
        dx if compute_dx else x2,  # unused pointer when COMPUTE_DX is False
        dw_partial,  # unused (rstd) when COMPUTE_DW is False
        n_rows, triton.cdiv(n_rows, cfg.block_r), cfg.programs, dy2.stride(0), x2.stride(0), offset,
        E=n_cols, GEMMA_CAST=offset != 0.0, COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw, BLOCK_R=cfg.block_r,
        BLOCK_E=cfg.block_e, LONG_INDEXING=needs_long_indexing(dy2, x2, dx), num_warps=cfg.num_warps,
        maxnreg=cfg.maxnreg, **pdl, **LAUNCH_OPTIONS,
    )  # fmt: skip
    if not compute_dw:
        return dx, None
    dw = torch.empty(n_cols, dtype=weight.dtype, device=x.device)
    _dw_reduce_kernel[(triton.cdiv(n_cols, REDUCE_BLOCK_C),)](
        dw_partial, dw, cfg.programs, n_cols, BLOCK_P=cfg.reduce_block_p, BLOCK_C=REDUCE_BLOCK_C, num_warps=8,
        **pdl, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return dx, dw


# ------------------------------------------------------------------------------------------ autograd.Function
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):  # type: ignore[override]
        y, rstd = _launch_fwd(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        # LoRA: frozen norm weights need no dw, so its partial sums are skipped entirely.
        dx, dw = _launch_bwd(dy, x, weight, rstd, ctx.offset, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None, None


# ------------------------------------------------------------------------------------------------ public API
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of x (..., E) over its last dim with weight (E,), fused forward and backward (Triton).

    ``offset=0`` follows LlamaRMSNorm/Qwen3RMSNorm's casts, ``offset=1.0`` GemmaRMSNorm's ``(1 + w)`` in fp32
    (see :func:`rms_norm_reference`). Per-head q/k norms: x (T, H, D), weight (D,). The weight gradient is
    bitwise reproducible (fixed-order sum).
    """
    _check_args(x, weight)
    return _RMSNorm.apply(x, weight, float(eps), float(offset))


# ------------------------------------------------------------------------------------------------ reference
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Out-of-place RMSNorm with Hugging Face's casts.

    ``offset == 0`` (LlamaRMSNorm, Qwen3RMSNorm): normalize in fp32, cast to x's dtype, then multiply by the weight
    (the result dtype follows PyTorch promotion of x and weight). ``offset != 0`` (GemmaRMSNorm with 1.0): multiply
    by ``(offset + weight)`` in fp32 and cast the product to x's dtype. float64 input computes in float64, so
    tests get a true high-precision reference.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.to(compute))).to(x.dtype)
