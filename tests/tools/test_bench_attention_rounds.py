"""bench_attention's interleaved rounds: one row per (case, impl) with median times and TFLOP/s that follow them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from bench_attention import Row, median_row


def _row(fwd_ms, fwdbwd_ms, flops=1e12, note=""):
    tf = None if fwd_ms is None else flops / fwd_ms / 1e9
    tfb = None if fwdbwd_ms is None else 3.5 * flops / fwdbwd_ms / 1e9
    return Row("eq4K/16K", 16384, 128, "padless@graph", fwd_ms, fwdbwd_ms, tf, tfb, note)


def test_median_of_rounds_with_tflops_recomputed_from_the_median_time():
    got = median_row([_row(1.0, 5.0), _row(1.2, 5.4), _row(1.1, 5.1)])
    assert (got.fwd_ms, got.fwdbwd_ms) == (1.1, 5.1)
    assert abs(got.fwd_tflops - 1e12 / 1.1 / 1e9) < 1e-6
    assert abs(got.fwdbwd_tflops - 3.5e12 / 5.1 / 1e9) < 1e-6
    assert "median of 3 interleaved rounds" in got.note and "5.000-5.400" in got.note


def test_failed_rounds_are_left_out_and_a_single_round_is_unchanged():
    failed = _row(None, None, note="OutOfMemoryError: ...")
    got = median_row([failed, _row(2.0, 8.0), _row(4.0, 10.0)])
    assert (got.fwd_ms, got.fwdbwd_ms) == (3.0, 9.0) and "median of 2" in got.note
    one = _row(1.0, 3.0)
    assert median_row([one]) is one
    assert median_row([failed, failed]) is failed
