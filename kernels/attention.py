"""Varlen causal attention over a packed stream: examples packed back to back never see each other.

Shape legend: T packed tokens, S examples, H query heads, Hkv key/value heads (H % Hkv == 0), D head dim.
``cu_seqlens`` (S+1,) int32 holds example boundaries; example s owns tokens ``cu_seqlens[s]:cu_seqlens[s+1]``.

The mask is block-diagonal causal and never materialised: cost is sum(l_s^2), not T^2.
This file keeps the plain-PyTorch reference, the autograd.Function and the public function; the Triton
kernels live in ``kernels.attention_fwd`` / ``kernels.attention_bwd``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["varlen_attention", "varlen_attention_reference"]


def _check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, window, softcap) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (T, H, D) / (T, Hkv, D); got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}. Flatten the batch into the packed token axis first."
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"k and v must be (T, Hkv, D) matching q (T, H, D)={tuple(q.shape)}; got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}."
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"H={q.shape[1]} query heads is not a multiple of Hkv={k.shape[1]} key/value heads; GQA needs H % Hkv == 0."
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor (S+1,); got dtype {cu_seqlens.dtype}, shape "
            f"{tuple(cu_seqlens.shape)}. Use cu_seqlens.to(torch.int32)."
        )
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be None or a positive int (Hugging Face sliding_window).")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be None or > 0 (Gemma 2 attn_logit_softcapping).")


def _reference_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None,
    causal: bool,
    window: int | None,
    softcap: float | None,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """Per-example attention in ``compute_dtype`` (tests use the input dtype to measure PyTorch's own error)."""
    T, H, D = q.shape
    group = H // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bounds = cu_seqlens.tolist()  # host sync: fine in the reference
    outs = []
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        n = b - a
        if n == 0:
            continue
        qs = q[a:b].to(compute_dtype).transpose(0, 1)  # (H, n, D)
        ks = k[a:b].to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[a:b].to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale  # (H, n, n)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        keep = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if causal:
            keep &= j <= i
        if window is not None:
            keep &= j > i - window
            if not causal:
                keep &= j < i + window
        scores = scores.masked_fill(~keep, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        outs.append((p @ vs).transpose(0, 1))
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={T}; got {bounds[0]} .. {bounds[-1]}.")
    return torch.cat(outs, dim=0).to(q.dtype) if outs else q.new_zeros(q.shape)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch per-example attention (fp32 inside, fp64 if given fp64), differentiable; returns q.dtype.

    GQA repeats k/v here only. ``window=W``: token i sees j with i-W < j <= i. ``softcap``: scores become
    softcap*tanh(scores/softcap) before masking.
    """
    _check_args(q, k, v, cu_seqlens, window, softcap)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return _reference_impl(q, k, v, cu_seqlens, softmax_scale, causal, window, softcap, compute)


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
) -> torch.Tensor:
    """Varlen attention over a packed stream; q (T, H, D), k/v (T, Hkv, D), cu_seqlens int32 (S+1,)."""
    return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap)
