"""train.host_gc.frozen_gc: objects alive at entry are frozen for the block; garbage made inside is still freed;
everything is unfrozen after."""

from __future__ import annotations

import gc
import weakref

from padless.train.host_gc import frozen_gc


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_frozen_gc_freezes_what_exists_and_still_collects_new_cycles() -> None:
    before = _Node()
    assert gc.get_freeze_count() == 0
    with frozen_gc():
        assert gc.get_freeze_count() > 0
        inside = _Node()
        gone = weakref.ref(inside)
        del inside
        gc.collect()
        assert gone() is None  # a cycle made during training is still collected
        old = weakref.ref(before)
        del before
        gc.collect()
        assert old() is not None  # frozen: a full collection does not walk it
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old() is None  # unfrozen after the block: collectable again
