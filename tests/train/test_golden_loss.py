"""Golden per-step losses of a tiny LoRA run: any silent change to the data feed, loss or model path shows here.

The test trains the run (synthetic shards from a fixed seed, the tiny llama from ``load_model(None)`` at seed 0,
CPU fp32, the kernels' PyTorch references) and compares its per-step losses and gradient norms with the checked-in
``golden/tiny_llama_lora.json``, at a tolerance that allows only floating-point noise between torch/transformers
versions.

After an INTENTIONAL change (e.g. a new tiny-model default or loss normalisation), regenerate and commit:

    PADLESS_UPDATE_GOLDEN=1 python -m pytest tests/train/test_golden_loss.py

and say in the commit message why the numbers moved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .runs import base_config, write_synthetic_shards

GOLDEN = Path(__file__).parent / "golden" / "tiny_llama_lora.json"
SETTINGS = dict(max_steps=8, tokens_per_micro_batch=256, grad_accum=2, lr=2e-2, warmup_steps=2, seed=0)
LOSS_RTOL, NORM_RTOL = 2e-4, 2e-3


def golden_run(workdir: Path) -> dict:
    """Build the synthetic shards and train the golden configuration; return the per-step numbers."""
    import torch
    import transformers

    from padless.train.loop import train

    data = write_synthetic_shards(workdir / "shards", examples=120, seed=1)
    result = train(base_config(data, workdir / "out", **SETTINGS))
    lines = [json.loads(x) for x in (workdir / "out" / "metrics.jsonl").read_text().splitlines()]
    return {
        "settings": SETTINGS,
        "losses": [r["loss"] for r in lines],
        "grad_norms": [r["grad_norm"] for r in lines],
        "trainable_tokens": [r["trainable_tokens"] for r in lines],
        "final_loss": result.losses[-1],
        "generated_with": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def compare(got: dict, golden: dict) -> list[str]:
    """What differs between a run and the golden numbers (empty when they agree within the tolerances)."""
    problems = []
    if got["trainable_tokens"] != golden["trainable_tokens"]:
        problems.append(f"the data feed changed: trainable tokens per step {got['trainable_tokens']}")
    for key, rtol in (("losses", LOSS_RTOL), ("grad_norms", NORM_RTOL)):
        if len(got[key]) != len(golden[key]) or got[key] != pytest.approx(golden[key], rel=rtol):
            problems.append(f"{key} drifted beyond rel {rtol}: got {got[key]}, golden {golden[key]}")
    return problems


def test_losses_match_the_golden_file(tmp_path: Path) -> None:
    got = golden_run(tmp_path)
    if os.environ.get("PADLESS_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; generate it with PADLESS_UPDATE_GOLDEN=1 (see the module doc)"
    problems = compare(got, json.loads(GOLDEN.read_text()))
    assert not problems, "; ".join(problems) + " (if intended, regenerate: see the module doc)"
    assert got["losses"][-1] < got["losses"][0], f"the run must show learning: {got['losses']}"


def test_compare_catches_drift() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert compare(golden, golden) == []
    drifted = {**golden, "losses": [x * (1 + 5 * LOSS_RTOL) for x in golden["losses"]]}
    assert any("losses drifted" in p for p in compare(drifted, golden))
    shorter = {**golden, "grad_norms": golden["grad_norms"][:-1]}
    assert any("grad_norms drifted" in p for p in compare(shorter, golden))
    moved = {**golden, "trainable_tokens": [n + 1 for n in golden["trainable_tokens"]]}
    assert any("data feed changed" in p for p in compare(moved, golden))
