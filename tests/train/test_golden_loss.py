"""Golden per-step losses of a tiny LoRA run: any silent change to the data feed, loss or model path shows here.

The run is fully determined (synthetic shards from a fixed seed, the tiny llama from ``load_model(None)`` at
seed 0, CPU fp32, kernels' PyTorch references), so its per-step losses and gradient norms are checked in and
compared at a tolerance that allows only floating-point noise between torch/transformers versions.

After an INTENTIONAL change (e.g. a new tiny-model default or loss normalisation), regenerate and commit:

    PADLESS_KERNELS=reference python -m tests.train.test_golden_loss --write

and say in the commit message why the numbers moved.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "tiny_llama_lora.json"
SETTINGS = dict(max_steps=8, tokens_per_micro_batch=256, grad_accum=2, lr=2e-2, warmup_steps=2, seed=0)


def golden_run(workdir: Path) -> dict:
    """Build the synthetic shards and train the golden configuration; return the per-step numbers."""
    import torch
    import transformers

    from padless.train.loop import train
    from tests.train.runs import base_config, write_synthetic_shards

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


def test_losses_match_the_golden_file(tmp_path: Path) -> None:
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing; generate it: python -m tests.train.test_golden_loss --write")
    golden = json.loads(GOLDEN.read_text())
    got = golden_run(tmp_path)
    assert got["trainable_tokens"] == golden["trainable_tokens"], "the data feed changed (different packs per step)"
    assert got["losses"] == pytest.approx(golden["losses"], rel=2e-4), (
        "per-step losses drifted from tests/train/golden/tiny_llama_lora.json; if intended, regenerate (see the "
        "module doc)"
    )
    assert got["grad_norms"] == pytest.approx(golden["grad_norms"], rel=2e-3)
    assert golden["losses"][-1] < golden["losses"][0], "the golden run must show learning"


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python -m tests.train.test_golden_loss --write  (regenerates the golden file)")
    with tempfile.TemporaryDirectory() as tmp:
        numbers = golden_run(Path(tmp))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(numbers, indent=2) + "\n")
    print(f"wrote {GOLDEN}: losses {[round(x, 4) for x in numbers['losses']]}")
