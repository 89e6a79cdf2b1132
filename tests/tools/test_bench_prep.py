"""tools/bench_prep.py on the bundled demo data: every row it appends, and its refusal of unknown data."""

from __future__ import annotations

import json

from .tooling import run_tool


def test_demo_run_appends_pack_and_packer_rows(tmp_path) -> None:
    results = tmp_path / "prep.jsonl"
    args = ["--data", "demo:alpaca", "--data-dir", str(tmp_path / "no-data"), "--max-len", "256"]
    args += ["--packer-examples", "20000", "--repeats", "1", "--no-warmup", "--results", str(results)]
    proc = run_tool("bench_prep", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prep benchmark" in proc.stdout and "packs / bound" in proc.stdout
    pack, packer = (json.loads(line) for line in results.read_text().splitlines())
    assert pack["bench"] == "pack" and pack["data"] == "demo:alpaca" and pack["tokenizer"] == "demo"
    assert pack["max_len"] == 256 and pack["rows"] == 3000
    assert {"tokenize", "pack", "write"} <= set(pack["stages_s"])
    assert pack["wall_s"] > pack["in_process_s"] > 0
    assert pack["packs"] >= pack["lower_bound"] == -(-pack["tokens"] // 256)
    assert 1.0 <= pack["packs_ratio"] < 1.2 and 0.8 < pack["fill"] <= 1.0
    assert 0 < pack["shard_bytes"] < 4 * pack["tokens"]  # compressed below the raw uint32 tokens
    assert packer["bench"] == "packer" and packer["examples"] == 20000 and packer["examples_per_s"] > 0
    assert 1.0 <= packer["packs_ratio"] < 1.05
    assert pack["command"].endswith(f"--results {results}")


def test_unknown_data_is_one_clear_error(tmp_path) -> None:
    proc = run_tool("bench_prep", "--data", "nope", "--data-dir", str(tmp_path), "--no-record")
    assert proc.returncode != 0
    assert "--data 'nope': expected one of ['alpaca', 'gsm8k'], demo:alpaca or an existing file" in proc.stderr
