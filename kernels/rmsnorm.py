"""RMSNorm over the last dim, Llama/Qwen3 (``offset=0``) and Gemma ``(1 + w)`` (``offset=1``) variants.

Shapes: T packed tokens, E normalized size: the hidden size for the model's norms (x (T, E)), or D for Qwen3's
per-head q/k norms (x (T, H, D), weight (D,)). x is flattened to R rows of E; rows may be strided, a row's E
values must be contiguous.

Why fused: eager RMSNorm makes ~6 passes over (T, E) (fp32 cast, square, mean, scale, cast, weight product).
The forward here reads x once and writes y once, plus one fp32 rstd per row kept for the backward; the backward
reads dy and x once and writes dx once (``kernels/rmsnorm_bwd.py``). The weight gradient is deterministic
(per-program fp32 partial rows summed in a fixed order, no float atomics), reduced either by a second small
kernel or inside the backward's one launch; a frozen weight (LoRA) compiles the backward without any dw work.

Tuning lives in ``kernels/rmsnorm_config.py``: block sizes, the persistent one-wave grid with its register cap,
and the named variants an A/B run switches between (``set_default_variant`` or ``rms_norm(..., variant=)``).
H200, session 4 (CUDA-graph device time, % of the 1 GiB copy rate, E 4096 bf16, default ``two_launch_pdl``):
T = 4K fwd 90% / bwd 77% (dx and dw; 91% with a frozen weight), 16K 97% / 92%, 64K 98% / 97%. At 4K the whole
backward is ~24 us of traffic, so launch ramp, tail and the dw reduction decide; programmatic dependent launch
(``rmsnorm_config``) overlaps each kernel's launch with the tail of the one before.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .indexing import needs_long_indexing
from .rmsnorm_bwd import _dw_reduce_kernel, _rms_norm_bwd_kernel
from .rmsnorm_config import (
    REGS_PER_SM,
    BwdConfig,
    Variant,
    bwd_config,
    default_variant,
    fwd_config,
    get_variant,
    one_launch_reducers,
    register_cap,
    set_default_variant,
)

__all__ = ["default_variant", "rms_norm", "rms_norm_reference", "set_default_variant"]


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
    """One program normalizes BLOCK_R whole rows (BLOCK_E >= E). PDL: see ``two_launch_pdl`` in rmsnorm_config."""
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


@triton.jit(do_not_specialize=["R", "n_blocks", "n_programs"])  # see _rms_norm_bwd_kernel
def _rms_norm_fwd_persistent_kernel(
    x_ptr,  # (R, E) rows of stride_x
    w_ptr,  # (E,)
    y_ptr,  # (R, E) contiguous
    rstd_ptr,  # (R,) fp32
    R,
    n_blocks,  # cdiv(R, BLOCK_R)
    n_programs,  # the grid size
    stride_x,
    eps,
    offset,
    E: tl.constexpr,
    GEMMA_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    LONG_INDEXING: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Persistent forward (variant knob ``fwd_programs_per_sm``): program p normalizes row blocks p, p + N, ...,
    loading the next block before computing the current one, so an SM's loads stay in flight without the block
    scheduler launching a new program per row (at T = 4K: 16 blocks a program instead of 4096 programs)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    block = pid
    if LONG_INDEXING:
        block = pid.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    if E == BLOCK_E:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & col_mask[None, :]
    x_next = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    while block < n_blocks:  # a while loop for the interpreter (see the backward kernel)
        x = x_next.to(tl.float32)
        cur_rows, cur_row_mask, cur_mask = rows, row_mask, mask
        block += n_programs
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        if E == BLOCK_E:
            mask = row_mask[:, None]
        else:
            mask = row_mask[:, None] & col_mask[None, :]
        x_next = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / E + eps)
        normed = x * rstd[:, None]
        if GEMMA_CAST:
            y = normed * (offset + w[None, :])
        else:
            y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
        tl.store(y_ptr + cur_rows[:, None] * E + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=cur_mask)
        tl.store(rstd_ptr + cur_rows, rstd, mask=cur_row_mask)


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


def _pdl_kwargs(choice: Variant, x: torch.Tensor) -> dict:
    """Launch options of a ``pdl`` variant: the PDL constexpr and Triton's ``launch_pdl`` attribute, on sm_90+ CUDA
    devices only (Triton's interpreter and older GPUs run the variant as the plain kernel)."""
    if not (choice.pdl and x.is_cuda and _has_pdl(x.device.index if x.device.index is not None else 0)):
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


def _bwd_config(n_rows: int, n_cols: int, dtype: torch.dtype, sms: int) -> BwdConfig:
    """Run 4's backward configuration (the ``two_launch`` variant); kept for tests and tools."""
    del dtype  # same configuration for bf16/fp16/fp32 (fp32 compiles to the same register counts, no spill)
    return bwd_config(n_rows, n_cols, sms)


_register_cap = register_cap
_REGS_PER_SM = REGS_PER_SM
# One (2,) int32 ticket counter per (device, stream), zero between launches (the kernel's last reducer resets it),
# so back-to-back and CUDA-graph-replayed backwards reuse it; per stream so that two streams never share one.
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _ticket_counter(device: torch.device) -> torch.Tensor:
    """The counter for the current stream. A CUDA-graph capture runs on its own stream after a warm-up on another
    (train.cuda_graph, torch.cuda.graph): it takes the device's warm-up counter (made eagerly, so zero), the graph
    then replays on one stream at a time. Only a capture with no counter yet on the device makes one inside the
    graph: a zeroing memset node replayed before each use, kept out of the cache (it is never zeroed eagerly)."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    counter = _COUNTERS.get(key)
    if counter is not None:
        return counter
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        same_device = [c for (d, _), c in _COUNTERS.items() if d == device]
        return same_device[0] if same_device else torch.zeros(2, dtype=torch.int32, device=device)
    counter = _COUNTERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return counter


def _launch_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    block_r: int | None = None,
    num_warps: int | None = None,
    variant: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y and the fp32 rstd per row. ``block_r``/``num_warps`` override the variant's (tests, sweeps)."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight, offset), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    choice = get_variant(variant)
    default_r, block_e, default_warps = fwd_config(n_cols, choice.fwd_elements, choice.fwd_per_thread)
    block_r = block_r or default_r
    # Launch options shared by both forward kernels.
    options = dict(
        GEMMA_CAST=offset != 0.0,
        BLOCK_R=block_r,
        BLOCK_E=block_e,
        LONG_INDEXING=needs_long_indexing(x2, y),
        num_warps=num_warps or default_warps,
        **_pdl_kwargs(choice, x),
    )
    if choice.fwd_programs_per_sm:
        n_blocks = triton.cdiv(n_rows, block_r)
        programs = min(n_blocks, choice.fwd_programs_per_sm * _sm_count(x))
        programs = triton.cdiv(n_blocks, triton.cdiv(n_blocks, programs))  # balanced: same blocks, fewest programs
        _rms_norm_fwd_persistent_kernel[(programs,)](
            x2, weight, y, rstd, n_rows, n_blocks, programs, x2.stride(0), eps, offset, E=n_cols, **options
        )
        return y, rstd
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), eps, offset, **options
    )
    return y, rstd


def _launch_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    compute_dx: bool,
    compute_dw: bool,
    block_r: int | None = None,
    num_warps: int | None = None,
    programs: int | None = None,
    prefetch: bool | None = None,
    variant: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dx and dw (each only if asked). The overrides are for tests and tools/bench_kernels_sweep.py; with any of
    them the register cap follows the overridden grid (programs per SM = cdiv(programs, SMs)), so a swept
    "programs per SM" is what the hardware runs (spilling if the tile needs more registers than that leaves)."""
    choice: Variant = get_variant(variant)
    x2, dy2 = _rows(x), _rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    if n_rows == 0:
        return dx, torch.zeros_like(weight) if compute_dw else None
    sms = _sm_count(x)
    one_launch = choice.one_launch and compute_dw
    cfg = bwd_config(n_rows, n_cols, sms, balanced=choice.balanced, one_launch=one_launch)
    overridden = block_r is not None or num_warps is not None or programs is not None
    block_r = block_r or cfg.block_r
    num_warps = num_warps or cfg.num_warps
    n_blocks = triton.cdiv(n_rows, block_r)
    n_programs = min(programs or cfg.programs, n_blocks)
    maxnreg = register_cap(triton.cdiv(n_programs, sms), num_warps) if overridden else cfg.maxnreg
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else rstd
    dw = torch.empty(n_cols, dtype=weight.dtype, device=x.device) if compute_dw else None
    counter = _ticket_counter(x.device) if one_launch else rstd  # unused pointer unless ONE_LAUNCH
    reduce_p = min(cfg.reduce_block_p, triton.next_power_of_2(n_programs))
    reducers = one_launch_reducers(n_programs, n_cols, choice.reducers, sms, interpreted=not x.is_cuda)
    pdl = _pdl_kwargs(choice, x)  # both backward launches
    _rms_norm_bwd_kernel[(n_programs,)](
        dy2,
        x2,
        weight,
        rstd,
        dx if compute_dx else x2,  # unused pointer when COMPUTE_DX is False
        dw_partial,
        dw if one_launch else dw_partial,  # unused pointer unless ONE_LAUNCH
        counter,
        n_rows,
        n_blocks,
        n_programs,
        reducers,
        dy2.stride(0),
        x2.stride(0),
        offset,
        E=n_cols,
        GEMMA_CAST=offset != 0.0,
        COMPUTE_DX=compute_dx,
        COMPUTE_DW=compute_dw,
        ONE_LAUNCH=one_launch,
        BLOCK_R=block_r,
        BLOCK_E=cfg.block_e,
        PREFETCH=cfg.prefetch if prefetch is None else prefetch,
        REDUCE_P=reduce_p,
        REDUCE_C=cfg.reduce_block_c,
        LONG_INDEXING=needs_long_indexing(dy2, x2, dx),
        num_warps=num_warps,
        maxnreg=maxnreg,
        **pdl,
    )
    if not compute_dw or one_launch:
        return dx, dw
    # two_launch: the deterministic reduction of the per-program partial rows (fixed order, no atomics), cast to
    # the weight's dtype in the same launch.
    _dw_reduce_kernel[(triton.cdiv(n_cols, cfg.reduce_block_c),)](
        dw_partial,
        dw,
        n_programs,
        n_cols,
        BLOCK_P=reduce_p,
        BLOCK_C=cfg.reduce_block_c,
        num_warps=8,
        **pdl,
    )
    return dx, dw


# ------------------------------------------------------------------------------------------ autograd.Function
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, variant):  # type: ignore[override]
        y, rstd = _launch_fwd(x, weight, eps, offset, variant=variant)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        ctx.variant = variant
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        # LoRA: frozen norm weights need no dw, so its partial sums are skipped entirely.
        dx, dw = _launch_bwd(
            dy, x, weight, rstd, ctx.offset, ctx.needs_input_grad[0], ctx.needs_input_grad[1], variant=ctx.variant
        )
        return dx, dw, None, None, None


# ------------------------------------------------------------------------------------------------ public API
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, *, variant: str | None = None
) -> torch.Tensor:
    """RMSNorm of x (..., E) over its last dim with weight (E,), fused forward and backward (Triton).

    ``offset=0`` follows LlamaRMSNorm/Qwen3RMSNorm's casts, ``offset=1.0`` GemmaRMSNorm's ``(1 + w)`` in fp32
    (see :func:`rms_norm_reference`). Per-head q/k norms: x (T, H, D), weight (D,). ``variant`` names a tuning
    variant of ``kernels.rmsnorm_config.VARIANTS`` (None: the default, see :func:`set_default_variant`); every
    variant computes the same values up to the order of the fp32 dw sum.
    """
    _check_args(x, weight)
    name = default_variant() if variant is None else get_variant(variant).name  # resolved once: fwd and bwd agree
    return _RMSNorm.apply(x, weight, float(eps), float(offset), name)


# ------------------------------------------------------------------------------------------------ reference
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Out-of-place RMSNorm with Hugging Face's casts.

    ``offset == 0`` (LlamaRMSNorm, Qwen3RMSNorm): normalize in fp32, cast to x's dtype, then multiply by the weight
    (the result dtype follows PyTorch promotion of x and weight). ``offset != 0`` (GemmaRMSNorm with 1.0): multiply
    by ``(offset + weight)`` in fp32 and cast the product to x's dtype. float64 input computes in float64.
    """
    # fp32 as Hugging Face does; float64 inputs stay float64 so that tests get a true high-precision reference
    # (an fp32 "float64 reference" hid the fp32 error scale: run 3's fp32 GPU test at E=8192 failed on it).
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.to(compute))).to(x.dtype)
