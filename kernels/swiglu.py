"""Gated MLP activations: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up``, fused forward and backward.

Shapes: T packed tokens, I intermediate size; gate and up are (T, I) (or any (..., I)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["geglu", "geglu_reference", "swiglu", "swiglu_reference"]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (placeholder: reference math, Triton kernel follows)."""
    return swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate, approximate) * up (placeholder: reference math, Triton kernel follows)."""
    return geglu_reference(gate, up, approximate)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as Hugging Face's LlamaMLP computes it (in the activation dtype)."""
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate) * up``; ``approximate="tanh"`` is HF's ``gelu_pytorch_tanh`` (Gemma), ``"none"`` exact erf."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate={approximate!r}: expected 'tanh' or 'none'.")
    return F.gelu(gate, approximate=approximate) * up
