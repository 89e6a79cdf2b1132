"""Per-layer activation checkpointing for the packed forward: off, on (recompute), offload (recompute + CPU inputs).

``on``: each decoder layer runs under ``torch.utils.checkpoint`` (``use_reentrant=False``): only the layer input is
kept, the layer is recomputed in the backward (dropout RNG replayed). ``offload``: the same, and the kept layer
inputs go to pinned CPU memory. Non-reentrant checkpointing saves its inputs with ``save_for_backward`` before it
installs its own hooks, so an outer ``torch.autograd.graph.saved_tensors_hooks`` sees exactly those inputs: the pack
hook copies them to pinned host memory, the unpack hook copies them back for the recompute. Peak GPU memory then
holds no per-layer activation at all between forward and backward.

On CUDA, :class:`HostOffload` (the packed path and the Hugging Face fallback alike) keeps the copies off the compute
stream: each device-to-host copy runs on a side stream once its layer input is ready (the compute stream goes on
with the next layer), and in the backward the host-to-device copy of the layer below is started while the current
layer recomputes, so the compute stream only waits for a copy that has had a whole layer's time to finish. One
:class:`HostOffload` serves one forward pass; the tensors of one layer (its input, and what ``--keep-attention``
stores beside it) form one group, brought back together.
"""

from __future__ import annotations

import contextlib
import threading
import typing
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .config import Checkpointing

__all__ = [
    "CHECKPOINTING_MODES",
    "PINNED_POOL",
    "HostOffload",
    "PinnedPool",
    "check_mode",
    "offload_saved_tensors",
    "run_layer",
    "side_stream",
]

CHECKPOINTING_MODES: tuple[str, ...] = typing.get_args(Checkpointing)


class PinnedPool:
    """Pinned host byte buffers reused from one forward pass to the next.

    Pinning memory (``cudaHostAlloc``) costs about as much as the copies it serves, and a packed stream's length
    changes a little from step to step, so a fresh pinned tensor per layer per step (or torch's size-keyed host
    cache) keeps allocating. Buffers are rounded up to ``granule`` bytes and handed out best fit: a free buffer
    serves a request when it is no larger than a fresh one would be, or at most 25% larger than asked; they come
    back when the forward pass that took them is gone. The pool keeps no more free buffers than were ever in use
    at once (the oldest go first), so streams whose lengths drift cannot grow it without bound. All copies into and
    out of them run on one side stream per device (:func:`side_stream`), so a buffer's next write is ordered after
    its last read.
    """

    def __init__(self, granule: int = 8 * 2**20, pinned: bool = True) -> None:
        self.granule = granule
        self.pinned = pinned  # False: plain host memory (tests on machines without CUDA)
        self.allocated = 0  # buffers ever allocated (for tests and logs)
        self._free: list[torch.Tensor] = []
        self._in_use = 0
        self._most_in_use = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A pinned uint8 buffer of at least ``nbytes`` bytes."""
        size = -(-max(nbytes, 1) // self.granule) * self.granule
        with self._lock:
            self._in_use += 1
            self._most_in_use = max(self._most_in_use, self._in_use)
            fits = [b for b in self._free if nbytes <= b.numel() <= max(nbytes * 5 // 4, size)]
            if fits:
                best = min(fits, key=torch.Tensor.numel)
                self._free.remove(best)
                return best
            self.allocated += 1
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            self._in_use -= len(buffers)
            self._free.extend(buffers)
            del self._free[: max(0, len(self._free) - self._most_in_use)]
            buffers.clear()

    def clear(self) -> None:
        """Drop every free buffer (their pinned memory goes back to torch's host allocator)."""
        with self._lock:
            self._free.clear()


PINNED_POOL = PinnedPool()
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one copy stream of ``device`` that every :class:`HostOffload` uses."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


@dataclass
class _Saved:
    """One saved tensor in host memory; ``loaded``/``loaded_event``: its device copy, once one is under way."""

    device: torch.device
    host: torch.Tensor
    stored: torch.cuda.Event | None  # the device-to-host copy is done
    group: int  # the layer it belongs to (its own number outside ``HostOffload.layer``)
    loaded: torch.Tensor | None = None
    loaded_event: torch.cuda.Event | None = None


class HostOffload:
    """Saved-tensor hooks for one forward pass that move saved tensors to pinned host memory and back, with the
    copies on a side CUDA stream and the backward's copy of the next layer down started one layer ahead.

    Use ``with offload.layer(): ...`` around each checkpointed layer of one forward (``run_layer(...,
    offload=offload)`` does): the tensors saved in it, and those given to :meth:`store` meanwhile, are one group.
    Groups are numbered in forward order; bringing back any tensor of group g (the backward walks the layers top
    down) also starts bringing back all of group g - 1, so a layer's tensors are on their way while the layer above
    computes. Outside ``layer``, each tensor saved under :meth:`hooks`
    is a group of its own. Host memory comes from ``pool`` and returns to it when this object is gone (after the
    backward freed the graph). CPU tensors are kept as copies (the same code path, for tests on machines without a
    GPU).
    """

    def __init__(self, pool: PinnedPool = PINNED_POOL) -> None:
        self._saved: list[_Saved] = []
        self._groups: list[list[int]] = []  # saved-tensor indices per group
        self._open: int | None = None  # the group of the layer running now
        self._pool = pool
        self._buffers: list[torch.Tensor] = []
        weakref.finalize(self, pool.give_back, self._buffers)

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context in which tensors saved for backward go through this offloader."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @contextlib.contextmanager
    def layer(self) -> Iterator[None]:
        """One layer's forward: :meth:`hooks`, with everything saved or stored in it as one group."""
        assert self._open is None, "HostOffload.layer does not nest"
        self._open = len(self._groups)
        self._groups.append([])
        try:
            with self.hooks():
                yield
        finally:
            self._open = None

    def store(self, tensor: torch.Tensor) -> int:
        """Move ``tensor`` to host memory like a saved tensor of the open layer; :meth:`retrieve` gives it back."""
        return self._pack(tensor)

    def retrieve(self, index: int) -> torch.Tensor:
        """The tensor :meth:`store` returned ``index`` for, back on its device (starting the group below)."""
        return self._unpack(index)

    def prefetch_last(self) -> None:
        """Start bringing back the last group, the first one the backward needs."""
        if self._groups:
            self._load_group(len(self._groups) - 1)

    def _add(self, saved: _Saved) -> int:
        self._saved.append(saved)
        if saved.group == len(self._groups):
            self._groups.append([])
        self._groups[saved.group].append(len(self._saved) - 1)
        return len(self._saved) - 1

    def _pack(self, tensor: torch.Tensor) -> int:
        group = self._open if self._open is not None else len(self._groups)
        if tensor.device.type != "cuda" or not tensor.is_contiguous():
            # CPU: nothing to offload, the copy keeps one code path; a strided CUDA tensor (never a layer input)
            # takes torch's own pinned allocation.
            host = tensor.detach().clone() if tensor.device.type != "cuda" else tensor.detach().cpu().pin_memory()
            return self._add(_Saved(tensor.device, host, None, group))
        side = side_stream(tensor.device)
        buffer = self._pool.take(tensor.numel() * tensor.element_size())
        self._buffers.append(buffer)
        host = buffer[: tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the layer input is written
        with torch.cuda.stream(side):
            host.copy_(tensor, non_blocking=True)
            stored = torch.cuda.Event()
            stored.record(side)
        tensor.record_stream(side)  # the allocator keeps its memory until the copy is done
        return self._add(_Saved(tensor.device, host, stored, group))

    def _load_group(self, group: int) -> None:
        for index in self._groups[group]:
            self._load(index)

    def _load(self, index: int) -> None:
        """Start the host-to-device copy of saved tensor ``index`` (a no-op if one is under way or it is on CPU)."""
        saved = self._saved[index]
        if saved.loaded is not None or saved.device.type != "cuda":
            return
        current = torch.cuda.current_stream(saved.device)
        loaded = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=saved.device)  # on the compute stream
        side = side_stream(saved.device)
        side.wait_stream(current)  # the block's earlier users on the compute stream are done with it
        with torch.cuda.stream(side):
            if saved.stored is not None:
                side.wait_event(saved.stored)
            loaded.copy_(saved.host, non_blocking=True)
            saved.loaded_event = torch.cuda.Event()
            saved.loaded_event.record(side)
        saved.loaded = loaded

    def _unpack(self, index: int) -> torch.Tensor:
        saved = self._saved[index]
        self._load(index)
        if saved.group > 0:
            self._load_group(saved.group - 1)  # the layer below: its copies overlap this layer's recompute and backward
        if saved.device.type != "cuda":
            return saved.host
        tensor, event = saved.loaded, saved.loaded_event
        saved.loaded, saved.loaded_event = None, None  # a second backward through this graph copies again
        torch.cuda.current_stream(saved.device).wait_event(event)
        return tensor


def offload_saved_tensors() -> torch.autograd.graph.saved_tensors_hooks:
    """A context in which tensors saved for backward live in pinned host memory until the backward needs them
    (a fresh :class:`HostOffload` for one forward pass; the saved tensors' hooks keep it alive until then)."""
    return HostOffload().hooks()


def check_mode(mode: str) -> str:
    """``mode`` if it is a checkpointing mode, else a ValueError naming the choices."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"checkpointing={mode!r}: expected one of {CHECKPOINTING_MODES}.")
    return mode


def run_layer(
    fn: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    mode: str,
    preserve_rng_state: bool = True,
    offload: HostOffload | None = None,
) -> torch.Tensor:
    """``fn(hidden)`` with the activation-memory policy ``mode`` (``off`` | ``on`` | ``offload``).

    ``preserve_rng_state=False`` skips saving and restoring the RNG around the recompute: right when the layer
    draws no random numbers (dropout 0), and needed inside a CUDA graph capture, where older torch releases
    refuse to read the CUDA generator's state. ``offload``: the forward pass's :class:`HostOffload` (one per
    forward, shared by its layers, so that the backward can bring the next layer's input back early); without
    one, ``offload`` mode copies on the compute stream.
    """
    if mode == "off" or not torch.is_grad_enabled():
        return fn(hidden)
    if mode == "on":
        return checkpoint(fn, hidden, use_reentrant=False, preserve_rng_state=preserve_rng_state)
    if mode == "offload":
        with offload.layer() if offload is not None else offload_saved_tensors():
            return checkpoint(fn, hidden, use_reentrant=False, preserve_rng_state=preserve_rng_state)
    raise ValueError(f"checkpointing={mode!r}: expected one of {CHECKPOINTING_MODES}.")
