"""What the reader checks before it hands out a pack: shard files inside the set, record batches that match the
manifest, and every pack invariant a trainer relies on (``invariants.batch_problem``), also with checksums off."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from padless.shards import invariants, reader
from padless.shards.errors import ShardFormatError
from padless.shards.invariants import batch_problem
from padless.shards.manifest import file_sha256
from padless.shards.pack import Pack
from padless.shards.reader import open_shards
from padless.shards.verify import verify_shard_set, verify_with_eval
from padless.shards.writer import ShardWriter

from .guarantees import pack_guarantee_problem
from .packs import random_packs, rewrite_column

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


# -- record batches and packs, checked on read -----------------------------------------------------------------
def test_a_pack_over_max_len_fails_on_read_naming_it(tmp_path):
    # 20 packs of 10 tokens, then one of 60: lowering max_len to 32 keeps the manifest's counts plausible.
    lengths = np.array([5, 5] * 20 + [60])
    per = np.array([2] * 20 + [1])
    tokens = np.arange(int(lengths.sum()), dtype=np.uint32) % VOCAB
    mask = np.ones(len(tokens), bool)
    mask[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = False
    meta = {"tokenizer": {"vocab_size": VOCAB}}
    with ShardWriter(tmp_path / "s", max_len=64, metadata=meta, tokens_per_batch=640) as w:
        w.add_packs(tokens, mask, lengths, per, np.arange(len(lengths)))
    _edit_manifest(tmp_path / "s", lambda m: m.update(max_len=32))
    ss = open_shards(tmp_path / "s")
    assert ss[0].num_tokens == 10  # batch 0 is fine
    with pytest.raises(ShardFormatError, match=r"shard-00000\.arrow' pack 20 \(global pack 20\): 60 tokens, "
                       r"num_tokens=60; expected equal, in \[1, max_len=32\]"):  # fmt: skip
        ss[20]
    with pytest.raises(ShardFormatError, match="max_len=32"):
        verify_shard_set(tmp_path / "s")


def test_token_ids_outside_the_vocabulary_never_reach_a_trainer(tmp_path):
    path = _write(tmp_path / "s")
    top = max(int(p.input_ids.max()) for p in open_shards(path))
    _edit_manifest(path, lambda m: m["tokenizer"].update(vocab_size=top))
    with pytest.raises(ShardFormatError, match=rf"input_ids\[\d+\]={top}, outside the vocabulary \(vocab_size={top}\)"):
        list(open_shards(path))
    with pytest.raises(ShardFormatError, match="outside the vocabulary"):
        list(open_shards(path, check_checksums=False))


@pytest.mark.parametrize(
    ("column", "fn", "message"),
    [
        ("cu_seqlens", lambda v: v + 1, r"cu_seqlens \[1, .* must start at 0, rise strictly and end at num_tokens"),
        ("cu_seqlens", lambda v: np.where(np.arange(len(v)) == 1, 10**9, v), r"cu_seqlens \[0, 1000000000"),
        ("position_ids", lambda v: np.where(np.arange(len(v)) == 3, 5000, v), r"a position is outside \[0, max_seqlen"),
        ("position_ids", lambda v: np.where(np.arange(len(v)) == 3, -1, v), r"a position is outside"),
        ("position_ids", lambda v: v + 1, r"position_ids is 1 on the first token of example 0 \(token 0\); expected 0"),
        ("loss_mask", lambda v: np.ones_like(v), r"loss_mask is True on the first token of example 0"),
        ("num_trainable", lambda v: v + 1, r"num_trainable=\d+ but loss_mask has \d+ True"),
        ("max_seqlen", lambda v: v - 1, r"max_seqlen=\d+ but the longest example has \d+ tokens"),
        ("num_tokens", lambda v: v - 1, r"\d+ tokens, num_tokens=\d+; expected equal"),
    ],
)
def test_a_checksummed_file_that_breaks_an_invariant_fails_on_read(tmp_path, column, fn, message):
    path = _write(tmp_path / "s")
    rewrite_column(path, column, fn)
    for checksums in (True, False):
        ss = open_shards(path, check_checksums=checksums)
        with pytest.raises(ShardFormatError, match=rf"shard-00000\.arrow' pack 0 \(global pack 0\): {message}"):
            ss[0]


def test_positions_that_stay_in_range_are_verify_s_to_catch(tmp_path):
    """The reader bounds positions (RoPE tables) and checks each example's first one; the exact count 0, 1, 2, ...
    inside an example is one more pass over the tokens, which `prep verify` pays."""
    path = _write(tmp_path / "s")
    p = open_shards(path)[0]
    t = int(np.flatnonzero(np.diff(p.cu_seqlens) > 2)[0])  # an example of 3+ tokens: swap its 2nd and 3rd position
    a = int(p.cu_seqlens[t]) + 1

    def swap(v):
        v[[a, a + 1]] = v[[a + 1, a]]
        return v

    rewrite_column(path, "position_ids", swap)
    assert open_shards(path)[0].position_ids[a] == p.position_ids[a + 1]
    with pytest.raises(
        ShardFormatError, match=rf"pack 0 \(global pack 0\): position_ids\[{a}\]={a - int(p.cu_seqlens[t]) + 1}"
    ):
        verify_shard_set(path)


def test_record_batch_sizes_must_match_the_manifest(tmp_path):
    path = _write(tmp_path / "s", tokens_per_batch=300)

    def shift(m):
        b = m["shards"][0]["batches"]
        b[0], b[1] = b[0] - 1, b[1] + 1

    _edit_manifest(path, shift)
    ss = open_shards(path)
    with pytest.raises(ShardFormatError, match=r"shard-00000\.arrow' batch 0 holds \d+ packs, the manifest says \d+"):
        ss[0]


def test_nulls_in_a_column_are_refused(tmp_path):
    path = _write(tmp_path / "s")
    f = path / "shard-00000.arrow"
    with pa.memory_map(str(f)) as src:
        table = pa.ipc.open_file(src).read_all()
    i = table.schema.get_field_index("max_seqlen")
    values = table.column(i).combine_chunks().to_pylist()
    table = table.set_column(i, table.schema.field(i), pa.array([None, *values[1:]], pa.int32()))
    with pa.ipc.new_file(str(f), table.schema) as w:
        w.write_table(table, max_chunksize=10**9)
    _edit_manifest(path, lambda m: (m["shards"][0].update(bytes=f.stat().st_size, sha256=file_sha256(f),
                                                          batches=[table.num_rows]),
                                    m["totals"].update(bytes=sum(s["bytes"] for s in m["shards"]))))  # fmt: skip
    with pytest.raises(ShardFormatError, match=r"batch 0 (has nulls in \['max_seqlen'\]|cannot be decoded)"):
        open_shards(path)[0]


def test_a_schema_field_name_that_is_not_utf8_is_a_format_error(tmp_path):
    path = _write(tmp_path / "s")
    f = path / "shard-00000.arrow"
    f.write_bytes(f.read_bytes().replace(b"max_seqlen", b"max_seqle\xff"))
    with pytest.raises(ShardFormatError, match=r"has a different schema: .*not UTF-8"):
        open_shards(path)


def test_each_batch_is_checked_once_per_set(tmp_path, monkeypatch):
    path = _write(tmp_path / "s", tokens_per_batch=300)
    calls = []
    monkeypatch.setattr(reader, "batch_problem", lambda d, **kw: calls.append(1) or batch_problem(d, **kw))
    ss = open_shards(path)
    batches = len(ss._batch_shard)
    for _ in range(3):
        for i in ss.order(0):  # random order: batches leave the 4-batch cache and are decoded again
            ss[i]
    assert len(calls) == batches > 4


# -- the vectorised checks against a per-pack reference --------------------------------------------------------
def _decoded(path: Path) -> list[dict[str, np.ndarray]]:
    ss = open_shards(path)
    return [{k: v.copy() for k, v in d.items()} for _, d in ss.iter_batches()]


def _packs(d: dict[str, np.ndarray]) -> list[Pack]:
    out = []
    for r in range(len(d["num_tokens"])):
        row = {n: d[n][d[n + ".off"][r] : d[n + ".off"][r + 1]] for n in invariants.LIST_COLUMNS}
        ids, mask = row["input_ids"], row["loss_mask"]
        out.append(Pack(**row, labels=np.where(mask, ids.astype(np.int64), -100), num_tokens=int(d["num_tokens"][r]),
                        num_trainable=int(d["num_trainable"][r]), max_seqlen=int(d["max_seqlen"][r])))  # fmt: skip
    return out


def test_batch_problem_agrees_with_a_per_pack_reference_on_random_damage(tmp_path):
    """Damage one value of a decoded batch at random: batch_problem passes it only when every pack still keeps the
    guarantees, checked pack by pack by an independent implementation."""
    batches = _decoded(_write(tmp_path / "s", tokens_per_batch=400))
    rng = np.random.default_rng(0)
    caught = passed = 0
    for _ in range(3000):
        d = {k: v.copy() for k, v in batches[int(rng.integers(len(batches)))].items()}
        name = str(rng.choice([*invariants.LIST_COLUMNS, *invariants.SCALAR_COLUMNS]))
        if name in invariants.LIST_COLUMNS and rng.random() < 0.2:
            name += ".off"
        v = d[name]
        if len(v) == 0:
            continue
        j = int(rng.integers(len(v)))
        if v.dtype == np.bool_:
            v[j] = not v[j]
        else:
            x, info = int(v[j]), np.iinfo(v.dtype)
            choices = [x + 1, x - 1, 0, info.max, info.min, VOCAB, int(rng.integers(-64, 64))]
            v[j] = min(max(choices[int(rng.integers(len(choices)))], info.min), info.max)
        problem = batch_problem(d, max_len=64, vocab_size=VOCAB)
        if problem is None:
            assert all(pack_guarantee_problem(p, 64, VOCAB) is None for p in _packs(d)), (name, j)
            passed += 1
        else:
            assert 0 <= problem[0] < len(d["num_tokens"]) and problem[1]
            caught += 1
    assert caught > 1000 and passed > 100, (caught, passed)


def _one_pack(cu: list[int], n: int) -> dict[str, np.ndarray]:
    """A decoded batch of one pack of ``n`` tokens with the given cu_seqlens (everything else consistent)."""
    s = len(cu) - 1
    i32 = np.int32
    return {
        "input_ids": np.zeros(n, np.uint32), "input_ids.off": np.array([0, n], i32),
        "position_ids": np.zeros(n, i32), "position_ids.off": np.array([0, n], i32),
        "cu_seqlens": np.array(cu, i32), "cu_seqlens.off": np.array([0, s + 1], i32),
        "loss_mask": np.zeros(n, bool), "loss_mask.off": np.array([0, n], i32),
        "example_index": np.arange(s, dtype=np.int64), "example_index.off": np.array([0, s], i32),
        "num_tokens": np.array([n], i32), "num_trainable": np.array([0], i32), "max_seqlen": np.array([n], i32),
    }  # fmt: skip


def test_cu_seqlens_steps_do_not_wrap_around_in_int32():
    # 0, 2^31 - 1, -2^31, -1, 8: in int32 arithmetic every step is positive (the second one wraps around).
    d = _one_pack([0, 2**31 - 1, -(2**31), -1, 8], 8)
    assert (np.diff(d["cu_seqlens"]) > 0).all()
    assert batch_problem(d, max_len=64)[1].startswith("cu_seqlens [0, 2147483647, -2147483648, -1, 8] must start")
    assert batch_problem(_one_pack([0, 8], 8), max_len=64) is None


# -- prep verify covers eval/ --------------------------------------------------------------------------------
def test_verify_with_eval_checks_the_held_out_set(tmp_path):
    main = _write(tmp_path / "s")
    assert verify_with_eval(main)["eval"] is None
    _write(main / "eval", seed=4, n=30)
    report = verify_with_eval(main)
    assert report["eval"]["packs"] > 0 and report["main"]["packs"] > report["eval"]["packs"]
    f = main / "eval" / "shard-00000.arrow"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(ShardFormatError, match=r"^held-out set eval/: shard .*eval/shard-00000\.arrow' is \d+ bytes"):
        verify_with_eval(main)
    (main / "eval" / "manifest.json").unlink()
    with pytest.raises(ShardFormatError, match=r"^held-out set eval/: .*eval/manifest\.json' not found"):
        verify_with_eval(main)
