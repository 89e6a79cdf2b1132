"""Keep Python's cyclic garbage collector from pausing the training loop.

A full (generation 2) collection walks every tracked Python object: with transformers, peft and torch imported
and a model built that is millions of objects, so a collection that happens to fire during an eager step holds
the host for a large fraction of a second while the GPU drains its queue. The objects that exist when the loop
starts (modules, parameters, the optimizer, imported code) live for the whole run, so :func:`frozen_gc` moves
them to the collector's permanent generation (``gc.freeze()``): later collections walk only what the steps
create. On exit it gives them back (``gc.unfreeze()``), so a process that trains twice (tests) still frees the
first model's cycles.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["frozen_gc"]


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Collect once, freeze every object alive now for the duration of the block, unfreeze after it."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
