"""shards: writer/reader round trip, the labels convention, atomic writes, and every corruption caught."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from padless.shards.errors import ShardFormatError
from padless.shards.reader import open_shards
from padless.shards.verify import verify_shard_set
from padless.shards.writer import ShardWriter

from .packs import random_packs, rewrite_column


def write(path: Path, data, max_len=64, **kw) -> Path:
    with ShardWriter(path, max_len=max_len, metadata={"note": "test"}, **kw) as w:
        w.add_packs(*data)
    return path


def test_round_trip_and_pack_contract(tmp_path):
    rng = np.random.default_rng(1)
    data = random_packs(rng, 500, 64)
    tokens, mask, lengths, per, index = data
    ss = open_shards(write(tmp_path / "s", data, tokens_per_batch=300, tokens_per_shard=2000))
    assert len(ss.manifest["shards"]) > 1 and len(ss) == len(per) and ss.max_len == 64
    assert ss.manifest["note"] == "test"
    ex_start = np.concatenate([[0], np.cumsum(lengths)])
    e = 0
    for i in range(len(ss)):
        p = ss[i]
        n_ex = int(per[i])
        lens = lengths[e : e + n_ex]
        a, b = ex_start[e], ex_start[e + n_ex]
        assert p.input_ids.dtype == np.uint32 and p.position_ids.dtype == np.int32
        assert p.cu_seqlens.dtype == np.int32 and p.loss_mask.dtype == np.bool_
        assert p.labels.dtype == np.int64 and p.example_index.dtype == np.int64
        np.testing.assert_array_equal(p.input_ids, tokens[a:b])
        np.testing.assert_array_equal(p.loss_mask, mask[a:b])
        np.testing.assert_array_equal(p.cu_seqlens, np.concatenate([[0], np.cumsum(lens)]))
        np.testing.assert_array_equal(p.position_ids, np.concatenate([np.arange(n) for n in lens]))
        np.testing.assert_array_equal(p.example_index, index[e : e + n_ex])
        expect_labels = [int(t) if m else -100 for t, m in zip(tokens[a:b], mask[a:b])]
        assert p.labels.tolist() == expect_labels
        assert (p.num_tokens, p.num_trainable, p.max_seqlen) == (b - a, int(mask[a:b].sum()), int(lens.max()))
        assert not p.loss_mask[p.cu_seqlens[:-1]].any()
        e += n_ex
    assert ss[-1].num_tokens == ss[len(ss) - 1].num_tokens
    with pytest.raises(IndexError, match="out of range"):
        ss[len(ss)]
    verify_shard_set(tmp_path / "s")


def test_order_is_seeded_permutation(tmp_path):
    ss = open_shards(write(tmp_path / "s", random_packs(np.random.default_rng(2), 300, 64)))
    o = ss.order(seed=3, epoch=0)
    assert o.dtype == np.int64 and sorted(o.tolist()) == list(range(len(ss)))
    np.testing.assert_array_equal(o, ss.order(3, 0))
    assert not np.array_equal(o, ss.order(3, 1)) and not np.array_equal(o, ss.order(4, 0))


def test_writer_validates_before_touching_disk(tmp_path):
    with pytest.raises(ValueError, match="max_len=0"):
        ShardWriter(tmp_path / "s", max_len=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        ShardWriter(tmp_path / "full", max_len=16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardWriter(tmp_path / "no" / "s", max_len=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_writer_leaves_nothing_on_error(tmp_path):
    tokens, mask, lengths, per, index = random_packs(np.random.default_rng(3), 50, 64)
    bad_mask = mask.copy()
    bad_mask[0] = True
    w = ShardWriter(tmp_path / "s", max_len=64)
    with pytest.raises(ValueError, match="first token of example 0"), w:
        w.add_packs(tokens, bad_mask, lengths, per, index)
    with pytest.raises(ValueError, match="over max_len=8"), ShardWriter(tmp_path / "s", max_len=8) as w:
        w.add_packs(tokens, mask, lengths, per, index)
    assert list(tmp_path.iterdir()) == []


def test_a_writer_replaces_nothing_written_to_its_path_meanwhile(tmp_path):
    """Without overwrite, a set that another writer finished at the same path first is kept, and the writer that
    finds the path taken fails leaving nothing behind."""
    a_data = random_packs(np.random.default_rng(5), 40, 64)
    b_data = random_packs(np.random.default_rng(6), 30, 64)
    (tmp_path / "empty").mkdir()
    for name in ("new", "empty"):
        path = tmp_path / name
        with pytest.raises(FileExistsError, match=rf"output '.*{name}' was written by another process while this "
                           r"writer ran; nothing was replaced"), ShardWriter(path, max_len=64) as a:  # fmt: skip
            a.add_packs(*a_data)
            write(path, b_data)
        assert len(open_shards(path)) == len(b_data[3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (-1, r"token id -1 \(token 7\) does not fit input_ids' uint32: expected ids in \[0, 4294967295\]"),
        (2**32 + 5, r"token id 4294967301 \(token 7\) does not fit input_ids' uint32"),
        (2.5, r"token ids of dtype float64: expected integers"),
    ],
    ids=["negative", "past-uint32", "float"],
)
def test_writer_refuses_token_ids_that_do_not_fit_uint32(tmp_path, bad, match):
    """Cast to uint32 as they were, -1 would be stored as 4294967295 and 2^32 + 5 as 5: other tokens, silently."""
    tokens, mask, lengths, per, index = random_packs(np.random.default_rng(3), 50, 64, vocab=1000)
    tokens = tokens.astype(np.float64 if isinstance(bad, float) else np.int64)
    tokens[7] = bad
    w = ShardWriter(tmp_path / "s", max_len=64)
    with pytest.raises(ValueError, match=match), w:
        w.add_packs(tokens, mask, lengths, per, index)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["example_lengths", "examples_per_pack", "example_index"])
def test_writer_refuses_counts_that_are_not_integers(tmp_path, which):
    """A float length or count would be truncated into another, valid-looking layout."""
    tokens, mask, lengths, per, index = random_packs(np.random.default_rng(3), 50, 64, vocab=1000)
    args = {"example_lengths": lengths, "examples_per_pack": per, "example_index": index}
    args[which] = args[which].astype(np.float64)
    w = ShardWriter(tmp_path / "s", max_len=64)
    with pytest.raises(ValueError, match=rf"^{which} of dtype float64: expected integers$"), w:
        w.add_packs(tokens, mask, **args)
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_other_formats_and_versions(tmp_path):
    path = write(tmp_path / "s", random_packs(np.random.default_rng(4), 50, 64))
    with pytest.raises(ShardFormatError, match="not a padless shard set"):
        open_shards(tmp_path)
    man = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(ShardFormatError, match=r"unsupported shard format version 99 .*expected version 1"):
        open_shards(path)
    (path / "manifest.json").write_text(json.dumps({**man, "format": "mds"}))
    with pytest.raises(ShardFormatError, match="has format 'mds', expected 'padless-shards'"):
        open_shards(path)
    schema = [list(x) for x in man["schema"]]
    schema[0][1] = "list<item: int64>"
    (path / "manifest.json").write_text(json.dumps({**man, "schema": schema}))
    with pytest.raises(ShardFormatError, match=r"declares the schema .* expected"):
        open_shards(path)


def test_truncated_shard_caught_by_reader_and_verify(tmp_path):
    path = write(tmp_path / "s", random_packs(np.random.default_rng(5), 200, 64))
    f = path / "shard-00000.arrow"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ShardFormatError, match=r"shard-00000.arrow' is \d+ bytes, expected \d+ \(truncated"):
        open_shards(path)
    with pytest.raises(ShardFormatError, match="truncated"):
        verify_shard_set(path)


def test_corrupted_shard_caught_by_reader_and_verify(tmp_path):
    path = write(tmp_path / "s", random_packs(np.random.default_rng(6), 200, 64))
    f = path / "shard-00000.arrow"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    ss = open_shards(path)  # same size: only the checksum can tell
    with pytest.raises(ShardFormatError, match=r"shard-00000\.arrow' is corrupted: sha256"):
        ss[0]
    with pytest.raises(ShardFormatError, match=r"shard-00000\.arrow: sha256 .* expected .*corrupted"):
        verify_shard_set(path)


@pytest.mark.parametrize(
    ("column", "fn", "message"),
    [
        ("position_ids", lambda v: np.where(np.arange(len(v)) == 5, v + 1, v), r"position_ids\[\d+\]=\d+, expected"),
        ("loss_mask", lambda v: np.ones_like(v), "loss_mask is True on the first token of example 0"),
        ("cu_seqlens", lambda v: v + 1, "cu_seqlens .* must start at 0"),
    ],
)
def test_verify_names_shard_and_pack(tmp_path, column, fn, message):
    path = write(tmp_path / "s", random_packs(np.random.default_rng(7), 100, 64))
    rewrite_column(path, column, fn)
    with pytest.raises(ShardFormatError, match=rf"shard-00000.arrow' pack 0 \(global pack 0\): {message}"):
        verify_shard_set(path)


def test_shards_imports_no_torch_and_nothing_of_ours():
    code = (
        "import sys, shards, shards.verify, shards.stats; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'prep', 'train', 'kernels')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_add_packs_reports_progress_per_record_batch(tmp_path):
    data = random_packs(np.random.default_rng(9), 400, 64)
    updates: list[int] = []
    with ShardWriter(tmp_path / "s", max_len=64, tokens_per_batch=300, tokens_per_shard=2000) as w:
        w.add_packs(*data, progress=updates.append)
    ss = open_shards(tmp_path / "s")
    assert len(updates) > 1 and all(n > 0 for n in updates)
    assert sum(updates) == len(ss) == len(data[3])


def test_add_packs_split_at_the_batch_bounds_writes_the_same_files(tmp_path):
    """A caller that feeds the packs in several calls, cut at ``batch_bounds``, gets the files of one call."""
    tokens, mask, lengths, per, index = random_packs(np.random.default_rng(4), 400, 64)
    kw = {"max_len": 64, "tokens_per_batch": 300, "tokens_per_shard": 1000}
    with ShardWriter(tmp_path / "one", **kw) as w:
        w.add_packs(tokens, mask, lengths, per, index)
        bounds = w.batch_bounds(len(per))
    assert bounds[0] == 0 and bounds[-1] == len(per) and (np.diff(bounds) > 0).all()
    pack_ex = np.concatenate([[0], np.cumsum(per)])
    ex_tok = np.concatenate([[0], np.cumsum(lengths)])
    with ShardWriter(tmp_path / "many", **kw) as w:
        cuts = bounds[::3].tolist() + ([] if (len(bounds) - 1) % 3 == 0 else [int(bounds[-1])])
        for p0, p1 in itertools.pairwise(cuts):
            e0, e1 = pack_ex[p0], pack_ex[p1]
            t0, t1 = ex_tok[e0], ex_tok[e1]
            w.add_packs(tokens[t0:t1], mask[t0:t1], lengths[e0:e1], per[p0:p1], index[e0:e1])
    one, many = (json.loads((tmp_path / n / "manifest.json").read_text())["shards"] for n in ("one", "many"))
    assert len(one) > 2 and [s["sha256"] for s in one] == [s["sha256"] for s in many]
