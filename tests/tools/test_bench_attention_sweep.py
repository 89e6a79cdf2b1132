"""The attention sweep's pure helpers: candidate lists, winners, and the dK/dV half a dQ trial runs beside."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from bench_attention_sweep import _with_best_kv, sweep_candidates, winners

from padless.kernels.attention import BwdConfig, _builtin_configs, default_configs


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("bucket", ["short", "medium", "long"])
@pytest.mark.parametrize("kind", ["fwd", "bwd_kv", "bwd_dq", "bwd_atomic"])
def test_candidates_start_with_the_builtin_default_and_fit_the_group(D, bucket, kind):
    cands = sweep_candidates(kind, bucket, D, group=4)
    assert cands[0] == _builtin_configs(D, bucket, 4)[kind]
    assert len(cands) == len(set(cands)) >= 2
    hpb_index = 1 if kind in ("fwd", "bwd_dq") else 2
    assert all(4 % c[hpb_index] == 0 for c in cands), cands  # heads per block divide the GQA group


def _trial(kind, cfg, ms, bucket="long", D=256):
    return {"D": D, "bucket": bucket, "kind": kind, "config": list(cfg), "ms": ms}


def test_winners_take_the_fastest_successful_trial():
    results = [
        _trial("bwd_kv", (32, 16, 2, 8, 2), 36.0),
        _trial("bwd_kv", (64, 32, 2, 8, 1), 25.0),
        _trial("bwd_kv", (64, 16, 2, 8, 2), None),
        _trial("bwd_kv", (64, 16, 2, 8, 1), 28.0, bucket="short"),
    ]
    best = winners(results)
    assert best[(256, "long", "bwd_kv")]["config"] == [64, 32, 2, 8, 1]
    assert best[(256, "short", "bwd_kv")]["ms"] == 28.0


def test_dq_trials_run_beside_the_best_kv_tiling_of_the_sweep():
    _, d_bwd = default_configs(256, torch.bfloat16, 4096, 4, 4096.0, deterministic=True)
    results = [_trial("bwd_kv", (32, 16, 2, 8, 2), 36.0), _trial("bwd_kv", (64, 32, 2, 8, 1), 25.0)]
    got = _with_best_kv(d_bwd, results, 256, "long")
    assert isinstance(got, BwdConfig)
    assert got[:5] == (64, 32, 2, 8, 1) and got[5:] == d_bwd[5:]
    assert _with_best_kv(d_bwd, results, 256, "medium") == d_bwd  # nothing swept for that bucket: unchanged
