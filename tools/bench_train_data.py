"""Data for ``tools/bench_train.py``: the same examples, in the same order, cut into every system's batch shape.

Every system reads one shard set (built by ``prep pack``). A *step plan* at a token budget B is padless's own
micro-batch plan: the shard set's seeded pack order, filled greedily with whole packs up to B tokens per step
(``train.data.fill_micro_batches`` when it is importable, else the identical greedy fill below). Step k of a plan
holds the examples of its packs (split at ``cu_seqlens``), in pack order. Each system then cuts *the same step* into
its own micro-batches:

* padless and the Hugging Face packed peers: one row, the step's packs laid end to end (the stream padless trains);
* padded peers at batch size b, ``--padded-steps plan``: the step's examples in order, b per micro-batch (the last
  one may hold fewer), right-padded (labels -100, attention_mask 0), with gradient accumulation over the step.

The loss of every micro-batch is its token-loss sum divided by the trainable tokens of the *whole step*, so each
system's step k optimises exactly the same objective on exactly the same examples, whatever its batch shape, and
step losses agree across systems (to bf16 noise) within a plan.

A plan step rarely holds a multiple of b examples (4 packs of Alpaca hold ~34), so ``plan`` mode gives padded
peers a ragged last micro-batch that pays their whole per-micro-batch overhead for a few examples. For a fair
throughput number the default ``--padded-steps examples`` gives them the classic padded step instead: exactly b
examples, one micro-batch, taken in order from the same example sequence (the plan's pack order, flattened).
Their losses are then comparable through padless's check (padless's step-1 loss against Hugging Face's unpacked
loss on the same examples), and ``plan`` mode (the CPU test) shows that the padded path computes the same loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "HostBatch",
    "Step",
    "fill_steps",
    "make_example_steps",
    "make_steps",
    "packed_rows",
    "padded_batches",
    "shards_vocab_size",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One example: token ids and unshifted Hugging Face labels (the first label is always -100)."""

    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64


@dataclass(frozen=True)
class Step:
    """One optimizer step of a plan: its packs (shard indices), the packs themselves and their examples."""

    pack_indices: np.ndarray
    packs: list[Any]
    examples: list[Example]

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_trainable(self) -> int:
        """Targets the shifted loss counts: labels != -100 (never an example's first token, checked on load)."""
        return sum(int((e.labels != IGNORE_INDEX).sum()) for e in self.examples)

    @property
    def sum_sq_len(self) -> int:
        return sum(len(e.input_ids) ** 2 for e in self.examples)


@dataclass(frozen=True)
class HostBatch:
    """A peer's micro-batch on the host: model kwargs plus its real-token count."""

    kwargs: dict[str, torch.Tensor]
    real_tokens: int
    padded_tokens: int  # tokens the model actually processes (real + padding)

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device, non_blocking=True) for k, v in self.kwargs.items()}


def fill_steps(order: np.ndarray, num_tokens: np.ndarray, budget: int) -> list[np.ndarray]:
    """padless's micro-batch plan: whole packs in ``order``, greedily, at most ``budget`` tokens per group."""
    from padless.train.data import fill_micro_batches

    return fill_micro_batches(order, num_tokens, budget)


def _examples_of(pack: Any, pack_index: int) -> list[Example]:
    ids = np.asarray(pack.input_ids, dtype=np.int64)
    labels = np.asarray(pack.labels, dtype=np.int64)
    cu = np.asarray(pack.cu_seqlens, dtype=np.int64)
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if labels[a] != IGNORE_INDEX:
            raise ValueError(
                f"pack {pack_index}: the example at token {a} has label {labels[a]} on its first token, expected "
                "-100 (shards/FORMAT.md: loss_mask is False on every example's first token). Rebuild the shards "
                "with `prep pack`, and check them with `prep verify`."
            )
        out.append(Example(ids[a:b], labels[a:b]))
    return out


_SIZES: dict[int, np.ndarray] = {}


def _pack_sizes(ss: Any) -> np.ndarray:
    """Tokens of every pack, read in index order (sequential record batches: each is decompressed once)."""
    key = id(ss)
    if key not in _SIZES:
        _SIZES[key] = np.array([int(ss[i].num_tokens) for i in range(len(ss))], dtype=np.int64)
    return _SIZES[key]


def _fetch(ss: Any, indices: Sequence[int]) -> dict[int, Any]:
    """Packs by index, fetched in sorted order: the seeded order is random, and a random access decompresses a
    whole record batch, so sorting turns ~400 decompressions into a handful."""
    return {i: ss[i] for i in sorted(set(indices))}


def make_steps(ss: Any, *, seed: int, budget: int, count: int) -> list[Step]:
    """The first ``count`` steps of the plan at ``budget`` tokens (epoch 0 of ``ss.order(seed, 0)``)."""
    order = np.asarray(ss.order(seed, 0), dtype=np.int64)
    groups = fill_steps(order, _pack_sizes(ss), budget)[:count]
    if len(groups) < count:
        raise ValueError(
            f"the shard set has {len(ss)} packs: enough for {len(groups)} steps of {budget} tokens, but {count} "
            "were asked for. Use fewer --steps/--warmup or a larger shard set."
        )
    packs = _fetch(ss, [int(i) for g in groups for i in g])
    steps = []
    for g in groups:
        mine = [packs[int(i)] for i in g]
        examples = [e for i, p in zip(g.tolist(), mine) for e in _examples_of(p, i)]
        steps.append(Step(pack_indices=g, packs=mine, examples=examples))
    return steps


def make_example_steps(ss: Any, *, seed: int, per_step: int, count: int) -> list[Step]:
    """``count`` steps of exactly ``per_step`` examples each, in the plan's example order (pack order, flattened)."""
    order = np.asarray(ss.order(seed, 0), dtype=np.int64)
    need = per_step * count
    # whole packs hold >= 1 example each: read only as many packs as could be needed, in one sorted fetch
    reach = min(len(order), need)
    packs = _fetch(ss, order[:reach].tolist())
    examples: list[Example] = []
    for i in order[:reach].tolist():
        if len(examples) >= need:
            break
        examples += _examples_of(packs[i], i)
    if len(examples) < need:
        raise ValueError(
            f"the shard set holds {len(examples)} examples, fewer than {count} steps x {per_step}; use fewer steps"
        )
    return [
        Step(pack_indices=np.zeros(0, np.int64), packs=[], examples=examples[k * per_step : (k + 1) * per_step])
        for k in range(count)
    ]


def padded_batches(examples: Sequence[Example], batch_size: int, *, pad_id: int = 0) -> list[HostBatch]:
    """Examples in order, ``batch_size`` per micro-batch, right-padded to the longest in each."""
    out = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[r, :n] = torch.from_numpy(e.input_ids)
            labels[r, :n] = torch.from_numpy(e.labels)
            mask[r, :n] = 1
        real = sum(len(e.input_ids) for e in chunk)
        out.append(HostBatch({"input_ids": ids, "attention_mask": mask, "labels": labels}, real, ids.numel()))
    return out


def packed_rows(step: Step, *, pad_to: int | None = None) -> list[HostBatch]:
    """The step as one packed row (batch 1): position_ids restart per example, no attention_mask.

    ``pad_to`` appends one padding "example" (positions restarting at 0, labels -100) so every row has the same
    length, for peers that recompile on every new shape.
    """
    ids = np.concatenate([e.input_ids for e in step.examples])
    labels = np.concatenate([e.labels for e in step.examples])
    pos = np.concatenate([np.arange(len(e.input_ids), dtype=np.int64) for e in step.examples])
    real = len(ids)
    if pad_to is not None and pad_to > real:
        extra = pad_to - real
        ids = np.concatenate([ids, np.zeros(extra, np.int64)])
        labels = np.concatenate([labels, np.full(extra, IGNORE_INDEX, np.int64)])
        pos = np.concatenate([pos, np.arange(extra, dtype=np.int64)])
    kwargs = {
        "input_ids": torch.from_numpy(ids)[None],
        "position_ids": torch.from_numpy(pos)[None],
        "labels": torch.from_numpy(labels)[None],
    }
    return [HostBatch(kwargs, real, len(ids))]


def shards_vocab_size(ss: Any) -> int | None:
    """The shards' tokenizer vocabulary size from the manifest, or None when the manifest does not say."""
    tok = ss.manifest.get("tokenizer") or {}
    size = tok.get("vocab_size")
    return int(size) if size else None
