"""Selective recomputation: one layer's attention output and log-sum-exp kept with its checkpoint.

A checkpointed layer runs its forward twice: once in the forward pass, once in the backward (the recompute that
rebuilds what the backward needs). At long sequences the attention forward is the dominant cost of that recompute
(quadratic in the example length; the projections are linear), so ``--keep-attention`` keeps the attention's
output and log-sum-exp from the first run and hands them to the recompute, which then rebuilds q, k and v (cheap)
but runs no attention kernel: the attention backward gets exactly the tensors it would have had. The q, k, v of
the recompute are bitwise those of the forward (same kernels, same inputs, dropout RNG replayed by the
checkpoint), so the kept output is theirs.

A :class:`KeptAttention` serves one layer in one forward pass. Its first call is the forward: it runs the
attention and keeps (out, lse), on the GPU or, for an offloaded layer, in the layer's group of the forward's
:class:`~padless.train.activation_checkpoint.HostOffload`. Its second call is the recompute: it hands the kept
pair to the attention (which then only builds the backward's tile schedules) and lets go of it. A later call (a
second backward through a retained graph) computes the attention again. Every call goes through the attention's
one autograd.Function (``return_lse`` / ``saved``), so that a recompute saves what the forward saved, as the
checkpoint checks.
"""

from __future__ import annotations

import torch

from . import ops
from .activation_checkpoint import HostOffload

__all__ = ["KeptAttention"]


class KeptAttention:
    """``ops.varlen_attention`` for one layer in one forward pass, whose recompute reuses the forward's output.

    ``offload``: the forward's :class:`HostOffload` when the layer's checkpoint goes to host memory (the kept pair
    goes with it, in the layer's group); None keeps the pair on its device.
    """

    def __init__(self, offload: HostOffload | None = None) -> None:
        self._offload = offload
        self._kept: tuple[torch.Tensor | int, torch.Tensor | int] | None = None
        self.calls = 0

    def __call__(
        self,
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
        """The attention output (T, H, D), as ``ops.varlen_attention`` with the same arguments returns it."""
        args = (q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap, mean_seqlen)
        self.calls += 1
        if self.calls == 1:  # the forward pass: compute, and keep the pair for the recompute
            out, lse = ops.varlen_attention(*args, return_lse=True)
            self._kept = (self._put(out.detach()), self._put(lse))
            return out
        if self._kept is not None:  # the checkpoint's recompute: the forward's pair, no attention kernel
            saved = (self._get(self._kept[0]), self._get(self._kept[1]))
            self._kept = None  # from here the attention node's saved tensors hold it, until its backward ran
            return ops.varlen_attention(*args, saved=saved)
        # Through the same autograd.Function as the forward (return_lse), which the checkpoint checks: the
        # recompute must save what the forward saved.
        return ops.varlen_attention(*args, return_lse=True)[0]

    def _put(self, tensor: torch.Tensor) -> torch.Tensor | int:
        return tensor if self._offload is None else self._offload.store(tensor)

    def _get(self, kept: torch.Tensor | int) -> torch.Tensor:
        return kept if isinstance(kept, torch.Tensor) else self._offload.retrieve(kept)
