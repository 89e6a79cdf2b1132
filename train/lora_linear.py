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


def _plain_lora(module: nn.Module) -> bool:
    if _LoraLinear is None or not isinstance(module, _LoraLinear):
        return False
    if module.disable_adapters or module.merged:
        return False
    active = [name for name in module.active_adapters if name in module.lora_A]
    return bool(active) and not any(name in module.lora_variant for name in active)


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a projection; a plain peft LoRA Linear takes the fused low-rank path (module docstring)."""
    if not _plain_lora(module):
        return module(x)
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
