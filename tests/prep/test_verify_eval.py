"""``prep verify SHARDS`` verifies the held-out set ``SHARDS/eval`` too, and says which sets it checked."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from padless.prep.cli import main

from .rows import alpaca_rows, write_jsonl


def _pack(tmp_path: Path, *extra: str) -> Path:
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(60))
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["pack", str(src), "--max-len", "64", "--out", str(out), "--no-progress", *extra])
    assert r.exit_code == 0, r.output
    return out


def test_verify_reports_the_held_out_set(tmp_path):
    out = _pack(tmp_path, "--eval-examples", "10")
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and r.output.startswith("ok: ") and "; held-out eval/: " in r.output, r.output
    assert r.output.count("verified") == 2


def test_verify_says_when_there_is_no_held_out_set(tmp_path):
    r = CliRunner().invoke(main, ["verify", str(_pack(tmp_path))])
    assert r.exit_code == 0 and r.output.rstrip().endswith("; no held-out eval/ set"), r.output


def test_a_damaged_held_out_set_fails_verification(tmp_path):
    out = _pack(tmp_path, "--eval-examples", "10")
    shard = out / "eval" / "shard-00000.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    shard.write_bytes(bytes(raw))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and r.stderr.startswith("error: held-out set eval/: shard shard-00000.arrow: sha256 ")
    assert r.stderr.count("\n") == 1, r.stderr


def _edit(manifest: Path, fn) -> None:
    import json

    m = json.loads(manifest.read_text())
    fn(m)
    manifest.write_text(json.dumps(m))


def test_a_held_out_set_of_another_tokenizer_fails_verification(tmp_path):
    """`train run` refuses such an eval/ (its loss would score other token ids), so `prep verify` may not pass it. A
    larger max_len is no problem of its own: `train run` judges the longest pack against its micro-batch."""
    out = _pack(tmp_path, "--eval-examples", "10")
    _edit(out / "eval" / "manifest.json", lambda m: m["tokenizer"].update(content_hash="f" * 64))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert r.stderr.startswith("error: held-out set eval/ was not tokenized like the set it belongs to (the "
                               "tokenizers differ in content: "), r.stderr  # fmt: skip
    (tmp_path / "b").mkdir()
    out = _pack(tmp_path / "b", "--eval-examples", "10")
    _edit(out / "eval" / "manifest.json", lambda m: m.update(max_len=128))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0, r.output
