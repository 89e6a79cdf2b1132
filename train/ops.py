"""Op dispatch for the packed forward: padless's Triton kernels on CUDA, their plain-PyTorch references on CPU.

Why a dispatch layer: the model path calls each op in one place (``ops.swiglu(gate, up)``) and never cares whether
the fused kernel or its reference runs. The choice is per call, from the tensor's device, and can be forced with
the environment variable ``PADLESS_KERNELS=triton|reference`` (``reference`` on a GPU isolates a kernel bug;
``triton`` on a CPU runs the kernels under ``TRITON_INTERPRET=1``, slowly).

Our ``kernels`` package is imported lazily, through ``train.kernels_guard.require_padless_kernels()``, so importing
this module touches neither triton nor a GPU.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from train.kernels_guard import require_padless_kernels

__all__ = [
    "ENV_VAR",
    "backend_for",
    "fused_linear_cross_entropy",
    "geglu",
    "rms_norm",
    "rope",
    "rope_",
    "swiglu",
    "varlen_attention",
]

ENV_VAR = "PADLESS_KERNELS"
_BACKENDS = ("triton", "reference")
_modules: dict[str, ModuleType] = {}


def backend_for(device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` (env ``PADLESS_KERNELS`` overrides the default)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {_BACKENDS} (or unset for the default).")
        return forced
    return "triton" if device.type == "cuda" else "reference"


def _kernel(op: str) -> ModuleType:
    """``kernels.<op>``, imported once, after checking that ``kernels`` is padless's package."""
    module = _modules.get(op)
    if module is None:
        require_padless_kernels()
        module = importlib.import_module(f"kernels.{op}")
        _modules[op] = module
    return module


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, H, D) and k (T, Hkv, D); use the RETURNED tensors (in place on Triton, new ones on reference)."""
    mod = _kernel("rope")
    if backend_for(q.device) == "triton":
        return mod.rope_(q, k, cos, sin, position_ids)
    return mod.rope_reference(q, k, cos, sin, position_ids)


rope_ = rope


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    mod = _kernel("swiglu")
    return (mod.swiglu if backend_for(gate.device) == "triton" else mod.swiglu_reference)(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate, approximate) * up."""
    mod = _kernel("swiglu")
    return (mod.geglu if backend_for(gate.device) == "triton" else mod.geglu_reference)(gate, up, approximate)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim, multiplied by (offset + weight)."""
    mod = _kernel("rmsnorm")
    return (mod.rms_norm if backend_for(x.device) == "triton" else mod.rms_norm_reference)(x, weight, eps, offset)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    mean_seqlen: float | None = None,
) -> torch.Tensor:
    """Block-diagonal causal attention over the packed stream (no mask tensor); ``mean_seqlen`` (the real mean
    example length of a padded stream) only picks the Triton kernel's tiling."""
    mod = _kernel("attention")
    if backend_for(q.device) == "triton":
        return mod.varlen_attention(
            q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap, mean_seqlen=mean_seqlen
        )
    return mod.varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    counted_bound: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses fp32, number of counted tokens); labels unshifted, the shift is inside.

    ``counted_bound`` (Triton kernel only; the reference computes every token): at least the number of counted
    tokens, known on the host: only counted tokens get the lm_head GEMMs, with no host sync.
    """
    mod = _kernel("cross_entropy")
    if backend_for(hidden.device) == "triton":
        fn = mod.fused_linear_cross_entropy
        return fn(hidden, weight, labels, ignore_index, softcap, counted_bound=counted_bound)
    return mod.fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index, softcap)
