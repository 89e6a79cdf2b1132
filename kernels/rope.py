"""Rotary position embedding applied in place to q and k of a packed token stream (Hugging Face half-split).

Shapes: T packed tokens, H / Hkv query / key-value heads, D head dim (even; 64, 80, 96, 128, 256, ...),
P cache positions, HALF = D / 2.

Why in place and in one launch: RoPE is pure bandwidth (read q and k once, write them once). Doing q and k in
one launch, each program rotating BLOCK_T tokens x all heads, reads each token's cos/sin row once for all
H + Hkv heads and keeps every memory access a wide contiguous load of a head's two halves. Writing back into q
and k means no extra activation memory; the backward is the transposed rotation (angle -theta), applied in
place to the incoming gradients.

Each token's angle comes from its own ``position_ids`` entry, so positions restarting at every packed example
cost nothing. Convention: Hugging Face ``rotate_half``, i.e. for x = [x1, x2] (halves of D),
``x1' = x1 cos - x2 sin`` and ``x2' = x2 cos + x1 sin`` with cos/sin the (P, HALF) cache rows.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .indexing import needs_long_indexing
from .launch import LAUNCH_OPTIONS

__all__ = ["rope_", "rope_reference"]


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _rotate_heads(
    x_ptr,
    stride_t,
    stride_h,
    tok,  # (BLOCK_T,) token indices, int32 or int64
    tok_mask,  # (BLOCK_T,)
    cos,  # (BLOCK_T, HALF_PAD) fp32
    sin,  # (BLOCK_T, HALF_PAD) fp32, already negated for the backward
    N_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """Rotate x[tok, :N_HEADS, :] in place; x has strides (stride_t, stride_h, 1)."""
    heads = tl.arange(0, HEADS_PAD)
    cols = tl.arange(0, HALF_PAD)
    # (BLOCK_T, HEADS_PAD, HALF_PAD) offsets of the first half; the second half is HALF elements further.
    offs = tok[:, None, None] * stride_t + heads[None, :, None] * stride_h + cols[None, None, :]
    mask = tok_mask[:, None, None] & (heads[None, :, None] < N_HEADS) & (cols[None, None, :] < HALF)
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    tl.store(x_ptr + offs, y1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + offs + HALF, y2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,  # (P, HALF) fp32, contiguous
    sin_ptr,
    pos_ptr,  # (T,) int32 or int64
    T,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    H: tl.constexpr,
    HKV: tl.constexpr,
    H_PAD: tl.constexpr,
    HKV_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BACKWARD: tl.constexpr,
    LONG_INDEXING: tl.constexpr,
):
    """One program rotates BLOCK_T tokens x (H query + HKV key heads) in place."""
    pid = tl.program_id(0)
    if LONG_INDEXING:
        pid = pid.to(tl.int64)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < T
    pos = tl.load(pos_ptr + tok, mask=tok_mask, other=0)
    if LONG_INDEXING:
        pos = pos.to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    cs_offs = pos[:, None] * HALF + cols[None, :]
    cs_mask = tok_mask[:, None] & (cols[None, :] < HALF)
    cos = tl.load(cos_ptr + cs_offs, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs_offs, mask=cs_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        sin = -sin  # the transpose of a rotation by theta is the rotation by -theta
    _rotate_heads(q_ptr, stride_qt, stride_qh, tok, tok_mask, cos, sin, H, H_PAD, HALF, HALF_PAD)
    if HKV > 0:
        _rotate_heads(k_ptr, stride_kt, stride_kh, tok, tok_mask, cos, sin, HKV, HKV_PAD, HALF, HALF_PAD)


# ------------------------------------------------------------------------------------------- host launchers
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_rotatable(x: torch.Tensor, name: str) -> None:
    """x must be (T, heads, D) with contiguous, non-overlapping heads (strided rows are fine)."""
    if x.dim() != 3:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected 3 dims (T, heads, D).")
    _, n_heads, d = x.shape
    st, sh, sd = x.stride()
    if sd != 1:
        raise ValueError(
            f"{name} has last-dim stride {sd}: rope_ needs each head's D values contiguous (stride 1). "
            f"Pass a view whose last dim is contiguous, e.g. {name}.contiguous()."
        )
    if sh < d or st < (n_heads - 1) * sh + d:
        raise ValueError(
            f"{name} with shape {tuple(x.shape)} and strides {x.stride()} has overlapping (T, heads) rows, so it "
            f"cannot be rotated in place; pass a tensor with stride(1) >= D and stride(0) >= (heads - 1) * "
            f"stride(1) + D (e.g. {name}.contiguous())."
        )


# A program's share of an SM's work: each SM runs about cdiv(T, BLOCK_T) / SMs programs, and the SMs finish
# up to one program apart, so the idle tail is up to 1 / (programs per SM) of the run. At least 8 programs per SM
# keeps it <= 12.5%.
_MIN_PROGRAMS_PER_SM = 8


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_block_t(t: int, n_heads_total: int, d: int, n_sms: int | None) -> int:
    """Tokens per program: ~16K elements per program, halved while the grid has < 8 programs per SM.

    About 16K elements (BLOCK_T = 4 at Qwen3-8B's 32 + 8 heads x D 128) gives each program enough work to hide
    latency, small enough to stay in registers (q and k heads are rotated one after the other, so at most
    BLOCK_T x H x D values are live). sm_90 register counts (Triton 3.6 offline compile, 8 warps): BLOCK_T 4 ->
    127 registers, 2 programs resident per SM, 2 x 40 KB of q/k loads in flight; BLOCK_T 2 -> 64 registers, 4
    resident, 4 x 20 KB: the same bytes in flight per SM, so halving BLOCK_T costs nothing in bandwidth. Small T
    launches few programs: on an H200 (do_bench, launch path included) 3.89-4.10 TB/s at T = 16K/64K
    (4096/16384 programs of 4 tokens) but 1.37 TB/s at 4K, 1024 programs = 7.8 per SM, so SMs idle for up to
    13% of the run at the end. T = 4096 -> BLOCK_T = 2: 2048 programs, 15.5 per SM, tail <= 6.5%; T >= 16K keeps
    4. Most of the 4K gap is the launch path (0.063 ms for 21 us of traffic), which the graph-timed bench
    separates. ``n_sms=None`` (CPU interpreter): no shrinking, fewer, larger programs are fastest there.
    Tunable: ``tools/bench_kernels.py --sweep`` times BLOCK_T 1-8 by graph replay.
    """
    block_t = min(16, triton.next_power_of_2(max(1, 16384 // (n_heads_total * d))))
    if n_sms:
        min_programs = _MIN_PROGRAMS_PER_SM * n_sms
        while block_t > 1 and triton.cdiv(t, block_t) < min_programs:
            block_t //= 2
    return block_t


def _launch_rope(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
    backward: bool,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Rotate q and (if given) k in place (``backward=True``: by -theta). Shapes are checked by the caller."""
    t, h, d = q.shape
    if t == 0:
        return
    # k=None rotates q alone (backward of one gradient): the k pointer is unused when HKV is 0.
    hkv = 0 if k is None else k.shape[1]
    k_ptr, stride_kt, stride_kh = (q, 0, 0) if k is None else (k, k.stride(0), k.stride(1))
    half = d // 2
    n_sms = None
    if q.is_cuda:
        n_sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    block_t = block_t or _default_block_t(t, h + hkv, d, n_sms)
    grid = (triton.cdiv(t, block_t),)
    _rope_kernel[grid](
        q,
        k_ptr,
        cos,
        sin,
        position_ids,
        t,
        q.stride(0),
        q.stride(1),
        stride_kt,
        stride_kh,
        H=h,
        HKV=hkv,
        H_PAD=triton.next_power_of_2(h),
        HKV_PAD=max(1, triton.next_power_of_2(hkv)),
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        BLOCK_T=block_t,
        BACKWARD=backward,
        LONG_INDEXING=needs_long_indexing(q, k, position_ids, cos),
        num_warps=num_warps or (8 if block_t * (h + hkv) * d >= 8192 else 4),
        **LAUNCH_OPTIONS,
    )


def _prepare_rope_args(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes; return cos/sin as contiguous fp32 (P, HALF) and position_ids as a contiguous (T,) int."""
    _check_rotatable(q, "q")
    _check_rotatable(k, "k")
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"k has shape {tuple(k.shape)}: expected ({t}, Hkv, {d}) to match q {tuple(q.shape)}.")
    if q.dtype != k.dtype:
        raise ValueError(f"q is {q.dtype} but k is {k.dtype}: expected one dtype for both.")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q and k are {q.dtype}: rope_ supports {_DTYPES}; cast the activations first.")
    if d % 2:
        raise ValueError(f"head dim D={d} is odd: RoPE's half-split rotation needs an even D.")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != d // 2:
            raise ValueError(
                f"{name} has shape {tuple(table.shape)}: expected (max_pos, D/2) = (P, {d // 2}) "
                "(the fp32 cache of cos/sin(position * inv_freq), not HF's duplicated (.., D) form)."
            )
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ: expected the same (P, D/2).")
    if position_ids.shape != (t,):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}: expected ({t},), one per token.")
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"position_ids is {position_ids.dtype}: expected torch.int32 or torch.int64.")
    # The cache is small (P x D/2), so converting it is cheap; the activations are never copied.
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    return cos, sin, position_ids.contiguous()


def _writable_grad(grad: torch.Tensor) -> torch.Tensor:
    """The incoming gradient if it can be rotated in place, else a contiguous copy (e.g. stride-0 from a sum)."""
    st, sh, sd = grad.stride()
    _, n_heads, d = grad.shape
    if sd == 1 and sh >= d and st >= (n_heads - 1) * sh + d:
        return grad
    return grad.contiguous()


# ------------------------------------------------------------------------------------------ autograd.Function
class _RopeInPlace(torch.autograd.Function):
    """Rotates q and k in place in one launch; returns both. Only for q, k that are not views (see below)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):  # type: ignore[override]
        _launch_rope(q, k, cos, sin, position_ids, backward=False)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin, position_ids)
        return q, k

    @staticmethod
    def backward(ctx, grad_q, grad_k):  # type: ignore[override]
        # Autograd materialises a missing gradient as fresh zeros (set_materialize_grads defaults to True).
        cos, sin, position_ids = ctx.saved_tensors
        grad_q, grad_k = _writable_grad(grad_q), _writable_grad(grad_k)
        _launch_rope(grad_q, grad_k, cos, sin, position_ids, backward=True)
        return grad_q, grad_k, None, None, None


# PyTorch's autograd refuses a Function that modifies a *view* in place and returns more than one tensor, and q
# and k are almost always views (``q_proj(x).view(T, H, D)``). So for views the work is split over two
# single-output Functions: the first rotates q and k in one launch but tells autograd only about q; the second,
# applied immediately after, tells autograd that k was modified (bumping its version counter) and owns k's
# backward. The forward stays one launch; the backward is one launch per gradient (q's and k's gradients reach
# the engine at different times).
class _RopeQAndK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):  # type: ignore[override]
        _launch_rope(q, k, cos, sin, position_ids, backward=False)
        ctx.mark_dirty(q)
        ctx.save_for_backward(cos, sin, position_ids)
        return q

    @staticmethod
    def backward(ctx, grad_q):  # type: ignore[override]
        cos, sin, position_ids = ctx.saved_tensors
        grad_q = _writable_grad(grad_q)
        _launch_rope(grad_q, None, cos, sin, position_ids, backward=True)
        return grad_q, None, None, None, None


class _RopeKAlreadyRotated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, cos, sin, position_ids):  # type: ignore[override]
        ctx.mark_dirty(k)  # k's data was rotated by _RopeQAndK; this records the in-place change for autograd
        ctx.save_for_backward(cos, sin, position_ids)
        return k

    @staticmethod
    def backward(ctx, grad_k):  # type: ignore[override]
        cos, sin, position_ids = ctx.saved_tensors
        grad_k = _writable_grad(grad_k)
        _launch_rope(grad_k, None, cos, sin, position_ids, backward=True)
        return grad_k, None, None, None


# ------------------------------------------------------------------------------------------------ public API
def rope_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, H, D) and k (T, Hkv, D) **in place** by each token's own position; return (q, k).

    cos/sin: (P, D/2) cache (fp32) of ``cos/sin(position * inv_freq)`` (times any attention scaling);
    position_ids: (T,) int32/int64, e.g. restarting at 0 for every packed example. q and k may be strided views
    (e.g. slices of a fused qkv projection) but each head's D values must be contiguous. Works inside autograd:
    the backward rotates the incoming gradient buffers in place by -theta and passes them on (a gradient that
    cannot be written in place, e.g. the stride-0 one of ``q.sum()``, is copied first). So a tensor handed to
    ``torch.autograd.grad(..., grad_outputs=...)`` for q or k directly is overwritten; inside a model the
    gradients are the engine's own buffers. q and k must not be leaves that require grad (PyTorch forbids
    in-place ops on those); pass ``x.clone()`` there.
    """
    cos, sin, position_ids = _prepare_rope_args(q, k, cos, sin, position_ids)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        _launch_rope(q, k, cos, sin, position_ids, backward=False)
        return q, k
    if not q._is_view() and not k._is_view():
        return _RopeInPlace.apply(q, k, cos, sin, position_ids)
    q = _RopeQAndK.apply(q, k, cos, sin, position_ids)
    k = _RopeKAlreadyRotated.apply(k, cos, sin, position_ids)
    return q, k


# ------------------------------------------------------------------------------------------------ reference
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place RoPE exactly as Hugging Face computes it (``apply_rotary_pos_emb`` with ``rotate_half``).

    q (T, H, D), k (T, Hkv, D); cos/sin (P, D/2) fp32 caches of ``cos(position * inv_freq)``; position_ids (T,).
    Like HF, the per-token (D,) cos/sin (``cat(freqs, freqs)``) are cast to q's dtype before the products, so the
    arithmetic happens in the activation dtype.
    """
    cos_t = cos[position_ids.long()]
    sin_t = sin[position_ids.long()]
    cos_full = torch.cat((cos_t, cos_t), dim=-1).unsqueeze(1)  # (T, 1, D)
    sin_full = torch.cat((sin_t, sin_t), dim=-1).unsqueeze(1)
    q_rot = q * cos_full.to(q.dtype) + _rotate_half(q) * sin_full.to(q.dtype)
    k_rot = k * cos_full.to(k.dtype) + _rotate_half(k) * sin_full.to(k.dtype)
    return q_rot, k_rot
