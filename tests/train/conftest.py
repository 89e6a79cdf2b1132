"""Fixtures for the trainer tests: tiny shard sets, and the kernels' PyTorch references on CPU.

``synthetic_shards`` is written by ``tests.train.runs.write_synthetic_shards`` (no prep, no tokenizer);
``demo_shards`` is the real thing (``prep pack demo:alpaca``), used where the test is about the user path; it is
skipped while the prep command is not available.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .runs import write_synthetic_shards


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training shards (about 40 packs) with an ``eval/`` set inside, like `prep pack --eval-fraction` writes."""
    root = tmp_path_factory.mktemp("synthetic") / "shards"
    write_synthetic_shards(root, examples=120, seed=1)
    write_synthetic_shards(root / "eval", examples=16, seed=2)
    return root


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prep pack demo:alpaca --max-len 128 --eval-fraction 0.1`` (skips while prep's command is missing)."""
    out = tmp_path_factory.mktemp("demo") / "shards"
    cmd = [sys.executable, "-m", "prep", "pack", "demo:alpaca", "--max-len", "128", "--eval-fraction", "0.1"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"`prep pack demo:alpaca` is not available yet: {proc.stderr.strip()[-300:]}")
    return out


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainer tests run whole models: use the kernels' PyTorch references on CPU (the interpreter is too slow)."""
    import torch

    if not torch.cuda.is_available():
        monkeypatch.setenv("PADLESS_KERNELS", "reference")
