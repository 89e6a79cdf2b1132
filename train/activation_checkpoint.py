"""Per-layer activation checkpointing for the packed forward: off, on (recompute), offload (recompute + CPU inputs).

``on``: each decoder layer runs under ``torch.utils.checkpoint`` (``use_reentrant=False``): only the layer input is
kept, the layer is recomputed in the backward (dropout RNG replayed). ``offload``: the same, and the kept layer
inputs go to pinned CPU memory. Non-reentrant checkpointing saves its inputs with ``save_for_backward`` before it
installs its own hooks, so an outer ``torch.autograd.graph.saved_tensors_hooks`` sees exactly those inputs: the pack
hook copies them to pinned host memory (asynchronously, on the current stream), the unpack hook copies them back
for the recompute. Peak GPU memory then holds no per-layer activation at all between forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["CHECKPOINTING_MODES", "check_mode", "offload_saved_tensors", "run_layer"]

CHECKPOINTING_MODES = ("off", "on", "offload")


def _pack_to_host(tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
    if tensor.device.type == "cpu":
        # Nothing to offload; a copy still exercises the same path on CPU test machines.
        return tensor.device, tensor.detach().clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return tensor.device, host


def _unpack_to_device(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
    device, host = packed
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def offload_saved_tensors() -> torch.autograd.graph.saved_tensors_hooks:
    """A context in which tensors saved for backward live in pinned host memory until the backward needs them."""
    return torch.autograd.graph.saved_tensors_hooks(_pack_to_host, _unpack_to_device)


def check_mode(mode: str) -> str:
    """``mode`` if it is a checkpointing mode, else a ValueError naming the choices."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"checkpointing={mode!r}: expected one of {CHECKPOINTING_MODES}.")
    return mode


def run_layer(
    fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, mode: str, preserve_rng_state: bool = True
) -> torch.Tensor:
    """``fn(hidden)`` with the activation-memory policy ``mode`` (``off`` | ``on`` | ``offload``).

    ``preserve_rng_state=False`` skips saving and restoring the RNG around the recompute: right when the layer
    draws no random numbers (dropout 0), and needed inside a CUDA graph capture, where older torch releases
    refuse to read the CUDA generator's state.
    """
    if mode == "off" or not torch.is_grad_enabled():
        return fn(hidden)
    if mode == "on":
        return checkpoint(fn, hidden, use_reentrant=False, preserve_rng_state=preserve_rng_state)
    if mode == "offload":
        with offload_saved_tensors():
            return checkpoint(fn, hidden, use_reentrant=False, preserve_rng_state=preserve_rng_state)
    raise ValueError(f"checkpointing={mode!r}: expected one of {CHECKPOINTING_MODES}.")
