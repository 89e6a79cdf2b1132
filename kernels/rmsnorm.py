"""RMSNorm over the last dim, Llama/Qwen3 (``offset=0``) and Gemma ``(1 + w)`` (``offset=1``) variants.

Shapes: T packed tokens, E normalized size (hidden size, or D for Qwen3's per-head q/k norms on (T, H, D)).
"""

from __future__ import annotations

import torch

__all__ = ["rms_norm", "rms_norm_reference"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of x over its last dim (placeholder: reference math, Triton kernel follows)."""
    return rms_norm_reference(x, weight, eps, offset)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Out-of-place RMSNorm with Hugging Face's casts.

    ``offset == 0`` (LlamaRMSNorm, Qwen3RMSNorm): normalize in fp32, cast to x's dtype, then multiply by the weight
    (the result dtype follows PyTorch promotion of x and weight). ``offset != 0`` (GemmaRMSNorm with 1.0): multiply
    by ``(offset + weight)`` in fp32 and cast the product to x's dtype.
    """
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)
