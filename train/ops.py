"""Op dispatch for the packed forward: padless's Triton kernels on CUDA, their plain-PyTorch references on CPU.

Why a dispatch layer: the model path calls each op in one place (``ops.swiglu(gate, up)``) and never cares whether
the fused kernel or its reference runs. The choice is per call, from the tensor's device, and can be forced with
the environment variable ``PADLESS_KERNELS=triton|reference`` (``reference`` on a GPU isolates a kernel bug;
``triton`` on a CPU runs the kernels under ``TRITON_INTERPRET=1``, slowly).

Importing this module imports triton (through ``padless.kernels``) but touches no GPU.
"""

from __future__ import annotations

import os

import torch

from padless.kernels import attention, cross_entropy, embedding_gather, rmsnorm, streamed_cross_entropy
from padless.kernels import rope as rope_kernel
from padless.kernels import swiglu as swiglu_kernel

__all__ = [
    "ENV_VAR",
    "backend_for",
    "fused_linear_cross_entropy",
    "gather_rows",
    "geglu",
    "rms_norm",
    "rope",
    "rope_",
    "streamed_linear_cross_entropy",
    "swiglu",
    "varlen_attention",
]

ENV_VAR = "PADLESS_KERNELS"
_BACKENDS = ("triton", "reference")


def backend_for(device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` (env ``PADLESS_KERNELS`` overrides the default)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {_BACKENDS} (or unset for the default).")
        return forced
    return "triton" if device.type == "cuda" else "reference"


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, H, D) and k (T, Hkv, D); use the RETURNED tensors (in place on Triton, new ones on reference)."""
    if backend_for(q.device) == "triton":
        return rope_kernel.rope_(q, k, cos, sin, position_ids)
    return rope_kernel.rope_reference(q, k, cos, sin, position_ids)


rope_ = rope


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, overwrite_inputs: bool = False) -> torch.Tensor:
    """silu(gate) * up; ``overwrite_inputs``: the kernel's backward reuses gate's and up's memory for their
    gradients (the reference lets autograd allocate)."""
    if backend_for(gate.device) == "triton":
        return swiglu_kernel.swiglu(gate, up, overwrite_inputs=overwrite_inputs)
    return swiglu_kernel.swiglu_reference(gate, up)


def geglu(
    gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *, overwrite_inputs: bool = False
) -> torch.Tensor:
    """gelu(gate, approximate) * up; ``overwrite_inputs`` as :func:`swiglu`."""
    if backend_for(gate.device) == "triton":
        return swiglu_kernel.geglu(gate, up, approximate, overwrite_inputs=overwrite_inputs)
    return swiglu_kernel.geglu_reference(gate, up, approximate)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim, multiplied by (offset + weight)."""
    fn = rmsnorm.rms_norm if backend_for(x.device) == "triton" else rmsnorm.rms_norm_reference
    return fn(x, weight, eps, offset)


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
    *,
    return_lse: bool = False,
    saved: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal causal attention over the packed stream (no mask tensor); ``mean_seqlen`` (the real mean
    example length of a padded stream) only picks the Triton kernel's tiling. ``return_lse``: also the log-sum-exp
    (T, H) fp32; ``saved``: an earlier call's (out, lse) for the same q, k, v, so no attention forward runs (see
    ``padless.kernels.attention.varlen_attention``)."""
    if backend_for(q.device) == "triton":
        return attention.varlen_attention(
            q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap, mean_seqlen=mean_seqlen,
            return_lse=return_lse, saved=saved,
        )  # fmt: skip
    return attention.varlen_attention_reference(
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap, return_lse=return_lse, saved=saved
    )


def gather_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` on ids' device, from a weight there or in pinned host memory (read by the kernel in place);
    an out-of-range id gives a row of zeros. The reference (``PADLESS_KERNELS=reference`` on a GPU) copies through
    the host, which a CUDA graph cannot capture."""
    if backend_for(ids.device) == "triton":
        return embedding_gather.gather_rows(weight, ids)
    return embedding_gather.gather_rows_reference(weight, ids)


def streamed_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    counted_bound: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fused_linear_cross_entropy` for a frozen weight kept in host memory (``--memory low``): the Triton
    path streams the weight to hidden's device in vocab chunks; the reference copies it there whole."""
    if backend_for(hidden.device) == "triton":
        fn = streamed_cross_entropy.streamed_linear_cross_entropy
        return fn(hidden, weight, labels, ignore_index, softcap, counted_bound)
    return fused_linear_cross_entropy(hidden, weight.to(hidden.device), labels, ignore_index, softcap)


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
    if backend_for(hidden.device) == "triton":
        fn = cross_entropy.fused_linear_cross_entropy
        return fn(hidden, weight, labels, ignore_index, softcap, counted_bound=counted_bound)
    return cross_entropy.fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index, softcap)
