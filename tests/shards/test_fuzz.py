"""The mutation fuzzer (``fuzz.py``) over three small real shard sets: every case must end in a clean
``ShardFormatError`` on open or on read, or in an unchanged read (or, with a forged checksum, in packs that keep every
read guarantee). Zero other exceptions, crashes or hangs.

Each set runs in its own worker process; the driver gives every case a time limit and names the case behind a crash
or a hang, then goes on with a fresh worker. ``PADLESS_FUZZ_SEED`` / ``PADLESS_FUZZ_CASES`` (cases per set) replay
another seed or run longer; a failure message names the case, which replays alone with
``python -m tests.shards.fuzz SET SEED I I+1`` from the repository root.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from padless.shards.writer import ShardWriter

from .fuzz import FAILURES
from .packs import random_packs

SEED = int(os.environ.get("PADLESS_FUZZ_SEED", "18"))
DEFAULT_CASES = {"multi": 900, "plain": 500, "prep": 700}  # 2,100 per run: ~16 s on one core
CASES = DEFAULT_CASES
if "PADLESS_FUZZ_CASES" in os.environ:
    CASES = dict.fromkeys(CASES, int(os.environ["PADLESS_FUZZ_CASES"]))
CASE_LIMIT_S = 30.0  # per case (each takes ~10 ms): only a hang comes near it
REPO = Path(__file__).resolve().parents[2]
WORKER = [sys.executable, "-m", "tests.shards.fuzz"]


def run_fuzz(pristine: Path, seed: int, cases: int) -> tuple[Counter, Counter, list[str]]:
    """Run cases 0..cases-1 in worker processes: (counts by outcome, by (mutation kind, outcome), one line per
    failure)."""
    counts: Counter = Counter()
    by_kind: Counter = Counter()
    failures: list[str] = []
    i = 0
    while i < cases:
        proc = subprocess.Popen(
            [*WORKER, str(pristine), str(seed), str(i), str(cases)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        fd, buf, current, deadline = proc.stdout.fileno(), b"", None, time.monotonic() + 120  # start-up: imports
        while True:
            if b"\n" not in buf:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(fd, 1 << 16) if ready else None
                if chunk is None:  # the time limit passed
                    proc.kill()
                    proc.wait()
                    counts["hang"] += 1
                    failures.append(f"case {current if current is not None else i}: hang (over {CASE_LIMIT_S} s)")
                    i = (current if current is not None else i) + 1
                    break
                if not chunk:  # the worker exited
                    rc = proc.wait()
                    if current is not None or rc != 0:
                        err = proc.stderr.read().decode(errors="replace")[-800:]
                        counts["crash"] += 1
                        failures.append(f"case {current if current is not None else i}: crash (exit {rc}) {err}")
                        i = (current if current is not None else i) + 1
                    break
                buf += chunk
                continue
            line, buf = buf.split(b"\n", 1)
            word, n, *rest = line.decode().split(" ", 3)
            if word == "start":
                current, deadline = int(n), time.monotonic() + CASE_LIMIT_S
            else:
                outcome, detail = rest[0], json.loads(rest[1])
                counts[outcome] += 1
                by_kind[detail.split(":", 1)[0], outcome] += 1
                if outcome in FAILURES:
                    failures.append(f"case {n}: {outcome}: {detail}")
                current, i = None, int(n) + 1
        proc.stdout.close()
        proc.stderr.close()
    return counts, by_kind, failures


def _tokenizer_meta(vocab: int) -> dict:
    return {
        "tokenizer": {"name": "fuzz", "vocab_size": vocab, "bos_id": 1, "eos_id": 2, "pad_id": None,
                      "hash": "0" * 64, "content_hash": "1" * 64, "has_chat_template": False},
        "tokenizer_source": "/nonexistent/tokenizer",
        "options": {"max_len": 48, "maps": [["prompt", "question"]], "seed": 0},
        "source": {"inputs": ["x.jsonl"], "fingerprint": "2" * 64, "rows": 90},
        "fingerprint": "3" * 64,
        "prep": {"split": 0, "rows": 90, "truncated": 0, "dropped": 0, "empty": 0, "fill": 0.5},
    }  # fmt: skip


def _write(path: Path, seed: int, n_examples: int, max_len: int, metadata: dict, vocab: int | None, **kw) -> Path:
    data = random_packs(np.random.default_rng(seed), n_examples, max_len, longest=max_len // 2, vocab=vocab)
    with ShardWriter(path, max_len=max_len, metadata=metadata, **kw) as w:
        w.add_packs(*data)
    return path


@pytest.fixture(scope="module")
def fuzz_sets(tmp_path_factory) -> dict[str, Path]:
    """multi: 3 shards of 2-3 record batches, prep-like metadata; plain: 1 shard, 1 batch, no tokenizer block;
    prep: the held-out set of `prep pack demo:alpaca` (real tokenizer and prep metadata)."""
    from padless.prep.config import PackConfig
    from padless.prep.pipeline import run_pack

    root = tmp_path_factory.mktemp("fuzz")
    sets = {
        "multi": _write(root / "multi", 1, 90, 48, _tokenizer_meta(1000), 1000, tokens_per_batch=200,
                        tokens_per_shard=500),
        "plain": _write(root / "plain", 2, 30, 32, {"note": "no tokenizer"}, None),
    }  # fmt: skip
    out = root / "demo"
    run_pack(
        PackConfig(
            datasets=("demo:alpaca",), max_len=64, eval_examples=40, out=str(out), progress=False, tokens_per_batch=256
        )
    )
    sets["prep"] = out / "eval"
    return sets


@pytest.mark.parametrize("name", list(CASES))
def test_mutations_end_in_an_error_or_an_unchanged_read(fuzz_sets, name):
    counts, by_kind, failures = run_fuzz(fuzz_sets[name], SEED, CASES[name])
    summary = f"{name}: {sum(counts.values())} cases, seed {SEED}: " + ", ".join(
        f"{k} {v}" for k, v in sorted(counts.items())
    )
    print(summary)
    for kind in sorted({k for k, _ in by_kind}):
        print(f"  {kind}: " + ", ".join(f"{o} {v}" for (k, o), v in sorted(by_kind.items()) if k == kind))
    assert not failures, summary + "\n" + "\n".join(failures[:20])
    assert sum(counts.values()) == CASES[name]
    # The mutations reach every layer: refused on open, refused on read, accepted and read back unchanged.
    assert counts["error-open"] and counts["error-read"] and counts["unchanged"], summary


def test_at_least_1000_cases_per_run():
    assert sum(DEFAULT_CASES.values()) >= 1000


def test_the_driver_reports_crashes_hangs_and_other_exceptions(tmp_path, monkeypatch):
    """The driver itself can fail: a worker that dies, one that hangs, one that reports a changed read."""
    fake = tmp_path / "fake_worker.py"
    fake.write_text(
        "import sys, os, time, json\n"
        "i = int(sys.argv[3])\n"
        "print(f'start {i}', flush=True)\n"
        "if i == 0:\n"
        "    print('done 0 changed ' + json.dumps('pack 3 differs'), flush=True)\n"
        "    i = 1\n"
        "    print('start 1', flush=True)\n"
        "if i == 1: os._exit(3)\n"
        "if i == 2: time.sleep(60)\n"
        "print(f'done {i} unchanged \"x\"', flush=True)\n"
    )  # fmt: skip
    monkeypatch.setattr(sys.modules[__name__], "WORKER", [sys.executable, str(fake)])
    monkeypatch.setattr(sys.modules[__name__], "CASE_LIMIT_S", 1.0)
    counts, _, failures = run_fuzz(tmp_path, 0, 4)
    assert counts == Counter({"changed": 1, "crash": 1, "hang": 1, "unchanged": 1}), (counts, failures)
    assert [f.split(":")[0] for f in failures] == ["case 0", "case 1", "case 2"]
