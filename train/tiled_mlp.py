"""Token-tiled MLP: a row-wise function of the token stream run a tile of tokens at a time, forward and backward.

Why: a decoder layer's MLP makes several (T, intermediate) tensors (gate, up, the activation, their gradients); in a
checkpointed layer's backward they are all alive at once, about 5 x 152 MiB at 8K tokens with Qwen3-4B shapes. Rows of
an MLP are independent, so running it on tiles of ``tile_tokens`` rows is exact and bounds those tensors by the tile:
the forward runs each tile without an autograd graph, writing into one (T, out) output, and keeps only the input; the
backward recomputes one tile at a time with an autograd graph, back-propagates it at once, and writes that tile's rows
of the input gradient. The parameters are not inputs of the autograd Function: the nested backward of each tile
accumulates their gradients into ``.grad`` (so ``loss.backward()`` sees them, ``torch.autograd.grad`` does not), and a
gradient hook on them fires once per tile (why the trainer refuses it with DDP/FSDP).

Two Functions, so that non-reentrant activation checkpointing does not recompute the MLP before the tiled backward
recomputes it again: ``_SaveInput`` saves the input and ``_TiledForward`` (which runs the tiles) saves nothing.
Checkpointing's recompute stops once the last tensor saved in the forward has been saved again; when the tiled call
is the last op of the checkpointed function that saves a tensor (as in ``train.packed_forward``), that is its
input, saved before the tiles run, so the recompute ends there.

Random numbers (dropout inside ``fn``): the CPU and CUDA generator states are taken before the forward's first
tile and restored around the backward's tiles, which run in the same order, so every tile draws the same numbers
in both (``preserve_rng_state=False`` skips this when ``fn`` draws none). Autocast is replayed the same way.

CUDA graphs: nothing in either pass syncs with the host or depends on tensor values, and the nested backward adds
into the parameters' existing ``.grad`` in place, so a captured step replays the tiles too. A capture cannot read or
set the generator state: there ``preserve_rng_state`` must be False (no dropout), which the trainer passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["tiled_mlp"]


class _Link:
    """Carries the input-saving node of one tiled call to the tiled node's backward."""

    __slots__ = ("ctx", "input_requires_grad")

    def __init__(self, input_requires_grad: bool) -> None:
        self.ctx = None
        self.input_requires_grad = input_requires_grad


class _SaveInput(torch.autograd.Function):
    """Identity on ``h`` that saves it for the tiled backward (``anchor``: a leaf that puts the call in the graph
    even when ``h`` needs no gradient, so that the parameters inside ``fn`` still get theirs)."""

    @staticmethod
    def forward(ctx, h, anchor, link):  # type: ignore[override]
        ctx.save_for_backward(h)
        ctx.set_materialize_grads(False)  # no zeros of (T, E) when the input needs no gradient
        link.ctx = ctx
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):  # type: ignore[override]
        return grad_h, None, None


class _RngState:
    """The CPU and (for a CUDA input) the input device's generator state, to replay ``fn``'s random numbers."""

    def __init__(self, device: torch.device) -> None:
        if device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"tiled_mlp: cannot keep the random state of a {device.type} tensor; pass preserve_rng_state=False "
                "if fn draws no random numbers (no dropout)."
            )
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _forward_tiles(fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, tile: int) -> torch.Tensor:
    first = fn(h[:tile])
    out = first.new_empty((h.shape[0], *first.shape[1:]))
    out[:tile] = first
    del first
    for start in range(tile, h.shape[0], tile):
        out[start : start + tile] = fn(h[start : start + tile])
    return out


class _TiledForward(torch.autograd.Function):
    """``fn`` over tiles of rows of ``h``; saves nothing (the input comes from ``link``'s ``_SaveInput``)."""

    @staticmethod
    def forward(ctx, h, fn, tile, link, preserve_rng_state):  # type: ignore[override]
        ctx.fn, ctx.tile, ctx.link = fn, tile, link
        ctx.rng = _RngState(h.device) if preserve_rng_state else None
        kind = h.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        return _forward_tiles(fn, h, tile)  # a Function's forward runs without an autograd graph

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        link = ctx.link
        (h,) = link.ctx.saved_tensors  # checkpointing recomputes (up to this save) or brings it back from the host
        link.ctx = None
        need_input = link.input_requires_grad
        grad_h = torch.empty_like(h) if need_input else None
        kind, autocast_on, autocast_dtype = ctx.autocast
        devices = [h.device] if ctx.rng is not None and h.device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices, enabled=ctx.rng is not None),
            torch.enable_grad(),
            torch.autocast(kind, dtype=autocast_dtype, enabled=autocast_on),
        ):
            if ctx.rng is not None:
                ctx.rng.restore()
            for start in range(0, h.shape[0], ctx.tile):
                rows = slice(start, start + ctx.tile)
                h_tile = h[rows].detach().requires_grad_(need_input)
                out_tile = ctx.fn(h_tile)
                if out_tile.requires_grad:
                    torch.autograd.backward(out_tile, grad_out[rows])
                if grad_h is not None:
                    if h_tile.grad is None:
                        grad_h[rows] = 0
                    else:
                        grad_h[rows] = h_tile.grad
        return grad_h, None, None, None, None


def tiled_mlp(
    fn: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    tile_tokens: int,
    *,
    preserve_rng_state: bool = True,
) -> torch.Tensor:
    """``fn(h)`` computed ``tile_tokens`` rows of ``h`` at a time, forward and backward (module docstring).

    ``fn`` must treat rows independently (an MLP, a row-wise norm); it reaches its parameters through its closure
    or module, and their gradients accumulate into ``.grad`` during the backward. ``h``: (T, ...). Returns the
    same values as ``fn(h)``; without grad mode it only runs the tiles.
    """
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be >= 1, got {tile_tokens}.")
    if h.dim() < 1 or h.shape[0] == 0:
        raise ValueError(f"tiled_mlp needs a (T, ...) input with T >= 1; got shape {tuple(h.shape)}.")
    if not torch.is_grad_enabled():
        return _forward_tiles(fn, h, tile_tokens)
    if preserve_rng_state and h.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "tiled_mlp: preserve_rng_state=True inside a CUDA graph capture, which cannot read or set the generator "
            "state; pass preserve_rng_state=False when fn draws no random numbers (no dropout)."
        )
    link = _Link(h.requires_grad)
    anchor = torch.empty(0, device=h.device, requires_grad=True)
    linked = _SaveInput.apply(h, anchor, link)
    return _TiledForward.apply(linked, fn, tile_tokens, link, preserve_rng_state)
