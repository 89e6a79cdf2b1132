"""tools/bench_long.py: the case syntax, the shard set a case reads, the useful-FLOP count, the wait that times a run
out, and on a CPU a smoke run of tiny cases through ``train run`` (bf16-style LoRA and QLoRA from a folder)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .tooling import ROOT, load_tool, run_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_long")


def test_cases_parse_to_train_run_options(bench) -> None:
    case = bench.parse_case("128k:36:keep:gpu16")
    assert (case.tokens, case.layers, case.keep, case.gpu_gib, case.mode) == (131072, 36, True, 16.0, "lora")
    assert case.name == "131072:36:keep:gpu16"
    assert case.train_options == ["--lora", "--tokens-per-micro-batch", "131072", "--checkpointing", "offload",
                                  "--keep-attention", "--checkpoint-gpu-gib", "16"]  # fmt: skip
    plain = bench.parse_case("524288:4")
    assert (plain.keep, plain.gpu_gib, plain.flags) == (False, 0.0, ["--checkpointing", "offload"])
    assert bench.parse_case("256:2:qlora:gpu0.5").train_options[0] == "--qlora"
    assert bench.parse_case("256:2:qlora:gpu0.5").name == "256:2:gpu0.5:qlora"
    tiled = bench.parse_case("128k:36:tile8k:keep")
    assert tiled.tile == 8192 and tiled.name == "131072:36:keep:tile8192"
    assert tiled.flags[-2:] == ["--mlp-tile-tokens", "8192"]
    assert bench.parse_case(tiled.name) == tiled  # a row's case name parses back to the case
    segments = bench.parse_case("1024k:4:seg2:qlora:gpu24")
    assert segments.segment == 2 and segments.name == "1048576:4:gpu24:seg2:qlora"
    assert segments.flags == ["--checkpointing", "offload", "--checkpoint-gpu-gib", "24", "--checkpoint-layers", "2"]
    assert bench.parse_case(segments.name) == segments


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("131072", r"expected TOKENS:LAYERS\[:keep\]"),
        ("131072:4k", r"LAYERS '4k': expected a positive whole number$"),
        ("0:4", r"TOKENS '0': expected a positive whole number \(k for x 1024 allowed\)"),
        ("131072:4:gpu", r"'gpu': expected gpuX with X > 0 GiB"),
        ("131072:4:gpu-1", r"'gpu-1': expected gpuX with X > 0 GiB"),
        ("131072:4:fast", r"unknown option 'fast'; expected keep, gpuX, tileN, segN or qlora"),
        ("131072:4:seg0", r"segN's N '0': expected a positive whole number"),
        ("131072:4:keep:seg2", r"keep and segN do not go together"),
        ("131072:4:tile", r"tileN's N '': expected a positive whole number"),
    ],
)
def test_bad_cases_name_the_bad_part(bench, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bench.parse_case(text)


def test_a_bad_case_is_a_usage_error(bench, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--shards", "x", "--cases", "131072:36,131072:36:kep"])
    assert exit_info.value.code == 2
    assert "--cases: case '131072:36:kep': unknown option 'kep'" in capsys.readouterr().err


def test_a_case_reads_the_longest_set_that_fits(bench) -> None:
    sets = {"a": 131072, "b": 524288, "c": 262144}
    assert bench.pick_shards(bench.parse_case("131072:8"), sets) == "a"
    assert bench.pick_shards(bench.parse_case("400000:8"), sets) == "c"
    assert bench.pick_shards(bench.parse_case("1024k:8"), sets) == "b"
    assert bench.pick_shards(bench.parse_case("1000:8"), sets) is None


def test_useful_flops_are_forward_and_backward_with_causal_attention(bench) -> None:
    """Qwen3-8B shapes, 4 layers, one 131072-token document: 4 N T for the matmuls (LoRA: no weight gradients),
    and attention 2 T² H D per layer forward (causal half of 4 T² H D), twice that backward; no recompute."""
    from padless.train.plan import inventory

    case = bench.parse_case("131072:4:keep")
    config = bench.model_config("qwen3-8b", 151669, case)
    assert (config.num_hidden_layers, config.max_position_embeddings, config.vocab_size) == (4, 1 << 20, 151936)
    inv = inventory(config)
    n, t = inv.matmul_params, 131072
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288  # q, o; k, v; gate, up, down
    assert 4 * layer + 151936 * 4096 < n < 4 * layer + 151936 * 4096 + 10**6  # + the head; norms are small
    want = 4 * n * t + 3 * 2 * t * t * 32 * 128 * 4
    assert bench.useful_flops(inv, t, float(t)) == pytest.approx(want, rel=1e-12)
    _, longer = bench.model_fields("qwen3-8b", 151669, bench.parse_case("2048k:1"))
    assert longer["max_position_embeddings"] == 2048 * 1024


def test_wait_reports_the_exit_status_or_kills_at_the_timeout(bench) -> None:
    quick = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert bench._wait(quick, 60)[0] == 3
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    code, host_gib = bench._wait(slow, 0.5)
    assert code is None and slow.returncode is not None and 0 < host_gib < 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run")
def test_tiny_cases_run_train_run_and_record_rows(tmp_path) -> None:
    rows = [{"text": " ".join(f"word{(i * 7 + j) % 50}" for j in range(400))} for i in range(2)]
    data = tmp_path / "documents.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = tmp_path / "shards"
    cmd = [sys.executable, "-m", "padless.prep", "pack", str(data), "--format", "text", "--max-len", "256",
           "--overlong", "truncate", "--out", str(shards), "--no-progress"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    results = tmp_path / "long.jsonl"
    cases = "256:2,256:3:keep:qlora:tile128,128:2,256:3:seg2"
    proc = run_tool("bench_long", "--shards", str(shards), "--shape", "tiny", "--cases", cases, "--steps", "2",
                    "--work", str(tmp_path / "work"), "--results", str(results), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = {r["case"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert list(got) == ["256:2", "256:3:keep:tile128:qlora", "128:2", "256:3:seg2"]
    for name in ("256:2", "256:3:keep:tile128:qlora", "256:3:seg2"):
        row = got[name]
        assert row["status"] == "ok" and row["area"] == "long" and row["steps"] == 2 and row["step_tokens"] == 256
        assert min(row["step_s"], row["first_step_s"], row["peak_gib"], row["useful_tflops"]) > 0
        assert row["host_peak_gib"] > 0 and set(row["memory_gib"]) >= {"weights", "trainable"}
        assert f"{name} " in proc.stdout  # its one line
        assert row["predicted_gib"] > 0 and row["predicted_error"] == row["predicted_gib"] / row["peak_gib"] - 1
        assert row["predicted_step_s"] > 0
    # train plan's step time for the case: more layers, more time
    assert got["256:3:seg2"]["predicted_step_s"] > got["256:2"]["predicted_step_s"]
    tiled = got["256:3:keep:tile128:qlora"]
    assert tiled["flags"] == "--checkpointing offload --keep-attention --mlp-tile-tokens 128"
    assert tiled["mode"] == "qlora" and got["256:2"]["mode"] == "lora"
    assert got["256:3:seg2"]["flags"] == "--checkpointing offload --checkpoint-layers 2"
    assert (tmp_path / "work" / "model-tiny-3-layers-1048576-positions" / "config.json").is_file()
    assert got["128:2"]["status"] == "no --shards set with max_len <= 128 (have [256])"
