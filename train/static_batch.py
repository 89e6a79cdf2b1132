"""Fixed-shape micro-batches: a packed stream padded to a static token count and example capacity.

A CUDA graph replays exactly the kernels it captured, with their shapes and grid sizes, but a packed micro-batch
has a varying number of tokens T (<= the token budget) and of examples S. :func:`pad_micro_batch` pads one on the
host to a :class:`StaticShape`: the T real tokens, then filler examples (token 0, positions restarting at 0,
labels -100, none longer than ``max_seqlen``, so the attention schedule and the RoPE cache keep their bounds),
then zero-length examples (repeated ``cu_seqlens`` entries) up to the example capacity.

Filler tokens are examples of their own: they see nothing real, nothing real sees them, and no label reaches them
or comes from them (every example's first label is -100, so the next-token shift stops at each boundary). The
padded micro-batch therefore has the same loss sum, counted tokens and gradients as the real one; the filler only
costs its own (small) compute. ``tests/train/test_static_batch.py`` proves it through the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import IGNORE_INDEX, MicroBatch

__all__ = ["StaticShape", "pad_micro_batch", "static_shape"]


@dataclass(frozen=True)
class StaticShape:
    """The one shape every padded micro-batch takes: ``tokens`` (T), ``examples`` (S, so cu_seqlens has S+1
    entries) and ``max_seqlen`` (the longest example any of them may hold, filler included). ``mean_seqlen``:
    the data's real mean example length, handed to attention to pick its tiling (the padded T / S is smaller);
    None: each batch's own real mean. ``max_trainable``: the most trainable tokens any of the micro-batches has;
    the captured lm_head + loss then runs on that many rows (counted tokens first) instead of all ``tokens``;
    None: on every token."""

    tokens: int
    examples: int
    max_seqlen: int
    mean_seqlen: float | None = None
    max_trainable: int | None = None

    def filler_examples(self, n_tokens: int) -> int:
        """Filler examples needed to pad ``n_tokens`` real tokens to ``tokens`` (each <= ``max_seqlen``)."""
        return -(-(self.tokens - n_tokens) // self.max_seqlen)

    def why_not(self, batch: MicroBatch) -> str | None:
        """None if ``batch`` pads to this shape, else what does not fit (for the error message)."""
        n_tokens = int(batch.input_ids.shape[0])
        if n_tokens > self.tokens:
            return f"{n_tokens} tokens > the static {self.tokens}"
        if batch.max_seqlen > self.max_seqlen:
            return f"an example of {batch.max_seqlen} tokens > the static max_seqlen {self.max_seqlen}"
        needed = batch.num_examples + self.filler_examples(n_tokens)
        if needed > self.examples:
            return f"{batch.num_examples} examples + filler = {needed} > the static capacity {self.examples}"
        if self.max_trainable is not None and batch.num_trainable > self.max_trainable:
            return f"{batch.num_trainable} trainable tokens > the static max_trainable {self.max_trainable}"
        return None


def static_shape(
    max_tokens: int,
    max_examples: int,
    max_seqlen: int,
    mean_seqlen: float | None = None,
    max_trainable: int | None = None,
) -> StaticShape:
    """The smallest shape that holds every micro-batch of at most ``max_tokens`` tokens, ``max_examples``
    examples and examples of at most ``max_seqlen`` tokens (``max_seqlen`` = the shards' max_len);
    ``mean_seqlen`` = the data's mean example length (tokens / examples), the attention tiling hint;
    ``max_trainable`` = the most trainable tokens of any micro-batch (None: the loss runs on every token)."""
    if min(max_tokens, max_examples, max_seqlen) < 1:
        raise ValueError(
            f"static_shape(max_tokens={max_tokens}, max_examples={max_examples}, max_seqlen={max_seqlen}): "
            "all must be >= 1"
        )
    if mean_seqlen is not None and not mean_seqlen > 0:
        raise ValueError(f"static_shape(mean_seqlen={mean_seqlen!r}): must be None or > 0")
    if max_trainable is not None and not 0 <= max_trainable <= max_tokens:
        raise ValueError(f"static_shape(max_trainable={max_trainable!r}): must be None or in [0, {max_tokens}]")
    shape = StaticShape(tokens=int(max_tokens), examples=0, max_seqlen=int(min(max_seqlen, max_tokens)))
    # A micro-batch with fewer real tokens needs more filler; at least one real token is always there.
    examples = int(max_examples) + shape.filler_examples(1)
    mean = None if mean_seqlen is None else float(mean_seqlen)
    bound = None if max_trainable is None else int(max_trainable)
    return StaticShape(shape.tokens, examples, shape.max_seqlen, mean, bound)


def _fill(real: torch.Tensor, size: int, tail: torch.Tensor) -> torch.Tensor:
    """``real`` followed by ``tail`` in one new tensor of ``size`` elements and ``real``'s dtype."""
    out = torch.empty(size, dtype=real.dtype)
    out[: real.numel()] = real
    out[real.numel() :] = tail
    return out


def pad_micro_batch(batch: MicroBatch, shape: StaticShape) -> MicroBatch:
    """``batch`` (host tensors) padded to ``shape`` with filler and zero-length examples (see the module doc).

    ``num_tokens`` and ``num_trainable`` keep the real counts, ``mean_seqlen`` is the shape's (else the batch's real
    mean example length), ``counted_bound`` the shape's ``max_trainable``; raises ValueError when the batch does
    not fit.
    """
    problem = shape.why_not(batch)
    if problem is not None:
        raise ValueError(
            f"micro-batch does not fit the static shape {shape}: {problem}. Build the shape from the whole run's "
            "micro-batches (train.static_batch.static_shape) or turn CUDA graphs off (--cuda-graphs off)."
        )
    if batch.input_ids.device.type != "cpu":
        raise ValueError(f"pad_micro_batch pads host tensors; got input_ids on {batch.input_ids.device}.")
    n_tokens = int(batch.input_ids.shape[0])
    pad = shape.tokens - n_tokens
    n_fill = shape.filler_examples(n_tokens)
    # Filler example j covers [n_tokens + j*L, min(n_tokens + (j+1)*L, tokens)) with L = max_seqlen.
    fill_starts = torch.arange(n_fill, dtype=torch.int64) * shape.max_seqlen
    fill_positions = torch.arange(pad, dtype=torch.int64) % shape.max_seqlen
    bounds = torch.cat([(n_tokens + fill_starts[1:]), torch.tensor([shape.tokens])]) if n_fill else torch.tensor([])
    n_zero = shape.examples - batch.num_examples - n_fill
    cu_tail = torch.cat([bounds.to(torch.int64), torch.full((n_zero,), shape.tokens, dtype=torch.int64)])
    return MicroBatch(
        input_ids=_fill(batch.input_ids, shape.tokens, torch.zeros(pad, dtype=batch.input_ids.dtype)),
        position_ids=_fill(batch.position_ids, shape.tokens, fill_positions.to(batch.position_ids.dtype)),
        labels=_fill(batch.labels, shape.tokens, torch.full((pad,), IGNORE_INDEX, dtype=batch.labels.dtype)),
        cu_seqlens=_fill(batch.cu_seqlens, shape.examples + 1, cu_tail.to(batch.cu_seqlens.dtype)),
        max_seqlen=shape.max_seqlen,
        num_tokens=batch.num_tokens,
        num_trainable=batch.num_trainable,
        mean_seqlen=shape.mean_seqlen or batch.num_tokens / max(batch.num_examples, 1),
        counted_bound=shape.max_trainable,
    )
