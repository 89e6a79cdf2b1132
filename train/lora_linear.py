"""LoRA projections in the activations' dtype: one low-rank GEMM pair fused onto the base output.

peft's ``lora.Linear.forward`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` with ``x`` first cast
to the adapter's dtype. On a bf16 base with fp32 adapters (peft's default) that cast copies every (T, E) input
to fp32, runs the two thin GEMMs in fp32 (no tensor cores) and adds two more elementwise passes (scale, add).
Measured on an H200 (Qwen3-8B shapes, LoRA r16 on all seven projections, 16K tokens per step): those casts, fp32
GEMMs and elementwise passes took about 1.0 s of a 2.1 s step.

Here the adapter weights are cast instead (r x E values: free), both thin GEMMs run in the activations' dtype
with fp32 accumulation, and the scaled B-product is accumulated into the base output by ``addmm`` (the GEMM's
epilogue does the add and the scale). Gradients still reach the fp32 adapter parameters through the casts, so
the optimizer keeps fp32 master weights. Results equal peft's up to rounding in the activations' dtype (exact
in fp32, where the casts are no-ops). Anything that is not a plain, unmerged, vanilla LoRA Linear (DoRA and
other variants, merged or disabled adapters, mixed-batch adapter names) falls back to calling the module.

The common case, a frozen base with one adapter and no dropout, is one autograd Function
(:class:`_FrozenLoraLinear`); the base is a ``nn.Linear`` (LoRA) or a bitsandbytes 4-bit layer (QLoRA), whose weight
is dequantized for each GEMM as bitsandbytes does (for QLoRA this also replaces peft's 4-bit forward, which keeps an
fp32 copy of every projection's input for the adapters' backward). Why one Function: with autograd composing
``linear`` + ``addmm``, every projection paid a full copy of its (T, out) base output in the forward (an out-of-
place ``addmm`` copies its input before the GEMM adds into it: 13 of the 14 ``memcpy`` kernels per layer in an H200
profile, 41 ms of a 1.39 s 16K-token step) and an extra elementwise add of two (T, in) gradients in the backward (7
``add_`` kernels per layer, ~27 ms). The Function accumulates in place into tensors it owns: forward ``out = x W^T
(+ b); out += s (x A^T) B^T``, backward ``dx = dy W; dx += s (dy B) A``, ``dA = s (dy B)^T x``, ``dB = s dy^T (x
A^T)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["project"]

try:  # peft is a dependency, but keep the plain path importable without it
    from peft.tuners.lora.layer import Linear as _LoraLinear
except ImportError:  # pragma: no cover - peft missing
    _LoraLinear = None
try:  # peft's LoRA around a bitsandbytes 4-bit layer (QLoRA); absent without bitsandbytes
    from peft.tuners.lora.bnb import Linear4bit as _LoraLinear4bit
except ImportError:
    _LoraLinear4bit = None
_LORA_TYPES = tuple(t for t in (_LoraLinear, _LoraLinear4bit) if t is not None)


def _plain_lora(module: nn.Module) -> bool:
    if not _LORA_TYPES or not isinstance(module, _LORA_TYPES):
        return False
    if module.disable_adapters or module.merged:
        return False
    active = [name for name in module.active_adapters if name in module.lora_A]
    if any(getattr(module, "lora_bias", {}).get(name) for name in active):
        return False  # lora_B has a bias: peft's own forward adds it
    return bool(active) and not any(name in module.lora_variant for name in active)


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A base weight as a dense matrix: itself, or a bitsandbytes 4-bit weight dequantized (a transient copy)."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, state).to(dtype)


class _FrozenLoraLinear(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` for a frozen base (W, b) with gradients for x, A and B only. A 4-bit W
    (QLoRA) is dequantized for its GEMM and again in backward, as bitsandbytes' own matmul does, and never kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        dense = _dense(weight, x.dtype)
        # The result is allocated in its final shape and written through a 2-D view: a custom Function must not
        # return a view (callers such as in-place RoPE modify the projection's output in place).
        result = x.new_empty(*x.shape[:-1], dense.shape[0])
        out = result.view(-1, dense.shape[0])
        if bias is not None:
            torch.addmm(bias.to(x.dtype), x2, dense.t(), out=out)
        else:
            torch.mm(x2, dense.t(), out=out)
        del dense
        xa = x2 @ a.t()  # (T, r)
        out.addmm_(xa, b.t(), alpha=scaling)  # in place: the result is ours, nothing else holds it
        quantized = getattr(weight, "quant_state", None) is not None
        ctx.save_for_backward(x2, xa, None if quantized else weight, a, b)
        ctx.quantized = weight if quantized else None
        ctx.scaling = scaling
        ctx.shape = x.shape
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return result

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2, xa, weight, a, b = ctx.saved_tensors
        if ctx.quantized is not None:
            weight = _dense(ctx.quantized, grad_out.dtype)
        s = ctx.scaling
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        dyb = dy @ b  # (T, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = dy @ weight
            grad_x.addmm_(dyb, a, alpha=s)
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[3]:
            grad_a = (dyb.t() @ x2).mul_(s).to(ctx.dtypes[0])
        if ctx.needs_input_grad[4]:
            grad_b = (dy.t() @ xa).mul_(s).to(ctx.dtypes[1])
        return grad_x, None, None, grad_a, grad_b, None


def _frozen_base(base: nn.Module) -> bool:
    """A plain ``nn.Linear`` or a bitsandbytes 4-bit linear layer (NF4/FP4 weight with its quant_state)."""
    if type(base) is nn.Linear:
        return True
    return isinstance(base, nn.Linear) and getattr(base.weight, "quant_state", None) is not None


def _frozen_single_adapter(module: nn.Module, dtype: torch.dtype) -> str | None:
    """The adapter name when ``module`` can take :class:`_FrozenLoraLinear` for inputs of ``dtype``, else None (a
    4-bit base whose compute dtype differs keeps bitsandbytes' own cast)."""
    base = module.base_layer
    if not _frozen_base(base) or base.weight.requires_grad:
        return None
    quantized = getattr(base.weight, "quant_state", None) is not None
    if quantized and getattr(base, "compute_dtype", None) not in (None, dtype):
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    names = [name for name in module.active_adapters if name in module.lora_A]
    if len(names) != 1 or not isinstance(module.lora_dropout[names[0]], nn.Identity):
        return None
    return names[0]


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a projection; a plain peft LoRA Linear takes the fused low-rank path (module docstring)."""
    if not _plain_lora(module):
        return module(x)
    name = _frozen_single_adapter(module, x.dtype)
    if name is not None:
        base = module.base_layer
        return _FrozenLoraLinear.apply(
            x, base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight,
            float(module.scaling[name]),
        )  # fmt: skip
    result = module.base_layer(x)
    out_features = result.shape[-1]
    result_2d = result.reshape(-1, out_features)
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        a_weight = module.lora_A[name].weight.to(x.dtype)  # (r, in)
        b_weight = module.lora_B[name].weight.to(x.dtype)  # (out, r)
        xa = F.linear(module.lora_dropout[name](x), a_weight).reshape(-1, a_weight.shape[0])  # (T, r)
        # result += scaling * xa @ B^T, the add and scale done by the GEMM epilogue. A new tensor rather than
        # addmm_: the base layer's output may be saved by its own backward (bitsandbytes' 4-bit layers).
        result_2d = torch.addmm(result_2d, xa, b_weight.t(), beta=1.0, alpha=float(module.scaling[name]))
    return result_2d.view(result.shape)
