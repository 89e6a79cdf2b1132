"""Where a run's device memory goes: weights, trainable weights, gradients, optimizer state, and the step's share.

The persistent part is counted from the tensors themselves (parameters, buffers, gradients, optimizer state: their
storages, each counted once), so it is exact on any device. What one step adds on top (saved activations and the
kernels' workspace, the CUDA-graph pool included) is the measured peak minus that persistent part; the allocator's
slack is what it reserved beyond the peak. The step's share splits into ``saved`` (what a micro-batch's forward
leaves allocated for its backward: checkpoints, kept activations, the loss's saved inputs; measured around each
forward by :class:`ForwardMemory`) and ``workspace`` (the rest of the peak: the backward's transient tensors, a
layer's recompute, the kernels' scratch). Each lever that trades memory (checkpointing, NF4, an 8-bit optimizer)
shows up in exactly one of these lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

__all__ = ["ForwardMemory", "breakdown", "persistent_bytes"]


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


def _storage_bytes(
    tensors: Iterable[torch.Tensor], seen: set[tuple[str, int]], device: torch.device | None = None
) -> int:
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        if device is not None and not _on(tensor, device):
            continue
        if hasattr(tensor, "to_local"):  # an FSDP2-sharded DTensor: this rank's shard
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """The absmax (and nested) tensors bitsandbytes keeps beside a 4-bit weight."""
    state = getattr(param, "quant_state", None)
    tensors: list[torch.Tensor] = []
    while state is not None:
        tensors += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if t is not None]
        state = getattr(state, "state2", None)
    return tensors


def persistent_bytes(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, device: torch.device | None = None
) -> dict[str, int]:
    """Bytes of ``model`` and ``optimizer`` state that live across steps: ``weights`` (frozen parameters, their
    quantization state, buffers), ``trainable`` (parameters that train), ``gradients`` and ``optimizer``.
    ``device``: count only what lives there (``--memory low`` keeps the vocabulary in host memory)."""
    seen: set[tuple[str, int]] = set()
    params = list(model.parameters())
    trainable = _storage_bytes((p for p in params if p.requires_grad), seen, device)
    frozen = [p for p in params if not p.requires_grad]
    weights = _storage_bytes(frozen, seen, device)
    weights += _storage_bytes((t for p in frozen for t in _quant_state_tensors(p)), seen, device)
    weights += _storage_bytes(model.buffers(), seen, device)
    gradients = _storage_bytes((p.grad for p in params if p.grad is not None), seen, device)
    state = optimizer.state.values() if optimizer is not None else []
    tensors = (t for s in state for t in s.values() if isinstance(t, torch.Tensor))
    optimizer_bytes = _storage_bytes(tensors, seen, device)
    return {"weights": weights, "trainable": trainable, "gradients": gradients, "optimizer": optimizer_bytes}


def breakdown(persistent: dict[str, int], device: torch.device, saved: int | None = None) -> dict[str, float]:
    """GiB per line: the persistent parts, then (on CUDA) ``step`` = peak allocated beyond them, ``peak`` and
    ``slack`` = peak reserved beyond the peak allocated; with ``saved`` (bytes, the largest a forward left for its
    backward) also ``saved`` and ``workspace`` = step - saved."""
    gib = {name: value / 2**30 for name, value in persistent.items()}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        gib["step"] = max(0.0, peak - sum(gib.values()))
        if saved is not None:
            gib["saved"] = min(saved / 2**30, gib["step"])
            gib["workspace"] = gib["step"] - gib["saved"]
        gib["peak"] = peak
        gib["slack"] = max(0.0, torch.cuda.max_memory_reserved(device) / 2**30 - peak)
    return gib


class ForwardMemory:
    """The most one forward left allocated for its backward: :func:`breakdown`'s ``saved`` line.

    Read from the CUDA allocator's counter around each measured forward (no sync). Disabled (``enabled`` False, or
    a device that is not CUDA) it measures nothing and ``most`` stays None; so does a run whose every forward was
    left out (the first step's also makes what persists: the RoPE cache, cuBLAS's workspace).
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled and device.type == "cuda"
        self.most: int | None = None

    @contextlib.contextmanager
    def forward(self, measure: bool = True) -> Iterator[None]:
        """Wrap one forward; ``measure`` False leaves it out."""
        active = self.enabled and measure
        before = torch.cuda.memory_allocated(self.device) if active else 0
        yield
        if active:
            self.most = max(self.most or 0, torch.cuda.memory_allocated(self.device) - before)
