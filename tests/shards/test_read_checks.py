"""What the reader checks before it hands out a pack: shard files inside the set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from padless.shards.errors import ShardFormatError
from padless.shards.reader import open_shards
from padless.shards.writer import ShardWriter

from .test_shards import random_packs

VOCAB = 1000


def _write(path: Path, seed: int = 3, n: int = 120, max_len: int = 64, vocab: int | None = VOCAB, **kw) -> Path:
    tokens, mask, lengths, per, index = random_packs(np.random.default_rng(seed), n, max_len)
    meta = {"tokenizer": {"name": "t", "vocab_size": vocab}} if vocab else {}
    with ShardWriter(path, max_len=max_len, metadata=meta, **kw) as w:
        w.add_packs(tokens % (vocab or 2**32), mask, lengths, per, index)
    return path


def _edit_manifest(path: Path, fn) -> None:
    man = json.loads((path / "manifest.json").read_text())
    fn(man)
    (path / "manifest.json").write_text(json.dumps(man))


# -- shard files stay inside the set ---------------------------------------------------------------------------
def test_a_symlinked_set_folder_and_links_inside_it_are_read(tmp_path):
    real = _write(tmp_path / "real", tokens_per_batch=300, tokens_per_shard=600)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    expect = [p.input_ids.tolist() for p in open_shards(real)]
    assert [p.input_ids.tolist() for p in open_shards(tmp_path / "link")] == expect
    (real / "data").mkdir()
    os.replace(real / "shard-00001.arrow", real / "data" / "moved.arrow")
    (real / "shard-00001.arrow").symlink_to(Path("data") / "moved.arrow")  # relative, inside the set
    assert [p.input_ids.tolist() for p in open_shards(tmp_path / "link")] == expect


def test_a_shard_linked_to_a_file_outside_the_set_is_refused(tmp_path):
    path = _write(tmp_path / "s")
    (tmp_path / "elsewhere").mkdir()
    os.replace(path / "shard-00000.arrow", tmp_path / "elsewhere" / "shard.arrow")  # the very same bytes
    (path / "shard-00000.arrow").symlink_to(tmp_path / "elsewhere" / "shard.arrow")
    with pytest.raises(ShardFormatError, match=r"shard-00000\.arrow' is a link to .*elsewhere/shard\.arrow', outside"):
        open_shards(path)


def test_a_manifest_entry_pointing_outside_the_set_is_refused(tmp_path):
    path = _write(tmp_path / "s")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "shard.arrow").write_bytes((path / "shard-00000.arrow").read_bytes())
    _edit_manifest(path, lambda m: m["shards"][0].update(file="../elsewhere/shard.arrow"))
    with pytest.raises(ShardFormatError, match=r"shards\[0\]\.file is '\.\./elsewhere/shard\.arrow' \(a string\); "
                       r"expected 'shard-00000\.arrow'"):  # fmt: skip
        open_shards(path)


def test_a_symlink_loop_is_an_error(tmp_path):
    path = _write(tmp_path / "s")
    (path / "shard-00000.arrow").unlink()
    (path / "shard-00000.arrow").symlink_to(path / "loop.arrow")
    (path / "loop.arrow").symlink_to(path / "shard-00000.arrow")
    with pytest.raises(
        ShardFormatError, match=r"shard-00000\.arrow' (cannot be resolved|listed in the manifest is mi)"
    ):
        open_shards(path)
