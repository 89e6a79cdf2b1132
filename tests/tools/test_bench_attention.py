"""tools/bench_attention.py: the smoke table and sweep (Triton interpreter on a CPU), the candidate tilings, the
winners, and the tuned-table writer."""

from __future__ import annotations

import json

import pytest

from .tooling import load_tool, run_tool


def test_smoke_table_times_both_backwards(tmp_path) -> None:
    results = tmp_path / "attention.jsonl"
    proc = run_tool("bench_attention", "--smoke", "--results", str(results), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["padless", "padless_det"]
    for r in rows:
        assert r["bench"] == "table" and r["D"] == 16 and r["tokens"] == 96 and r["note"] == ""
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["fwdbwd_tflops"] > 0


def test_smoke_sweep_records_a_winner_per_kind(tmp_path) -> None:
    results = tmp_path / "attention.jsonl"
    proc = run_tool("bench_attention", "--smoke", "--sweep", "--results", str(results), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["kind"] for r in rows) == ["bwd_atomic", "bwd_dq", "bwd_kv", "fwd"]
    assert all(r["bench"] == "sweep" and r["bucket"] == "short" and r["ms"] > 0 and not r["error"] for r in rows)
    assert "fastest tiling per case" in proc.stdout


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_candidates_are_valid_tilings(group: int, d: int) -> None:
    bench = load_tool("bench_attention")
    from padless.kernels.attention import BUCKETS, TUNED_FIELDS

    for bucket in BUCKETS:
        for kind, fields in TUNED_FIELDS.items():
            cands = bench.candidates(kind, bucket, d, group)
            assert len(cands) >= 4 and len(set(cands)) == len(cands), (kind, bucket, cands)
            for cfg in cands:
                tile = dict(zip(fields, cfg, strict=True))
                hpb = next(v for f, v in tile.items() if f.endswith("hpb"))
                assert group % hpb == 0, (kind, tile)
                for f, v in tile.items():
                    assert (v >= 1 and v & (v - 1) == 0) or f.endswith("stages"), (kind, tile)
                    assert not f.endswith(("block_m", "block_n")) or 16 <= v <= 256, (kind, tile)


def trial(kind: str, cfg: tuple, ms: float | None, bucket: str = "long", d: int = 128) -> dict:
    return {"D": d, "dtype": "bf16", "bucket": bucket, "kind": kind, "config": list(cfg), "ms": ms, "case": "c"}


def test_winners_take_the_fastest_successful_trial() -> None:
    bench = load_tool("bench_attention")
    trials = [trial("fwd", (64, 2, 64, 4, 3), 2.0), trial("fwd", (128, 2, 64, 8, 3), 1.5),
              trial("fwd", (64, 2, 32, 4, 3), None), trial("fwd", (64, 1, 64, 4, 3), 1.0, "short")]  # fmt: skip
    best = bench.winners(trials)
    assert best[(128, "bf16", "long", "fwd")]["config"] == [128, 2, 64, 8, 3]
    assert best[(128, "bf16", "short", "fwd")]["ms"] == 1.0


def test_write_tuned_replaces_the_swept_cases_and_keeps_the_rest(tmp_path) -> None:
    bench = load_tool("bench_attention")
    attention = pytest.importorskip("padless.kernels.attention")
    if not hasattr(attention, "parse_tuned"):
        pytest.skip("needs padless.kernels.attention.parse_tuned (tuned table version 2)")
    fwd = {"block_m": 64, "hpb": 2, "block_n": 64, "num_warps": 4, "num_stages": 3}
    other = {"gpu": "OTHER GPU", "torch": "2.11.0", "triton": "3.6.0", "date": "2026-01-01",
             "cases": [{"D": 64, "dtype": "bf16", "bucket": "short", "tiles": {"fwd": fwd}}]}  # fmt: skip
    unswept = {"D": 256, "dtype": "bf16", "bucket": "long", "tiles": {"fwd": fwd}}
    swept = {"D": 128, "dtype": "bf16", "bucket": "long", "tiles": {"fwd": fwd}}
    stale = dict(other, gpu="THIS GPU", cases=[unswept, swept])
    path = tmp_path / "attention_tuned.json"
    path.write_text(json.dumps({"version": 2, "tables": [other, stale]}))
    results = [trial("bwd_atomic", (128, 32, 2, 8, 3), 5.0), trial("bwd_kv", (128, 32, 2, 8, 2), 4.5),
               trial("bwd_dq", (64, 2, 64, 8, 3), 4.0), trial("fwd", (64, 2, 128, 8, 3), 1.0),
               trial("fwd", (64, 2, 64, 8, 3), 1.2), trial("fwd", (64, 4, 64, 4, 3), 0.5, "short")]  # fmt: skip
    bench.write_tuned(path, results, "THIS GPU")
    doc = json.loads(path.read_text())
    attention.parse_tuned(doc, str(path))
    assert [t["gpu"] for t in doc["tables"]] == ["OTHER GPU", "THIS GPU"] and doc["tables"][0] == other
    kept, long_case, short_case = doc["tables"][1]["cases"]
    assert {k: v for k, v in kept.items() if k != "note"} == unswept
    assert kept["note"].startswith("swept 2026-01-01 with torch 2.11.0, triton 3.6.0")  # where its tiles came from
    assert (long_case["D"], long_case["bucket"], long_case["backward"]) == (128, "long", "deterministic")
    assert long_case["tiles"]["fwd"] == {"block_m": 64, "hpb": 2, "block_n": 128, "num_warps": 8, "num_stages": 3}
    assert long_case["tiles"]["bwd_dq"] == dict(zip(attention.TUNED_FIELDS["bwd_dq"], (64, 2, 64, 8, 3)))
    assert short_case["bucket"] == "short" and "backward" not in short_case and set(short_case["tiles"]) == {"fwd"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention_tuned.json"]  # no temporary file left


def test_table_cases_follow_the_asked_shapes() -> None:
    bench = load_tool("bench_attention")
    cases = dict(bench.table_cases([4096, 131072], ["one", "eq4K", "alpaca"]))
    assert list(cases) == ["one4K", "eq4K/4K", "alpaca/4K", "one128K", "eq4K/128K", "alpaca/128K"]
    assert cases["one128K"] == [131072] and cases["eq4K/128K"] == [4096] * 32
    assert all(sum(lens) == int(name.split("/")[-1].removeprefix("one")[:-1]) * 1024 for name, lens in cases.items())
    assert dict(bench.table_cases([2048], ["eq4K"])) == {}  # no 4K examples fit a 2K pack
    # One token past a whole K is its own case, not the K below it (the int64 offsets start at 524,289 tokens).
    assert [name for name, _ in bench.table_cases([524288, 524416], ["one"])] == ["one512K", "one524416"]


@pytest.mark.parametrize(("option", "value"), [("--shapes", "one,whole"), ("--impls", "padless,fa3")])
def test_unknown_shapes_and_implementations_are_refused(option: str, value: str) -> None:
    proc = run_tool("bench_attention", option, value, timeout=60)
    assert proc.returncode == 2 and f"{option}: unknown" in proc.stderr


@pytest.mark.parametrize("bucket", ["medium", "long", "xlong"])
def test_backward_candidates_try_four_heads_per_tile(bucket: str) -> None:
    # Longer buckets pack 2 heads per tile; 4 (16 tokens x 4 heads) won on one 128K sequence on an H100, so the
    # sweep must try it, for both backward passes, and not for head dims above 128 (their tiles are smaller).
    bench = load_tool("bench_attention")
    for kind, hpb_at in (("bwd_kv", 2), ("bwd_atomic", 2), ("bwd_dq", 1)):
        assert 4 in {c[hpb_at] for c in bench.candidates(kind, bucket, 128, 4)}, kind
        assert 2 in {c[hpb_at] for c in bench.candidates(kind, bucket, 128, 4)}, kind
        assert 4 not in {c[hpb_at] for c in bench.candidates(kind, bucket, 256, 4)}, kind
        assert {c[hpb_at] for c in bench.candidates(kind, bucket, 128, 2)} == {2}, kind
