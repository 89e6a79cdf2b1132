"""tools/bench_memory.py on a CPU: the tiny LoRA and QLoRA cases run ``train run`` as a user does (QLoRA from a
random model folder written once) and their rows carry the memory breakdown."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from .tooling import ROOT, load_tool, run_tool


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run")
def test_tiny_cases_run_and_record_the_breakdown(tmp_path) -> None:
    shards = tmp_path / "shards"
    cmd = [sys.executable, "-m", "padless.prep", "pack", "demo:alpaca", "--max-len", "128", "--out", str(shards)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    results = tmp_path / "memory.jsonl"
    cases = "tiny-lora-1k,tiny-qlora-1k,tiny-lora-1k-low,tiny-qlora-1k-hf"
    proc = run_tool("bench_memory", "--shards", str(shards), "--cases", cases, "--warmup", "1", "--steps", "1",
                    "--work", str(tmp_path / "work"), "--results", str(results), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["case"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(rows) == {"tiny-lora-1k", "tiny-qlora-1k", "tiny-lora-1k-low", "tiny-qlora-1k-hf"}
    hf = rows.pop("tiny-qlora-1k-hf")  # Hugging Face + peft + bitsandbytes on the same folder and micro-batches
    assert hf["status"] == "ok" and hf["system"] == "hf" and hf["step_s"] > 0 and hf["peak_gib"] > 0
    for row in rows.values():
        assert row["status"] == "ok" and row["area"] == "memory" and row["step_s"] > 0 and row["peak_gib"] > 0
        assert set(row["memory_gib"]) >= {"weights", "trainable", "gradients", "optimizer"}
    lora, qlora = rows["tiny-lora-1k"]["memory_gib"], rows["tiny-qlora-1k"]["memory_gib"]
    assert lora["trainable"] == qlora["trainable"] > 0  # the same adapters on the same shapes
    assert qlora["weights"] < lora["weights"]  # NF4 projections beside a fp32 base
    assert (tmp_path / "work" / "model-tiny" / "config.json").is_file()  # the QLoRA base came from a folder


def test_case_names_say_what_runs() -> None:
    bench = load_tool("bench_memory")
    case = bench.CASES["qwen3-4b-qlora-2k-low"]
    assert (case.shape, case.mode, case.tokens, case.memory, case.checkpointing, case.target_gib) == (
        "qwen3-4b",
        "qlora",
        2048,
        "low",
        "on",  # --memory low keeps a 2K micro-batch's layer inputs on the GPU
        3.0,
    )
    assert bench.CASES["qwen3-4b-qlora-8k-low"].checkpointing == "offload"
    assert bench.CASES["qwen3-4b-qlora-8k-offload"].checkpointing == "offload"
    assert bench.CASES["qwen3-8b-lora-16k-low-on"].checkpointing == "on"
    assert bench.CASES["qwen3-4b-qlora-2k"].memory == "fast"
    assert all(name in bench.CASES for name in bench.DEFAULT_CASES)


def test_a_tile_case_runs_and_plans_its_tile() -> None:
    bench = load_tool("bench_memory")
    tiled, default = bench.CASES["qwen3-8b-lora-16k-low-on-tile8k"], bench.CASES["qwen3-8b-lora-16k-low-on"]
    assert (tiled.mlp_tile, default.mlp_tile) == (8192, 0)
    # --memory low's own tile is 4,096: a twice larger tile keeps more of the 16K MLP alive at once
    assert bench.predicted_gib(tiled, 151936, 0.0) > bench.predicted_gib(default, 151936, 0.0)


def test_the_8b_parts_of_the_low_setting_run_apart() -> None:
    """The default plus the low setting's tile, then plus its 8-bit AdamW: the vocabulary stays on the GPU."""
    bench = load_tool("bench_memory")
    tile, both = bench.CASES["qwen3-8b-lora-16k-tile4k"], bench.CASES["qwen3-8b-lora-16k-adamw8bit-tile4k"]
    assert (tile.memory, tile.optimizer, tile.mlp_tile) == ("fast", "adamw", 4096)
    assert (both.memory, both.optimizer, both.mlp_tile) == ("fast", "adamw8bit", 4096)
    default, low = bench.CASES["qwen3-8b-lora-16k"], bench.CASES["qwen3-8b-lora-16k-low-on"]
    plans = [bench.predicted_gib(case, 151936, 0.0) for case in (default, tile, both, low)]
    savings = [before - after for before, after in itertools.pairwise(plans)]
    assert min(savings) > 0 and savings[-1] == max(savings)  # each part takes memory off; the host vocabulary most
