"""Rotary position embedding applied in place to q and k of a packed token stream (Hugging Face half-split).

Shapes: T packed tokens, H / Hkv query / key-value heads, D head dim (even), P cache positions.
"""

from __future__ import annotations

import torch

__all__ = ["rope_", "rope_reference"]


def rope_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, H, D) and k (T, Hkv, D) in place (placeholder: reference math, Triton kernel follows)."""
    q_rot, k_rot = rope_reference(q, k, cos, sin, position_ids)
    with torch.no_grad():
        q.copy_(q_rot)
        k.copy_(k_rot)
    return q, k


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
