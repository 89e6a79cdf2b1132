"""tools/bench_kernels.py: the tiny smoke run (Triton interpreter on a CPU) and the CPU refusal."""

from __future__ import annotations

import json

import pytest
import torch

from .tooling import run_tool


def test_smoke_run_times_every_op(tmp_path) -> None:
    results = tmp_path / "kernels.jsonl"
    proc = run_tool("bench_kernels", "--smoke", "--results", str(results), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory-bound kernels" in proc.stdout and "fused linear cross-entropy" in proc.stdout
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    ops = {"rope", "swiglu", "geglu", "rmsnorm", "rmsnorm_frozen", "rmsnorm_head"}
    assert {r["op"] for r in rows} == ops | {"linear_ce_frozen", "linear_ce_trainable"}
    streamed = {(r["op"], r["impl"]) for r in rows if r["impl"].startswith("streamed")}
    assert streamed == {("linear_ce_frozen", "streamed_gpu"), ("linear_ce_frozen", "streamed_host")}
    for r in rows:
        assert r["smoke"] is True and r["impl"] in ("padless", "eager", "liger", "streamed_gpu", "streamed_host")
        if r["impl"] == "liger" and r["note"].startswith("n/a"):
            continue  # Liger-Kernel is optional
        if r["impl"] == "streamed_host":  # pinned host memory needs CUDA
            assert r["note"].startswith("n/a (needs a CUDA device") and "fwdbwd_ms" not in r
            continue
        assert r["note"] == "", r
        if r["op"] in ops:
            assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwd_gbps"] > 0
        else:
            assert r["fwdbwd_ms"] > 0 and r["tflops"] > 0


def test_unknown_op_is_refused() -> None:
    proc = run_tool("bench_kernels", "--ops", "rope,softmax", "--no-record")
    assert proc.returncode == 2 and "--ops: unknown ['softmax']" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_without_a_gpu_it_says_so_in_one_line() -> None:
    proc = run_tool("bench_kernels", "--no-record")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == "bench_kernels.py needs a CUDA GPU for real numbers (--smoke runs tiny shapes on the CPU)"
    )
