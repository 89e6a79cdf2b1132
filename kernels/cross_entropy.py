"""Fused linear cross-entropy: lm_head matmul + next-token cross-entropy without the full (T, V) logits.

Shapes: T packed tokens, E hidden size, V vocab.

Work in progress: the public function calls the plain-PyTorch reference until the chunked kernel lands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_reference"]


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token losses and the count of counted tokens; see the reference for the contract."""
    return fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index, softcap)


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch, differentiable reference: materialises the full (T, V) logits.

    hidden (T, E), weight (V, E), labels (T,) unshifted Hugging Face labels. Token t is scored against
    labels[t + 1] (the shift is inside); the last token scores nothing; labels equal to ``ignore_index`` are
    not counted. Logits are computed in fp32 (fp64 for fp64 inputs), optionally soft-capped as
    ``softcap * tanh(logits / softcap)`` (Gemma 2's final_logit_softcapping).

    Returns (loss_sum, n_counted): the fp32 (fp64 for fp64 inputs) sum of token losses and the int64 count of
    counted tokens, both 0-dim. Normalisation is the caller's job.
    """
    compute = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    logits = hidden.to(compute) @ weight.to(compute).T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    targets = labels.new_full(labels.shape, ignore_index)
    targets[:-1] = labels[1:]
    loss_sum = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    n_counted = (targets != ignore_index).sum()
    return loss_sum, n_counted
