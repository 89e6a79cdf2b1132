"""Fixtures for the trainer tests: tiny shard sets, and the kernels' PyTorch references on CPU.

``synthetic_shards`` is written by ``tests.train.runs.write_synthetic_shards`` (no prep, no tokenizer);
``demo_shards`` is the real thing, ``prep pack demo:alpaca`` through prep's library call, used where the test is
about the user path: a prep failure there is a test failure.
"""

from __future__ import annotations

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
    """``prep pack demo:alpaca --max-len 128 --eval-fraction 0.1``."""
    from padless.prep.pipeline import PackConfig, run_pack

    out = tmp_path_factory.mktemp("demo") / "shards"
    run_pack(PackConfig(datasets=("demo:alpaca",), max_len=128, eval_fraction=0.1, out=str(out), progress=False))
    return out


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainer tests run whole models: use the kernels' PyTorch references on CPU (the interpreter is too slow)."""
    import torch

    if not torch.cuda.is_available():
        monkeypatch.setenv("PADLESS_KERNELS", "reference")
