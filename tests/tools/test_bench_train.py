"""CPU smoke test of ``tools/bench_train.py --tiny``: every code path the H200 run takes, on a tiny model.

What can fail here: the step plans (every system's step k must hold the same examples), the padded and packed
batch builders, the loss normalisation (token-loss sum / the step's trainable tokens, whatever the micro-batch
split), the worker subprocess protocol (one JSON row per system, a hung worker costs one row), and the report.
In fp32 on the CPU the losses of systems that see the same examples must agree to float rounding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "bench_train.py"
sys.path.insert(0, str(ROOT / "tools"))

from bench_train_data import IGNORE_INDEX, make_example_steps, make_steps, packed_rows, padded_batches  # noqa: E402

SYSTEMS = (
    "padless-128,padless-512,hf-padded-b1,hf-padded-b8,hf-padded-b32,hf-packed-sdpa-512,"
    "hf-packed-flex-512,liger-packed-sdpa-512,unsloth"
)


def _shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per test run that every pytest-xdist worker sees, so the expensive runs below happen once."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp()
    folder = base.parent / f"bench-train-{uid}" if uid else base / "bench-train"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = _shared_dir(tmp_path_factory)
    out = shared / "shards"
    with FileLock(str(shared / "shards.lock")):
        if not (out / "manifest.json").is_file():
            cmd = [sys.executable, "-m", "prep", "pack", "demo:alpaca", "--max-len", "128", "--out", str(out)]
            subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def tiny_run(shard_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict]:
    """(exit code, output, results JSON) of one --tiny run over SYSTEMS, shared by every test that reads it."""
    shared = _shared_dir(tmp_path_factory)
    out, done = shared / "tiny-run", shared / "tiny-run.json"
    with FileLock(str(shared / "tiny-run.lock")):
        if not done.is_file():
            cmd = [sys.executable, str(SCRIPT), "--tiny", "--shards", str(shard_dir), "--out", str(out), "--steps",
                   "1", "--warmup", "1", "--padded-steps", "plan", "--systems", SYSTEMS, "--seed", "3"]  # fmt: skip
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
            result = out / "bench_train_qwen3-8b_tiny.json"
            doc = json.loads(result.read_text()) if proc.returncode == 0 else {}
            done.write_text(json.dumps([proc.returncode, proc.stdout + proc.stderr, doc]))
    rc, output, doc = json.loads(done.read_text())
    return rc, output, doc


def _rows(doc: dict) -> dict[str, dict]:
    return {r["system"]: r for r in doc["rows"]}


def test_tiny_run_prints_one_table_with_every_system(tiny_run) -> None:
    rc, output, doc = tiny_run
    assert rc == 0, output[-5000:]
    table = output[output.index("bench_train: qwen3-8b (tiny)") :]
    for name in SYSTEMS.split(","):
        assert name in table
    rows = _rows(doc)
    assert set(rows) == set(SYSTEMS.split(","))
    for name in ("padless-128", "padless-512", "hf-padded-b1", "hf-padded-b8", "hf-padded-b32", "hf-packed-sdpa-512"):
        r = rows[name]
        assert r["status"] == "ok", (name, r["status"])
        assert len(r["losses"]) == 2 and all(np.isfinite(r["losses"]))
        assert r["tokens_per_s"] > 0 and r["trainable_tokens_per_s"] > 0
        assert 0 < r["trainable_tokens_per_s"] < r["tokens_per_s"]
        assert r["alloc_retries"] == [0, 0]  # per step; CUDA only (always 0 on CPU)
        assert len(r["gc_s"]) == 2 and all(0 <= g < r["step_times"][i] for i, g in enumerate(r["gc_s"]))
    assert rows["hf-packed-flex-512"]["status"] == "skipped (cpu)"
    assert rows["liger-packed-sdpa-512"]["status"] == "skipped (cpu)"
    assert rows["unsloth"]["status"]  # "not installed offline" here; whatever happened, said in the row
    md = (Path(doc["config"]["out"]) / "bench_train_qwen3-8b_tiny.md").read_text()
    assert "| system |" in md and "transformers" in md and doc["environment"]["versions"]["torch"] in md


def test_same_examples_give_the_same_loss(tiny_run) -> None:
    """Within a plan every system trains on the same examples per step: fp32 losses agree at every step."""
    rc, output, doc = tiny_run
    assert rc == 0, output[-5000:]
    rows = _rows(doc)
    groups = {"128 tok": ["padless-128", "hf-padded-b1"],
              "512 tok": ["padless-512", "hf-padded-b8", "hf-padded-b32", "hf-packed-sdpa-512"]}  # fmt: skip
    for plan, names in groups.items():
        ref = rows[names[0]]["losses"]
        for name in names:
            assert rows[name]["plan"] == plan
            np.testing.assert_allclose(rows[name]["losses"], ref, rtol=0, atol=2e-4, err_msg=name)
    for name in ("padless-128", "padless-512"):
        assert rows[name]["losses"][0] == pytest.approx(rows[name]["hf_unpacked_loss_step1"], abs=2e-4)
    # different examples per step, different losses: the agreement above is not a constant
    assert abs(rows["padless-128"]["losses"][0] - rows["padless-512"]["losses"][0]) > 1e-4


def _one_by_one_loss(shard_dir: Path, seed: int, *, budget: int = 0, examples: int = 0) -> float:
    """Mean next-token loss, one example at a time, of the first plan step (whole packs up to ``budget`` tokens,
    the trainer's micro-batch rule) or of the first ``examples`` examples in the seeded pack order."""
    from bench_train_systems import model_config
    from transformers import AutoModelForCausalLM

    from padless.shards.reader import open_shards

    ss = open_shards(shard_dir)
    spans, used = [], 0
    for i in ss.order(seed, 0).tolist():
        p = ss[i]
        if budget and spans and used + p.num_tokens > budget:
            break
        used += p.num_tokens
        spans += [(p, a, b) for a, b in zip(p.cu_seqlens[:-1].tolist(), p.cu_seqlens[1:].tolist())]
        if examples and len(spans) >= examples:
            spans = spans[:examples]
            break
    cfg, _ = model_config("qwen3-8b", ss.manifest["tokenizer"]["vocab_size"], tiny=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    total, count = 0.0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a busy 2-core machine
    try:
        with torch.no_grad():
            for p, a, b in spans:
                ids = torch.from_numpy(p.input_ids[a:b].astype(np.int64))[None]
                logits = model(input_ids=ids).logits[0, :-1].float()
                target = torch.from_numpy(p.labels[a + 1 : b])
                keep = target != IGNORE_INDEX
                total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
                count += int(keep.sum())
    finally:
        torch.set_num_threads(threads)
    return total / count


def test_step_one_loss_matches_an_independent_computation(tiny_run, shard_dir: Path) -> None:
    """padless-512's step-1 loss = the mean next-token loss, one example at a time, of the plan's first packs."""
    rc, output, doc = tiny_run
    assert rc == 0, output[-5000:]
    expected = _one_by_one_loss(shard_dir, 3, budget=512)
    assert _rows(doc)["padless-512"]["losses"][0] == pytest.approx(expected, abs=2e-4)


def test_padded_example_steps_hold_the_first_b_examples(shard_dir: Path, tmp_path: Path) -> None:
    """The default --padded-steps examples: step 1 of hf-padded-b8 is the sequence's first 8 examples."""
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--shards", str(shard_dir), "--out", str(tmp_path),
           "--systems", "hf-padded-b8", "--steps", "1", "--warmup", "0", "--seed", "4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = _rows(json.loads((tmp_path / "bench_train_qwen3-8b_tiny.json").read_text()))["hf-padded-b8"]
    assert row["status"] == "ok" and row["plan"] == "8 ex" and row["examples_per_step"] == [8]
    assert row["losses"][0] == pytest.approx(_one_by_one_loss(shard_dir, 4, examples=8), abs=2e-4)


def test_batch_builders_keep_every_token_and_mask_padding(shard_dir: Path) -> None:
    from padless.shards.reader import open_shards

    ss = open_shards(shard_dir)
    steps = make_steps(ss, seed=5, budget=384, count=3)
    seen = np.concatenate([s.pack_indices for s in steps])
    np.testing.assert_array_equal(seen, ss.order(5, 0)[: len(seen)])  # consecutive packs in the seeded order
    for s in steps:
        assert sum(ss[int(i)].num_tokens for i in s.pack_indices) <= 384
        np.testing.assert_array_equal(
            np.concatenate([e.input_ids for e in s.examples]),
            np.concatenate([ss[int(i)].input_ids for i in s.pack_indices]).astype(np.int64),
        )
        for b in padded_batches(s.examples, 3):
            ids, mask, labels = b.kwargs["input_ids"], b.kwargs["attention_mask"], b.kwargs["labels"]
            assert int(mask.sum()) == b.real_tokens and ids.shape == labels.shape == mask.shape
            assert bool((labels[mask == 0] == IGNORE_INDEX).all())
        (row,) = packed_rows(s, pad_to=s.num_tokens + 7)
        pos = row.kwargs["position_ids"][0]
        assert row.real_tokens == s.num_tokens and pos.numel() == s.num_tokens + 7
        assert pos[s.num_tokens :].tolist() == list(range(7))  # the padding is its own example
        assert bool((row.kwargs["labels"][0, s.num_tokens :] == IGNORE_INDEX).all())
    ex = make_example_steps(ss, seed=5, per_step=4, count=2)
    flat = [e for s in steps for e in s.examples]
    for k, s in enumerate(ex):  # example steps walk the same example sequence
        assert len(s.examples) == 4
        for e, f in zip(s.examples, flat[4 * k : 4 * k + 4]):
            np.testing.assert_array_equal(e.input_ids, f.input_ids)


def test_a_hung_worker_costs_one_row_not_the_run(shard_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--shards", str(shard_dir), "--out", str(tmp_path),
           "--systems", "hf-padded-b1,hf-padded-b8", "--system-timeout", "2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(json.loads((tmp_path / "bench_train_qwen3-8b_tiny.json").read_text()))
    assert set(rows) == {"hf-padded-b1", "hf-padded-b8"}
    assert all(r["status"].startswith("timeout after 2 s") for r in rows.values())


def test_unsloth_runs_the_hf_padded_b32_steps_or_says_why_not(tmp_path: Path, monkeypatch) -> None:
    import bench_train
    import bench_train_unsloth as bu

    every = {s.name: s for s in bench_train.default_systems(1024, warmup=3, steps=10, slow_steps=3)}
    spec, hf = every["unsloth"], every["hf-padded-b32"]
    assert (spec.family, spec.group, spec.needs_cuda) == ("unsloth", "unsloth", True)  # its own worker process
    same = ("layout", "batch_size", "plan_tokens", "warmup", "steps")  # the same steps: the loss check applies
    assert [getattr(spec, k) for k in same] == [getattr(hf, k) for k in same]
    assert bu.precheck(spec, cuda=False)["status"] == "skipped (cpu)"
    monkeypatch.setattr(bu, "SITE", tmp_path / "site-unsloth")
    if importlib.util.find_spec("unsloth") is None:  # never installed in the venv; the H200 gets /tmp/site-unsloth
        status = bu.precheck(spec, cuda=True)["status"]
        assert status.startswith("not installed offline") and str(tmp_path / "site-unsloth") in status
    (tmp_path / "site-unsloth" / "unsloth").mkdir(parents=True)
    (tmp_path / "site-unsloth" / "unsloth" / "__init__.py").write_text("")
    assert bu.precheck(spec, cuda=True) is None  # installed: it gets a worker


def test_unsloth_worker_sees_its_own_datasets_first_and_stays_offline(tmp_path: Path, monkeypatch) -> None:
    import bench_train_unsloth as bu

    site = tmp_path / "site-unsloth"
    (site / "datasets").mkdir(parents=True)
    (site / "datasets" / "__init__.py").write_text("__version__ = '4.8.5+site'\n")  # shadows the venv's datasets 5
    monkeypatch.setattr(bu, "SITE", site)
    env = bu.worker_env({**os.environ, "PYTHONPATH": str(tmp_path / "other"), "HF_HUB_OFFLINE": "0"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(site), str(tmp_path / "other")]
    assert env["UNSLOTH_DISABLE_STATISTICS"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HF_HUB_OFFLINE"] == "0"  # an explicit setting wins
    probe = "import datasets; print(datasets.__version__)"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4.8.5+site"
    monkeypatch.setattr(sys, "path", ["/elsewhere", str(site)])
    assert bu.use_site() and sys.path == [str(site), "/elsewhere"]


def test_lanes_run_at_the_same_time_and_give_the_same_rows(shard_dir: Path, tiny_run, tmp_path: Path) -> None:
    """';' splits the line-up into lanes (one GPU each on a GPU machine): the rows equal a one-lane run's, the
    table keeps --systems' order, and no per-lane file is left behind."""
    rc, output, doc = tiny_run
    assert rc == 0, output[-5000:]
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--shards", str(shard_dir), "--out", str(tmp_path), "--steps", "1",
           "--warmup", "1", "--padded-steps", "plan", "--seed", "3",
           "--systems", "hf-padded-b8,hf-packed-flex-512;hf-padded-b1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lane_doc = json.loads((tmp_path / "bench_train_qwen3-8b_tiny.json").read_text())
    assert [r["system"] for r in lane_doc["rows"]] == ["hf-padded-b8", "hf-packed-flex-512", "hf-padded-b1"]
    assert lane_doc["environment"]["lanes"] == [["hf-padded-b8", "hf-packed-flex-512"], ["hf-padded-b1"]]
    one_lane = _rows(doc)
    for name in ("hf-padded-b8", "hf-padded-b1"):
        np.testing.assert_allclose(_rows(lane_doc)[name]["losses"], one_lane[name]["losses"], rtol=0, atol=1e-6)
    assert _rows(lane_doc)["hf-packed-flex-512"]["status"] == "skipped (cpu)"
    assert not list(tmp_path.glob("*.lane*.jsonl"))
    assert "  0| " in proc.stdout and "  1| " in proc.stdout


def test_a_system_may_sit_in_one_lane_only() -> None:
    import bench_train

    every = bench_train.default_systems(1024, warmup=3, steps=10, slow_steps=3)
    with pytest.raises(click.BadParameter, match="'padless-1k' is in lane 0 and lane 1"):
        bench_train.select_lanes(every, "padless-1k,hf-padded-b1;padless-*")
    assert [[s.name for s in lane] for lane in bench_train.select_lanes(every, "padless-1k;hf-padded-b1")] == [
        ["padless-1k"],
        ["hf-padded-b1"],
    ]


def test_gc_clock_counts_the_collectors_time() -> None:
    import gc

    from bench_train_systems import _GcClock

    with _GcClock() as clock:
        junk = [[i] for i in range(200_000)]  # many tracked objects: a full collection walks them all
        gc.collect()
        del junk
    assert clock.total > 0 and clock not in gc.callbacks
    seen = clock.total
    gc.collect()
    assert clock.total == seen  # removed from gc.callbacks on exit
