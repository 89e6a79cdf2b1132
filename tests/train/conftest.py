"""Fixtures for the trainer tests: tiny shard sets, and the run settings every CPU trainer test shares.

``synthetic_shards`` writes a shard set with :class:`shards.ShardWriter` from a fixed numpy seed: learnable
sequences (each example counts up by a fixed stride modulo a small vocabulary, prompt half masked), packed
first-fit into ``max_len`` 128. It does not depend on ``prep`` or its tokenizer, so the golden-loss file stays
valid when the prep side changes. ``demo_shards`` is the real thing (``prep pack demo:alpaca``), used where the
test is about the user path; it is skipped while the prep command is not available.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SYNTH_VOCAB = 384
SYNTH_MAX_LEN = 128


def write_synthetic_shards(
    path: Path, *, examples: int, seed: int, max_len: int = SYNTH_MAX_LEN, vocab: int = SYNTH_VOCAB
) -> Path:
    """A small, deterministic shard set (see the module doc); returns ``path``."""
    from padless.shards.writer import ShardWriter

    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, 70, size=examples)
    tokens, mask = [], []
    for n in lengths.tolist():
        start, stride = int(rng.integers(0, vocab)), int(rng.integers(1, 7))
        seq = (start + stride * np.arange(n)) % vocab
        m = np.zeros(n, dtype=bool)
        m[n // 3 :] = True  # the "response": trained; the first third is a masked prompt
        m[0] = False
        tokens.append(seq)
        mask.append(m)
    # First-fit packing in input order (the real packer is prep's; any valid packing will do here).
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths.tolist()):
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_len - n)
    order = [i for b in bins for i in b]
    meta = {"tokenizer": {"name": "synthetic", "vocab_size": vocab, "hash": f"synthetic-{vocab}"}}
    with ShardWriter(path, max_len=max_len, metadata=meta, tokens_per_batch=1024) as w:
        w.add_packs(
            np.concatenate([tokens[i] for i in order]),
            np.concatenate([mask[i] for i in order]),
            lengths[order],
            np.array([len(b) for b in bins]),
            np.asarray(order, dtype=np.int64),
        )
    return path


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


def base_config(shards: Path, output: Path, **overrides):
    """A fast CPU TrainConfig for the tests (tiny llama from the shards' vocab, no progress bar)."""
    from padless.train.config import TrainConfig

    settings = dict(
        shards=str(shards),
        output=str(output),
        lr=3e-3,
        max_steps=4,
        seed=0,
        progress=False,
        device="cpu",
        eval_every=-1,
        # Smaller than the demo's tiny model: these tests check exactness, not learning speed.
        model_overrides='{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, '
        '"num_key_value_heads": 2, "head_dim": 16}',
    )
    settings.update(overrides)
    return TrainConfig(**settings)
