"""Helpers for the trainer tests: deterministic synthetic shard sets, the fast CPU run settings, recorded runs.

``write_synthetic_shards`` writes a shard set with ``shards.ShardWriter`` from a fixed numpy seed: learnable
sequences (each example counts up by a fixed stride modulo a small vocabulary, prompt third masked), packed
first-fit into ``max_len`` 128. It does not depend on ``prep`` or its tokenizer, so the golden-loss file stays
valid when the prep side changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from padless.shards.writer import ShardWriter
from padless.train.config import TrainConfig
from padless.train.loop import Callbacks, TrainResult, train

__all__ = [
    "CLI_FAST",
    "FAST_OVERRIDES",
    "SYNTH_MAX_LEN",
    "SYNTH_VOCAB",
    "Interrupt",
    "Recorder",
    "base_config",
    "cli_equivalent",
    "run_interrupted",
    "run_recorded",
    "write_synthetic_shards",
]

SYNTH_VOCAB = 384
SYNTH_MAX_LEN = 128
# The command line's fast CPU settings (a smaller model than base_config's) and the library config that matches it.
FAST_OVERRIDES = '{"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}'
CLI_FAST = ["--no-progress", "--device", "cpu", "--eval-every", "-1", "--model-overrides", FAST_OVERRIDES]


def write_synthetic_shards(
    path: Path,
    *,
    examples: int,
    seed: int,
    max_len: int = SYNTH_MAX_LEN,
    vocab: int = SYNTH_VOCAB,
    targets: bool = True,
) -> Path:
    """A small, deterministic shard set (see the module doc); returns ``path``. ``targets=False``: every loss_mask
    is False (a set with nothing to learn)."""

    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, 70, size=examples)
    tokens, mask = [], []
    for n in lengths.tolist():
        start, stride = int(rng.integers(0, vocab)), int(rng.integers(1, 7))
        seq = (start + stride * np.arange(n)) % vocab
        m = np.zeros(n, dtype=bool)
        m[n // 3 :] = targets  # the "response": trained; the first third is a masked prompt
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


def base_config(shards: Path, output: Path, **overrides) -> TrainConfig:
    """A fast CPU TrainConfig for the tests (tiny llama from the shards' vocab, no progress bar)."""
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


class Recorder:
    """Keeps the trained model and the gradients seen at each optimizer step."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.grads: list[dict[str, torch.Tensor]] = []

    def __enter__(self) -> Recorder:
        def before_step(optimizer, args, kwargs):
            names = {id(p): n for n, p in self.model.named_parameters()}
            self.grads.append(
                {names[id(p)]: p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]}
            )

        self._handle = register_optimizer_step_pre_hook(before_step)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def on_model(self, model: torch.nn.Module) -> None:
        self.model = model


def run_recorded(cfg, **callbacks) -> tuple[TrainResult, Recorder]:
    """Train ``cfg``, recording the model and the gradients of every optimizer step."""
    rec = Recorder()
    with rec:
        result = train(cfg, callbacks=Callbacks(on_model=rec.on_model, **callbacks))
    return result, rec


class Interrupt(Exception):
    """Raised from a step callback: the run stops there, as a killed one would (no output, no summary)."""


def run_interrupted(cfg: TrainConfig, after_step: int) -> None:
    """Train ``cfg`` and stop it right after step ``after_step`` (its log line and checkpoint are written)."""

    def stop(record):
        if record["step"] == after_step:
            raise Interrupt

    try:
        train(cfg, callbacks=Callbacks(on_step=stop))
    except Interrupt:
        return
    raise AssertionError(f"the run ended before step {after_step}")


def cli_equivalent(shards: Path, output: Path, **overrides) -> TrainConfig:
    """The TrainConfig that ``train run SHARDS --output OUTPUT *CLI_FAST`` builds (plus ``overrides``)."""
    settings = dict(shards=str(shards), output=str(output), progress=False, device="cpu", eval_every=-1,
                    model_overrides=FAST_OVERRIDES)  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)
