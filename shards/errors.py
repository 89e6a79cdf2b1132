"""The one exception type of ``shards``: a shard set that is not what the reader or verifier expected."""

from __future__ import annotations

__all__ = ["ShardFormatError"]


class ShardFormatError(ValueError):
    """A shard set is missing, corrupted, truncated, of another format or version, or breaks an invariant."""
