"""``--mix a=0.7,b=0.3``: a weight is the fraction of the mix's examples drawn from a source; without replacement when
the source has enough rows, repeated (each row k or k + 1 times) when it has not; seeded; recorded in the manifest and
the fingerprint; held-out rows never trained on, whatever the repetition."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from padless.prep.cli import main
from padless.prep.errors import PrepError
from padless.prep.mix import BYTES_PER_EXAMPLE, MixEntry, check_mix_size, draw, mix_counts, parse_mix
from padless.prep.pipeline import PackConfig, run_pack
from padless.shards.reader import open_shards
from tests.user_errors import assert_one_line_error

from .rows import write_jsonl


def test_parse_mix() -> None:
    assert parse_mix(("a.jsonl=0.7,b.jsonl=0.3",)) == [MixEntry("a.jsonl", 0.7), MixEntry("b.jsonl", 0.3)]
    assert parse_mix(("org/ds:sub@test=2", "c.jsonl=1")) == [MixEntry("org/ds:sub@test", 2.0), MixEntry("c.jsonl", 1.0)]
    for bad, match in [("a.jsonl", r"expected DATASET=WEIGHT"), ("a=0", r"must be a number > 0"),
                       ("a=-1", r"must be a number > 0"), ("a=nan", r"must be a number > 0"),
                       ("a=x", r"must be a number > 0"), ("a=1,a=2", r"names \['a'\] more than once")]:  # fmt: skip
        with pytest.raises(PrepError, match=match):
            parse_mix((bad,))


def test_counts_and_draws() -> None:
    assert mix_counts([0.7, 0.3], 10) == [7, 3]
    assert mix_counts([1, 1, 1], 10) == [4, 3, 3], "largest remainder, ties to the earlier source"
    assert sum(mix_counts([0.123, 0.456, 0.421], 9_999)) == 9_999
    assert mix_counts([1e308, 1e308], 15) == [8, 7], "weights whose sum overflows keep their proportions"
    rows = np.arange(100, 110, dtype=np.int64)
    rng = np.random.default_rng(0)
    few = draw(rows, 4, rng)
    assert len(set(few.tolist())) == 4 and set(few.tolist()) <= set(rows.tolist()), "without replacement"
    many = Counter(draw(rows, 37, rng).tolist())
    assert sum(many.values()) == 37 and sorted(set(many.values())) == [3, 4] and list(many.values()).count(4) == 7
    assert draw(rows, 30, rng).tolist() == np.repeat(rows, 3).tolist()


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b {i}"} for i in range(100)])
    return a, b


def _pack(tmp_path: Path, name: str, mix: str, **kw):
    summary = run_pack(PackConfig(mix=(mix,), max_len=64, out=str(tmp_path / name), progress=False, **kw))
    ss = open_shards(tmp_path / name)
    rows = [int(i) for k in range(len(ss)) for i in ss[k].example_index]  # rows numbered a (0-19), then b (20-119)
    return summary, ss.manifest, Counter(rows)


def test_a_mix_draws_what_its_weights_say(tmp_path: Path) -> None:
    a, b = _sources(tmp_path)
    summary, manifest, rows = _pack(tmp_path, "m", f"{a}=0.5,{b}=0.5", seed=1)
    from_a = {r: n for r, n in rows.items() if r < 20}
    from_b = {r: n for r, n in rows.items() if r >= 20}
    # 120 rows in all (the sources' sum): 60 from each; a (20 rows) is repeated 3 times, b sampled without replacement.
    assert sum(from_a.values()) == 60 and set(from_a.values()) == {3} and len(from_a) == 20
    assert sum(from_b.values()) == 60 and set(from_b.values()) == {1}
    assert summary["train"]["rows"] == summary["train"]["examples"] == 120
    mix = manifest["source"]["mix"]
    assert mix["examples"] == 120 and manifest["source"]["inputs"] == [str(a), str(b)]
    assert mix["sources"] == [
        {"input": str(a), "weight": 0.5, "rows": 20, "drawn": 60, "repeated": True},
        {"input": str(b), "weight": 0.5, "rows": 100, "drawn": 60, "repeated": False},
    ]
    assert manifest["options"]["mix"] == [0.5, 0.5] and manifest["options"]["mix_examples"] == 0
    # The same seed gives the same shards; another seed another sample of b; other weights another fingerprint.
    again, _, rows_again = _pack(tmp_path, "m2", f"{a}=0.5,{b}=0.5", seed=1)
    assert again["fingerprint"] == summary["fingerprint"] and rows_again == rows
    other, _, rows_other = _pack(tmp_path, "m3", f"{a}=0.5,{b}=0.5", seed=2)
    assert {r for r in rows_other if r >= 20} != set(from_b) and other["fingerprint"] != summary["fingerprint"]
    weights, _, rows_w = _pack(tmp_path, "m4", f"{a}=1,{b}=3", seed=1, mix_examples=40)
    assert sum(n for r, n in rows_w.items() if r < 20) == 10 and sum(rows_w.values()) == 40
    assert weights["fingerprint"] not in (summary["fingerprint"], other["fingerprint"])


def test_held_out_rows_of_a_repeated_source_are_never_trained(tmp_path: Path) -> None:
    a, b = _sources(tmp_path)
    _, manifest, train = _pack(tmp_path, "m", f"{a}=0.8,{b}=0.2", seed=3, eval_fraction=0.25)
    ev = open_shards(tmp_path / "m" / "eval")
    held = Counter(int(i) for k in range(len(ev)) for i in ev[k].example_index)
    assert held and not set(held) & set(train), "no row on both sides"
    assert len(held) == round(0.25 * (20 + 24)), "the fraction is of the distinct rows: all 20 of a, 24 of b"
    assert {n for r, n in {**train, **held}.items() if r < 20} == {4, 5}, "96 of 20 rows: 4 or 5 copies, together"
    assert manifest["prep"]["rows"] + json.loads((tmp_path / "m" / "eval" / "manifest.json").read_text())["prep"][
        "rows"] == 120  # fmt: skip


def test_mix_on_the_command_line(tmp_path: Path) -> None:
    a, b = _sources(tmp_path)
    args = ["pack", "--max-len", "64", "--no-progress", "--mix", f"{a}=0.7", "--mix", f"{b}=0.3", "--out"]
    r = CliRunner().invoke(main, [*args, str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    line = f"mix of 120 rows: {a} (weight 0.7) 84 drawn from 20, repeated; {b} (weight 0.3) 36 drawn from 100"
    assert line in r.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["source"]["mix"]["sources"][0]["drawn"] == 84
    r = CliRunner().invoke(main, ["pack", str(a), "--mix", f"{b}=1", "--max-len", "64", "--out", str(tmp_path / "x")])
    assert_one_line_error(r, r"give DATASETS or --mix, not both")
    r = CliRunner().invoke(main, ["pack", str(a), "--mix-examples", "5", "--max-len", "64"])
    assert_one_line_error(r, r"--mix-examples 5: expected >= 0, and only with --mix")
    r = CliRunner().invoke(main, ["pack", "--mix", f"{a}=1,{tmp_path / 'none.jsonl'}=1", "--max-len", "64"])
    assert_one_line_error(r, r"dataset '.*none.jsonl' not found")
    empty = write_jsonl(tmp_path / "bad.jsonl", [{"text": ["x"]}])
    r = CliRunner().invoke(main, ["pack", "--mix", f"{a}=1,{empty}=1", "--max-len", "64", "--skip-bad-rows",
                                  "--out", str(tmp_path / "e")])  # fmt: skip
    assert_one_line_error(r, r"--mix: '.*bad.jsonl' has no usable rows, but its weight asks for 10 of the mix")
    assert not (tmp_path / "e").exists()
    r = CliRunner().invoke(main, [*args[:-1], "--mix-examples", str(10**15), "--out", str(tmp_path / "huge")])
    assert_one_line_error(r, r"--mix-examples 1,000,000,000,000,000 needs about [\d,.]+ GiB of memory for its ")
    assert not (tmp_path / "huge").exists()


def test_a_mix_whose_arrays_exceed_the_memory_is_refused() -> None:
    check_mix_size(10**6, memory_bytes=BYTES_PER_EXAMPLE * 10**6)
    with pytest.raises(PrepError, match=r"--mix-examples 1,000,001 needs about 0.0 GiB .* than this machine's 0.0 GiB"):
        check_mix_size(10**6 + 1, memory_bytes=BYTES_PER_EXAMPLE * 10**6)
