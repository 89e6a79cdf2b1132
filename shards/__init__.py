"""The padless shard format: packed examples in zstd-compressed, memory-mappable Arrow IPC files.

``shards.open(path) -> ShardSet``; ``ss[i] -> Pack``; ``ShardWriter`` writes a set. See ``shards/FORMAT.md``.
This package imports nothing else of padless, and no torch.
"""

from __future__ import annotations

from .errors import ShardFormatError
from .pack import IGNORE_INDEX, Pack
from .reader import ShardSet, open_shards
from .schema import FORMAT_NAME, FORMAT_VERSION
from .writer import ShardWriter

open = open_shards  # `shards.open(path)` is the documented entry point

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "Pack",
    "ShardFormatError",
    "ShardSet",
    "ShardWriter",
    "open",
    "open_shards",
]
