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

from .attention_bwd import BwdConfig, flash_bwd
from .attention_fwd import FwdConfig, build_schedule, flash_fwd

__all__ = [
    "BwdConfig",
    "FwdConfig",
    "default_configs",
    "varlen_attention",
    "varlen_attention_reference",
    "varlen_attention_with_configs",
]

# Length buckets for the tiling: short (Alpaca-like, mean <= 256 tokens), medium (<= 2048), long.
SHORT, MEDIUM = 256, 2048
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal, window, softcap
) -> None:
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
    if window is not None and not causal:
        raise ValueError(f"window={window} needs causal=True (Hugging Face sliding_window is causal).")
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
    _check_args(q, k, v, cu_seqlens, causal, window, softcap)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return _reference_impl(q, k, v, cu_seqlens, softmax_scale, causal, window, softcap, compute)


def _pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while n % (2 * p) == 0 and 2 * p <= cap:
        p *= 2
    return p


def default_configs(
    head_dim: int, dtype: torch.dtype, max_seqlen: int, group: int, mean_seqlen: float | None = None
) -> tuple[FwdConfig, BwdConfig]:
    """Hopper (H200) tiling per (D, dtype, length bucket); ``tools/bench_attention.py --sweep`` re-tunes it.

    The bucket follows the mean example length T / S when given (known without a device sync): an Alpaca pack
    has max_seqlen ~1000 but a mean ~130, and it is the mean that decides how much of a big tile is masked.
    Rows of a tile are (query token, head) pairs of one GQA group (HPB heads), so short examples still give the
    tensor cores 64-128 rows while causal waste stays at 16-32-token granularity.
    """
    del dtype  # bf16 and fp16 share tiles; fp32 is a correctness path, not tuned.
    length = min(max_seqlen, mean_seqlen) if mean_seqlen is not None else max_seqlen
    big = head_dim > 128
    short = length <= SHORT
    medium = length <= MEDIUM
    rows = 64 if big else 128
    hpb = _pow2_divisor(group, 8 if short else 4)
    fwd_n = 32 if short else (32 if big else 64 if medium else 128)
    fwd = FwdConfig(
        block_m=max(16, rows // hpb), hpb=hpb, block_n=fwd_n, num_warps=4 if short else 8, num_stages=2 if big else 3
    )
    bwd_rows = 64 if not big else 32
    bhpb = _pow2_divisor(group, 4 if short else 2)
    kv_n = 32 if (short or big) else 64
    bwd = BwdConfig(
        kv_block_n=kv_n, kv_block_m=max(16, bwd_rows // bhpb), kv_hpb=bhpb, kv_warps=4 if short else 8,
        kv_stages=2, q_block_m=max(16, bwd_rows // bhpb), q_hpb=bhpb, q_block_n=kv_n,
        q_warps=4 if short else 8, q_stages=2,
    )  # fmt: skip
    return fwd, bwd


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap, fwd_cfg, bwd_cfg):
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        sched_q = build_schedule(cu_seqlens, q.shape[0], max_seqlen, fwd_cfg.block_m)
        out, lse = flash_fwd(q, k, v, cu_seqlens, sched_q, softmax_scale, causal, window, softcap, fwd_cfg)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, sched_q)
        ctx.args = (max_seqlen, softmax_scale, causal, window, softcap, fwd_cfg, bwd_cfg)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens, sched_q = ctx.saved_tensors
        max_seqlen, softmax_scale, causal, window, softcap, fwd_cfg, bwd_cfg = ctx.args
        T = q.shape[0]
        if bwd_cfg.q_block_m != fwd_cfg.block_m:
            sched_q = build_schedule(cu_seqlens, T, max_seqlen, bwd_cfg.q_block_m)
        sched_kv = build_schedule(cu_seqlens, T, max_seqlen, bwd_cfg.kv_block_n)
        dq, dk, dv = flash_bwd(
            _last_dim_contiguous(dout), q, k, v, out, lse, cu_seqlens, sched_kv, sched_q,
            softmax_scale, causal, window, softcap, bwd_cfg,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None, None, None


def varlen_attention_with_configs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    *,
    fwd_cfg: FwdConfig | None = None,
    bwd_cfg: BwdConfig | None = None,
) -> torch.Tensor:
    """``varlen_attention`` with explicit tilings (tests and the benchmark sweep); None picks the defaults."""
    _check_args(q, k, v, cu_seqlens, causal, window, softcap)
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}: expected one of {SUPPORTED_DTYPES}, all the same; cast "
            "the inputs (use varlen_attention_reference for float64)."
        )
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"q, k, v, cu_seqlens must share a device; got {q.device}, {k.device}, {v.device}, "
                         f"{cu_seqlens.device}.")  # fmt: skip
    if q.shape[2] > 256:
        raise ValueError(f"head dim D={q.shape[2]} is not supported; expected D <= 256.")
    group = q.shape[1] // k.shape[1]
    mean_len = q.shape[0] / max(cu_seqlens.numel() - 1, 1)  # shapes only: no device sync
    d_fwd, d_bwd = default_configs(q.shape[2], q.dtype, max_seqlen, group, mean_len)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    return _VarlenAttention.apply(
        q, k, v, cu_seqlens, int(max_seqlen), float(scale), bool(causal), window,
        None if softcap is None else float(softcap), fwd_cfg or d_fwd, bwd_cfg or d_bwd,
    )  # fmt: skip


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
    """Varlen attention over a packed stream (Triton forward and backward, no T x T tensor anywhere).

    q (T, H, D), k/v (T, Hkv, D) with H % Hkv == 0 (GQA without repeating k/v), ``cu_seqlens`` int32 (S+1,),
    ``max_seqlen`` >= the longest example (a Python int from the shard: no device sync). ``window=W``: token i
    sees keys i-W < j <= i (Hugging Face ``sliding_window``); ``softcap``: Gemma 2 logit capping. bf16/fp16 (and
    fp32) with fp32 accumulation; D <= 256 (64, 80, 96, 128, 256 tuned). The backward is deterministic.
    """
    return varlen_attention_with_configs(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap)
