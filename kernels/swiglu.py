"""Gated MLP activations: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up``, fused forward and backward.

Shapes: T packed tokens, I intermediate size. gate and up are (..., I); flattened to (R, I) rows, where each
row may sit ``stride_row`` elements after the previous one (e.g. the two (T, I) halves of a fused (T, 2I)
gate_up projection output), but the I values of a row must be contiguous.

Why fused: eager PyTorch runs silu, then the product, each a full read and write of (T, I). The fused forward
reads gate and up once and writes the output once (3 x T x I elements); the backward recomputes the activation
from gate instead of storing it (no (T, I) activation kept for backward), reading dy, gate, up and writing
d_gate, d_up (5 x T x I elements). At Qwen3-8B's I = 12288, T x I passes 2**31 from 175K tokens, so offsets go
int64 through the shared ``needs_long_indexing`` helper.

``overwrite_inputs=True`` (for a caller that owns gate and up, such as the model's MLP, whose gate and up are
fresh projection outputs nothing else reads): the backward writes d_gate and d_up over the saved gate and up, which
it no longer needs, instead of allocating two more (T, I) tensors, the largest transient of a checkpointed layer's
backward (2 x 0.375 GiB at 16K tokens with Qwen3-8B shapes). Only intermediates are overwritten (gate and up made
by autograd-tracked ops, never leaves a caller passed in). Their version counters are bumped, so without
saved-tensor hooks a second backward through the same graph (``retain_graph``) fails with autograd's in-place error
instead of reading gradients as inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .indexing import needs_long_indexing
from .launch import LAUNCH_OPTIONS

__all__ = ["geglu", "geglu_reference", "swiglu", "swiglu_reference"]

# Activation codes (a tl.constexpr, so each variant compiles to its own branch-free kernel).
_SILU, _GELU_TANH, _GELU_ERF = 0, 1, 2
_ACTIVATIONS = {"silu": _SILU, "tanh": _GELU_TANH, "none": _GELU_ERF}


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1). |u| is clamped to 20 first: tanh(20) rounds to 1 in fp32 already, and
    # exp(2u) then never overflows (inf would still give the right limit, but warns in the CPU interpreter).
    u = tl.minimum(tl.maximum(u, -20.0), 20.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, WANT_GRAD: tl.constexpr):
    """act(g) and, if WANT_GRAD, act'(g), in fp32.

    Constants: 0.7978845608028654 = sqrt(2/pi) and 0.044715 (tanh approximation), 0.7071067811865476 = 1/sqrt(2),
    0.3989422804014327 = 1/sqrt(2 pi) (standard normal density).
    """
    if ACT == 0:  # silu(g) = g * sigmoid(g); silu' = s * (1 + g * (1 - s))
        s = tl.sigmoid(g)
        a = g * s
        da = a
        if WANT_GRAD:
            da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:  # gelu_tanh(g) = 0.5 g (1 + tanh(k0 (g + k1 g^3)))
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = a
        if WANT_GRAD:
            da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:  # gelu(g) = 0.5 g (1 + erf(g / sqrt 2)); gelu' = Phi(g) + g phi(g)
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = a
        if WANT_GRAD:
            da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return a, da


@triton.jit
def _glu_fwd_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,  # (R, I) contiguous
    I,
    stride_gate,
    stride_up,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
    LONG_INDEXING: tl.constexpr,
):
    """Grid (R, cdiv(I, BLOCK)): program (row, j) computes out[row, j*BLOCK : (j+1)*BLOCK]."""
    row = tl.program_id(0)
    if LONG_INDEXING:
        row = row.to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT, False)
    tl.store(out_ptr + row * I + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dout_ptr,  # (R, I) rows of stride_dout
    gate_ptr,
    up_ptr,
    dgate_ptr,  # (R, I) contiguous
    dup_ptr,  # (R, I) contiguous
    I,
    stride_dout,
    stride_gate,
    stride_up,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
    LONG_INDEXING: tl.constexpr,
):
    """d_up = dout * act(gate); d_gate = dout * up * act'(gate); the activation is recomputed, never stored."""
    row = tl.program_id(0)
    if LONG_INDEXING:
        row = row.to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dy = tl.load(dout_ptr + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT, True)
    tl.store(dup_ptr + row * I + cols, (dy * a).to(dup_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + row * I + cols, (dy * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- host launchers
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """(..., I) -> (R, I) with contiguous rows (a view when the strides allow it, else a copy)."""
    if x.dim() == 0:
        raise ValueError(f"{name} is a scalar: expected a (..., I) tensor.")
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if rows.stride(-1) != 1 and rows.shape[-1] > 1:
        # Only a last dim that is itself strided (e.g. a transposed tensor) needs a copy; strided rows do not.
        rows = rows.contiguous()
    return rows


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    # BLOCK 4096 elements: 8 KB of bf16 per tensor per program, 16 elements per thread with 8 warps (two 16-byte
    # vector loads each). I = 12288 is exactly 3 blocks, so no masked tail at Qwen3 sizes. Tunable in the bench.
    block = min(4096, triton.next_power_of_2(max(1, n_cols)))
    return block, 8 if block >= 2048 else 4


def _launch_glu_fwd(
    gate: torch.Tensor, up: torch.Tensor, act: int, block: int | None = None, num_warps: int | None = None
) -> torch.Tensor:
    g2, u2 = _rows(gate, "gate"), _rows(up, "up")
    n_rows, n_cols = g2.shape
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    default_block, default_warps = _block_and_warps(n_cols)
    block = block or default_block
    grid = (n_rows, triton.cdiv(n_cols, block))
    _glu_fwd_kernel[grid](
        g2,
        u2,
        out,
        n_cols,
        g2.stride(0),
        u2.stride(0),
        ACT=act,
        BLOCK=block,
        LONG_INDEXING=needs_long_indexing(g2, u2, out),
        num_warps=num_warps or default_warps,
        **LAUNCH_OPTIONS,
    )
    return out


def _launch_glu_bwd(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    act: int,
    block: int | None = None,
    num_warps: int | None = None,
    overwrite_inputs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up); ``overwrite_inputs``: into gate's and up's own storage where both are contiguous and
    distinct (each program reads its elements before it writes them), else into new tensors."""
    d2, g2, u2 = _rows(dout, "grad"), _rows(gate, "gate"), _rows(up, "up")
    n_rows, n_cols = g2.shape
    if overwrite_inputs and _can_overwrite(gate, up):
        dgate, dup = gate, up
        for tensor in (gate, up):  # what autograd checks before it hands a saved tensor out again
            torch.autograd.graph.increment_version(tensor)
    else:
        dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dgate.numel() == 0:
        return dgate, dup
    default_block, default_warps = _block_and_warps(n_cols)
    block = block or default_block
    grid = (n_rows, triton.cdiv(n_cols, block))
    _glu_bwd_kernel[grid](
        d2,
        g2,
        u2,
        dgate,
        dup,
        n_cols,
        d2.stride(0),
        g2.stride(0),
        u2.stride(0),
        ACT=act,
        BLOCK=block,
        LONG_INDEXING=needs_long_indexing(d2, g2, u2, dgate),
        num_warps=num_warps or default_warps,
        **LAUNCH_OPTIONS,
    )
    return dgate, dup


def _can_overwrite(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the backward may write d_gate/d_up over gate/up: contiguous (the kernel stores rows of I elements
    one after another) and not sharing storage (a fused gate_up output's two halves)."""
    return (
        gate.is_contiguous()
        and up.is_contiguous()
        and gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr()
    )


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ: expected the same (..., I).")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate is {gate.dtype} but up is {up.dtype}: expected one dtype for both.")
    if gate.dtype not in _DTYPES:
        raise ValueError(f"gate/up are {gate.dtype}: expected one of {_DTYPES}; cast the activations first.")
    if gate.device != up.device:
        raise ValueError(f"gate is on {gate.device} but up on {up.device}: expected one device.")


# ------------------------------------------------------------------------------------------ autograd.Function
class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act, overwrite_inputs):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        # intermediates only (a grad_fn each): a leaf's values belong to whoever passed it in
        ctx.act = act
        ctx.overwrite_inputs = overwrite_inputs and gate.grad_fn is not None and up.grad_fn is not None
        return _launch_glu_fwd(gate, up, act)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        dgate, dup = _launch_glu_bwd(dout, gate, up, ctx.act, overwrite_inputs=ctx.overwrite_inputs)
        return dgate, dup, None, None


# ------------------------------------------------------------------------------------------------ public API
def swiglu(gate: torch.Tensor, up: torch.Tensor, *, overwrite_inputs: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` in one fused Triton pass (forward and backward); gate/up (..., I), rows may be strided.
    ``overwrite_inputs``: the backward writes the gradients over gate and up (module docstring)."""
    _check_pair(gate, up)
    return _GatedActivation.apply(gate, up, _SILU, overwrite_inputs)


def geglu(
    gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *, overwrite_inputs: bool = False
) -> torch.Tensor:
    """``gelu(gate, approximate) * up`` fused; ``"tanh"`` = HF's ``gelu_pytorch_tanh`` (Gemma), ``"none"`` = erf.
    ``overwrite_inputs``: as :func:`swiglu`."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate={approximate!r}: expected 'tanh' (gelu_pytorch_tanh) or 'none' (exact erf).")
    _check_pair(gate, up)
    return _GatedActivation.apply(gate, up, _ACTIVATIONS[approximate], overwrite_inputs)


# ------------------------------------------------------------------------------------------------ reference
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as Hugging Face's LlamaMLP computes it (in the activation dtype)."""
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate) * up``; ``approximate="tanh"`` is HF's ``gelu_pytorch_tanh`` (Gemma), ``"none"`` exact erf."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate={approximate!r}: expected 'tanh' or 'none'.")
    return F.gelu(gate, approximate=approximate) * up
