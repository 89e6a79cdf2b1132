"""Schedule cache for varlen attention: build the tile schedules of a ``cu_seqlens`` tensor once per micro-batch.

Why: every attention layer of one micro-batch passes the SAME ``cu_seqlens`` tensor and the same tiling, so the
schedules (``attention_fwd.build_schedules``, one launch) are the same for all of them. On short packs called
eagerly the host cost of that launch (tens of microseconds in Triton 3.6) is a visible share of a layer.

Key: the tensor object (held by a weakref, so the cache never keeps a batch alive; the entry is dropped when the
tensor dies), its ``_version`` (any in-place edit, ``copy_`` included, bumps it and so misses), its data pointer,
length and device, the current CUDA stream (a schedule built on one stream is not read unsynchronised on
another), the token count and the block sizes of the tiling. Bounded (``MAX_ENTRIES``, least recently used out).

Limits, by design:
- Writes that bypass the autograd version counter (a Triton kernel or a foreign library writing into the buffer,
  ``tensor.data`` tricks) are not seen: such callers must call ``clear_schedule_cache()`` or turn caching off.
- No lookup and no store while the current CUDA stream is capturing a graph: a schedule built before capture
  would be baked into the graph and go stale when the graph's static ``cu_seqlens`` is refilled for a replay,
  and a schedule built inside one capture lives in that graph's memory pool, which another capture or an eager
  call must not read. Inside a graph the build launch costs no host time anyway.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

__all__ = [
    "MAX_ENTRIES",
    "cached_schedules",
    "clear_schedule_cache",
    "schedule_cache_enabled",
    "schedule_cache_info",
    "set_schedule_cache",
]

# A micro-batch needs one entry per distinct (tiling, grad/no-grad) call; 8 covers a model with a few attention
# kinds (full, sliding window) and the next micro-batch arriving before the last one's tensor is freed.
MAX_ENTRIES = 8

_entries: OrderedDict[tuple, tuple[weakref.ref, tuple[torch.Tensor, ...]]] = OrderedDict()
_state = {"enabled": True, "hits": 0, "misses": 0}


def set_schedule_cache(enabled: bool) -> None:
    """Turn the schedule cache on (default) or off; turning it off also empties it."""
    _state["enabled"] = bool(enabled)
    if not enabled:
        clear_schedule_cache()


def schedule_cache_enabled() -> bool:
    return _state["enabled"]


def clear_schedule_cache() -> None:
    """Drop every cached schedule (and reset the hit/miss counters)."""
    _entries.clear()
    _state["hits"] = _state["misses"] = 0


def schedule_cache_info() -> dict[str, int]:
    """{'hits', 'misses', 'entries'}: for tests and benchmarks."""
    return {"hits": _state["hits"], "misses": _state["misses"], "entries": len(_entries)}


def _drop(key: tuple) -> Callable[[weakref.ref], None]:
    def callback(_ref: weakref.ref) -> None:
        entry = _entries.get(key)
        if entry is not None and entry[0] is _ref:
            del _entries[key]

    return callback


def cached_schedules(
    cu_seqlens: torch.Tensor,
    n_tokens: int,
    blocks: tuple[int, ...],
    build: Callable[[torch.Tensor, int, tuple[int, ...]], tuple[torch.Tensor, ...]],
) -> tuple[torch.Tensor, ...]:
    """``build(cu_seqlens, n_tokens, blocks)``, or the schedules it returned for this same tensor and tiling.

    The returned tensors are shared between calls: callers must only read them (the kernels do).
    """
    if not _state["enabled"] or cu_seqlens.is_inference():  # inference tensors keep no version counter
        return build(cu_seqlens, n_tokens, blocks)
    stream = None
    if cu_seqlens.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return build(cu_seqlens, n_tokens, blocks)
        stream = torch.cuda.current_stream(cu_seqlens.device).cuda_stream
    key = (
        id(cu_seqlens), cu_seqlens._version, cu_seqlens.data_ptr(), cu_seqlens.shape[0], cu_seqlens.device, stream,
        n_tokens, blocks,
    )  # fmt: skip
    entry = _entries.get(key)
    # The weakref check guards against a new tensor that got a dead one's id before its callback ran.
    if entry is not None and entry[0]() is cu_seqlens:
        _entries.move_to_end(key)
        _state["hits"] += 1
        return entry[1]
    _state["misses"] += 1
    scheds = build(cu_seqlens, n_tokens, blocks)
    _entries[key] = (weakref.ref(cu_seqlens, _drop(key)), scheds)
    _entries.move_to_end(key)
    while len(_entries) > MAX_ENTRIES:
        _entries.popitem(last=False)
    return scheds
