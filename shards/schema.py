"""The shard schema: column names, Arrow types and the format version, in one place.

Writer, reader and verifier all read these constants, so a change to the on-disk layout is one edit
here plus a bump of ``FORMAT_VERSION`` (readers refuse versions they do not know).
"""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "EVAL_DIR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PACK_COLUMNS",
    "SCHEMA",
    "shard_file_name",
]

FORMAT_NAME = "padless-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
EVAL_DIR = "eval"  # the held-out set (`prep pack --eval-fraction`), a shard set of its own inside the main one

# One row per pack. List columns hold per-token (or per-example) values; scalars are per pack so that a
# trainer never has to look at the token arrays (or sync with a GPU) to learn sizes.
SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.uint32()), nullable=False),
        pa.field("position_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("cu_seqlens", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
        pa.field("example_index", pa.list_(pa.int64()), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("num_trainable", pa.int32(), nullable=False),
        pa.field("max_seqlen", pa.int32(), nullable=False),
    ]
)
PACK_COLUMNS = tuple(SCHEMA.names)


def shard_file_name(i: int) -> str:
    """File name of shard ``i`` inside a shard-set folder."""
    return f"shard-{i:05d}.arrow"
