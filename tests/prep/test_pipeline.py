"""prep pack end to end: uncontaminated by construction, masking, overlong, eval split, determinism."""

from __future__ import annotations

import json

import pytest

from padless.prep.errors import PrepError
from padless.prep.pipeline import PackConfig, run_pack
from padless.prep.render import detect_format
from padless.prep.tokenize import encode_example
from padless.prep.tokenizer import load_tokenizer
from padless.shards.reader import open_shards
from padless.shards.verify import verify_shard_set

from .rows import alpaca_rows, chat_rows, text_rows, write_jsonl


def pack(tmp_path, rows_or_path, name="out", **kw):
    src = rows_or_path if not isinstance(rows_or_path, list) else write_jsonl(tmp_path / f"{name}.jsonl", rows_or_path)
    kw.setdefault("max_len", 128)
    cfg = PackConfig(datasets=(str(src),), out=str(tmp_path / name), progress=False, **kw)
    return run_pack(cfg), tmp_path / name


def examples_in_shards(path):
    """source row -> list of (tokens, mask) pieces, in the order they were written."""
    ss = open_shards(path)
    out: dict[int, list] = {}
    for i in range(len(ss)):
        p = ss[i]
        for k in range(p.num_examples):
            a, b = p.cu_seqlens[k], p.cu_seqlens[k + 1]
            out.setdefault(int(p.example_index[k]), []).append((p.input_ids[a:b].tolist(), p.loss_mask[a:b].tolist()))
    return out


@pytest.mark.parametrize(
    ("rows", "train_on"),
    [(text_rows(150, 1), "completion"), (alpaca_rows(150, 2), "completion"), (alpaca_rows(100, 3), "all"),
     (chat_rows(80, 4), "completion"), (chat_rows(40, 5), "all")],
    ids=["text", "alpaca", "alpaca-all", "chat", "chat-all"],
)  # fmt: skip
def test_uncontaminated_by_construction(tmp_path, rows, train_on):
    summary, out = pack(tmp_path, rows, max_len=256, train_on=train_on)
    verify_shard_set(out)
    tk = load_tokenizer(None)
    fmt = detect_format(rows, "rows")
    got = examples_in_shards(out)
    assert sorted(got) == list(range(len(rows)))
    for i, row in enumerate(rows):
        ids, mask = encode_example(row, fmt, train_on, tk)
        mask[0] = False
        assert got[i] == [(ids[:256], mask[:256])], f"row {i}"
    assert summary["train"]["examples"] == len(rows)


def test_chat_trains_every_assistant_turn_and_nothing_else(tmp_path):
    rows = chat_rows(30, 6)
    summary, out = pack(tmp_path, rows, max_len=2048)
    assert summary["train"]["truncated"] == 0
    tk = load_tokenizer(None)
    got = examples_in_shards(out)
    for i, row in enumerate(rows):
        [(ids, mask)] = got[i]
        trained, cur = [], []
        for t, m in zip(ids, mask):
            if m:
                cur.append(t)
            elif cur:
                trained.append(tk.tok.decode(cur, skip_special_tokens=False))
                cur = []
        if cur:
            trained.append(tk.tok.decode(cur, skip_special_tokens=False))
        want = [m["content"] + "<|im_end|>\n" for m in row["messages"] if m["role"] == "assistant"]
        assert trained == want, f"row {i}"


def test_alpaca_masks_prompt_trains_response_and_eos(tmp_path):
    rows = alpaca_rows(20, 7)
    _, out = pack(tmp_path, rows, max_len=512)
    tk = load_tokenizer(None)
    for i, [(ids, mask)] in examples_in_shards(out).items():
        trained = [t for t, m in zip(ids, mask) if m]
        assert tk.tok.decode(trained, skip_special_tokens=False) == rows[i]["output"] + "<|im_end|>"
        assert ids[-1] == tk.eos_id and ids.count(tk.eos_id) == 1


@pytest.mark.parametrize("mode", ["truncate", "split", "drop"])
def test_overlong_modes(tmp_path, mode):
    rows = text_rows(60, 8, hi=80)
    tk = load_tokenizer(None)
    lens = [len(encode_example(r, "text", "all", tk)[0]) for r in rows]
    max_len = 40
    n_long = sum(x > max_len for x in lens)
    assert n_long > 5
    summary, out = pack(tmp_path, rows, max_len=max_len, overlong=mode)
    t = summary["train"]
    verify_shard_set(out)
    got = examples_in_shards(out)
    if mode == "truncate":
        assert t["truncated"] == n_long and sorted(got) == list(range(60))
        assert all(len(got[i][0][0]) == min(x, max_len) for i, x in enumerate(lens))
    elif mode == "drop":
        assert t["dropped"] == n_long and sorted(got) == [i for i, x in enumerate(lens) if x <= max_len]
    else:
        assert t["split"] == n_long and sorted(got) == list(range(60))
        for i, x in enumerate(lens):
            ids, _ = encode_example(rows[i], "text", "all", tk)
            pieces = got[i]
            assert len(pieces) == -(-x // max_len)
            want = sorted(tuple(ids[k : k + max_len]) for k in range(0, x, max_len))
            assert sorted(tuple(p[0]) for p in pieces) == want
            assert all(not p[1][0] for p in pieces)


def test_eval_split_disjoint_and_seeded(tmp_path):
    rows = alpaca_rows(200, 9)
    s, out = pack(tmp_path, rows, eval_examples=30)
    train, ev = examples_in_shards(out), examples_in_shards(out / "eval")
    assert len(ev) == 30 and set(train).isdisjoint(ev) and set(train) | set(ev) == set(range(200))
    assert s["eval"]["rows"] == 30
    _, out2 = pack(tmp_path, rows, name="again", eval_fraction=0.15)
    assert len(examples_in_shards(out2 / "eval")) == 30


def test_an_eval_fraction_that_rounds_to_no_row_is_an_error(tmp_path):
    rows = alpaca_rows(10, 9)
    with pytest.raises(PrepError, match=r"^--eval-fraction 0.04 of 10 rows rounds to no row, so there would be no "
                                        r"held-out set; raise it, or give .* --eval-examples N$"):  # fmt: skip
        pack(tmp_path, rows, eval_fraction=0.04)
    assert not (tmp_path / "out").exists()
    s, out = pack(tmp_path, rows, eval_fraction=0.06)
    assert s["eval"]["rows"] == 1 and len(examples_in_shards(out / "eval")) == 1


def test_num_proc_byte_identical(tmp_path):
    rows = [*alpaca_rows(300, 10), {"instruction": "x", "output": "y" * 3}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    _, a = pack(tmp_path, src, name="a", num_proc=1, eval_examples=10)
    _, b = pack(tmp_path, src, name="b", num_proc=2, eval_examples=10)
    # config.yaml records the settings, which differ (num_proc, out); everything else is the same bytes.
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "config.yaml")
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "config.yaml")
    for f in files_a:
        assert (a / f).read_bytes() == (b / f).read_bytes(), str(f)


def test_fingerprint_stable_and_sensitive(tmp_path):
    rows = alpaca_rows(50, 11)
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    fp = {}
    fp["a"] = pack(tmp_path, src, name="a")[0]["fingerprint"]
    fp["a2"] = pack(tmp_path, src, name="a2", num_proc=2)[0]["fingerprint"]
    fp["len"] = pack(tmp_path, src, name="len", max_len=256)[0]["fingerprint"]
    fp["seed"] = pack(tmp_path, src, name="seed", seed=5)[0]["fingerprint"]
    fp["all"] = pack(tmp_path, src, name="all", train_on="all")[0]["fingerprint"]
    # The same --map options in another order make the same shards, so the same fingerprint.
    maps = ("prompt=instruction", "completion=output")
    fp["map"] = pack(tmp_path, src, name="map", maps=maps)[0]["fingerprint"]
    fp["map2"] = pack(tmp_path, src, name="map2", maps=maps[::-1])[0]["fingerprint"]
    assert fp.pop("map") == fp.pop("map2")
    rows[3]["output"] += "!"
    src2 = write_jsonl(tmp_path / "d2.jsonl", rows)
    fp["data"] = pack(tmp_path, src2, name="data")[0]["fingerprint"]
    assert fp["a"] == fp["a2"]
    assert len({fp[k] for k in ("a", "len", "seed", "all", "data")}) == 5
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["fingerprint"] == fp["a"]
    tok = man["tokenizer"]
    assert tok["vocab_size"] == load_tokenizer(None).vocab_size and tok["eos_id"] is not None and len(tok["hash"]) == 64


def test_max_examples_per_pack(tmp_path):
    s, out = pack(tmp_path, text_rows(100, 12, hi=5), max_examples_per_pack=3)
    ss = open_shards(out)
    assert max(ss[i].num_examples for i in range(len(ss))) == 3 and s["train"]["packs"] == 34


def test_sharegpt_and_map(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello you"}]}] * 3
    _, out = pack(tmp_path, rows, name="sg")
    tk = load_tokenizer(None)
    [(ids, mask)] = examples_in_shards(out)[0]
    assert tk.tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False) == "hello you<|im_end|>\n"
    qa = [{"question": "two plus two", "answer": "four"}] * 4
    _, out = pack(tmp_path, qa, name="qa", maps=("prompt=question", "completion=answer"))
    [(ids, mask)] = examples_in_shards(out)[0]
    assert tk.tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False) == " four<|im_end|>"


def test_map_renames_so_the_mapped_fields_decide_the_format(tmp_path):
    """Alpaca columns mapped onto prompt/completion pack as prompt-completion: the renamed columns are gone, so they
    no longer make the rows Alpaca rows."""
    rows = [{"instruction": "two plus two", "input": "", "output": "four"}] * 4
    _, out = pack(tmp_path, rows, name="pc", maps=("prompt=instruction", "completion=output"))
    tk = load_tokenizer(None)
    [(ids, mask)] = examples_in_shards(out)[0]
    assert tk.tok.decode(ids, skip_special_tokens=False) == "two plus two four<|im_end|>"
    # A swap reads both columns as they were.
    _, out = pack(tmp_path, [{"instruction": "four", "output": "two plus two"}] * 4, name="swap",
                  maps=("instruction=output", "output=instruction"))  # fmt: skip
    [(ids, mask)] = examples_in_shards(out)[0]
    assert tk.tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False) == "four<|im_end|>"


def test_tokenizer_source_is_absolute_whatever_the_working_directory(tmp_path, monkeypatch):
    """`prep show` and `train run` read tokenizer_source from other working directories (and machines' copies)."""
    from padless.prep.tokenizer import DEFAULT_TOKENIZER

    (tmp_path / "tok").mkdir()
    for f in DEFAULT_TOKENIZER.iterdir():
        (tmp_path / "tok" / f.name).write_bytes(f.read_bytes())
    write_jsonl(tmp_path / "a.jsonl", text_rows(10))
    monkeypatch.chdir(tmp_path)
    run_pack(PackConfig(datasets=("a.jsonl",), max_len=64, tokenizer="tok", out="o", eval_examples=2, progress=False))
    for set_path in (tmp_path / "o", tmp_path / "o" / "eval"):
        assert open_shards(set_path).manifest["tokenizer_source"] == str(tmp_path / "tok")
