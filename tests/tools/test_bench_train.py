"""tools/bench_train.py on a CPU: the tiny preset for 2 steps, padless through ``train()`` and the Hugging Face padded
peer on the same examples; plus its steady-state summary and the preset shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .tooling import ROOT, load_tool, run_tool


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench-train") / "shards"
    cmd = [sys.executable, "-m", "padless.prep", "pack", "demo:alpaca", "--max-len", "128", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run (CUDA-only peers are skipped)")
def test_tiny_run_padless_and_hf_padded_agree(shards, tmp_path) -> None:
    results = tmp_path / "train.jsonl"
    proc = run_tool("bench_train", "--shards", str(shards), "--preset", "tiny", "--systems",
                    "padless,hf-padded,hf-packed-flex", "--warmup", "1", "--steps", "1", "--tokens", "256",
                    "--results", str(results), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny LoRA on none: 1 warm-up + 1 timed steps" in proc.stdout
    rows = {r["system"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert rows["hf-packed-flex"]["status"] == "skipped: needs CUDA"
    padless, hf = rows["padless"], rows["hf-padded"]
    for r in (padless, hf):
        assert r["status"] == "ok" and r["preset"] == "tiny" and len(r["losses"]) == 2
        assert 0 < r["trainable_tokens_per_s"] < r["tokens_per_s"] and r["step_s"] > 0 and r["peak_gib"] > 0
    assert padless["tokens_per_step"] == hf["tokens_per_step"] <= 256  # the same packs per step
    # Same base weights, same examples, LoRA starting at zero: the first step's loss is the same number (fp32).
    assert padless["losses"][0] == pytest.approx(hf["losses"][0], abs=1e-4)
    assert hf["vs_hf_padded"] == 1.0


def test_summary_leaves_out_the_warmup_steps() -> None:
    bench = load_tool("bench_train")
    records = [{"step": k, "loss": 5.0 - k, "tokens": 100 * k, "trainable_tokens": 50 * k, "step_time_s": t,
                "peak_mem_gib": 1.0 + k} for k, t in ((1, 10.0), (2, 1.0), (3, 3.0))]  # fmt: skip
    s = bench.summarise(records, warmup=1)
    assert s["tokens_per_s"] == pytest.approx(500 / 4.0) and s["trainable_tokens_per_s"] == pytest.approx(250 / 4.0)
    assert s["step_s"] == 2.0 and s["peak_gib"] == 4.0 and s["losses"] == [4.0, 3.0, 2.0]
    assert s["tokens_per_step"] == 200
