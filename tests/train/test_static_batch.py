"""Padding to a static shape changes nothing: same loss sum, count and gradients, no example sees the filler.

The padded micro-batch goes through the same patched model path (reference ops on CPU, and the Triton kernels
under the interpreter) as the real one; the comparison is against the unpadded batch, an independent run.
"""

from __future__ import annotations

import pytest
import torch

from padless.train.adapters import apply_adapters
from padless.train.batch import IGNORE_INDEX
from padless.train.packed_forward import packed_loss
from padless.train.static_batch import StaticShape, pad_micro_batch, static_shape
from tests.train.tiny_models import grads_of, make_batch, randomize_lora, tiny_model, trainable


def test_shape_reserves_room_for_filler():
    shape = static_shape(max_tokens=100, max_examples=7, max_seqlen=32)
    # one real token leaves 99 to fill: four filler examples of <= 32 tokens
    assert shape == StaticShape(tokens=100, examples=11, max_seqlen=32)
    assert static_shape(64, 3, 1024).max_seqlen == 64  # no example is longer than the stream
    with pytest.raises(ValueError, match="must be >= 1"):
        static_shape(0, 1, 1)


@pytest.mark.parametrize("lengths", [[5, 9, 1, 7], [40], [1, 1, 1], [13, 30]])
def test_padded_layout(lengths):
    batch = make_batch(lengths, seed=3)
    shape = static_shape(max_tokens=48, max_examples=4, max_seqlen=16 if max(lengths) <= 16 else 40)
    padded = pad_micro_batch(batch, shape)
    n = batch.num_tokens
    assert padded.input_ids.shape == (shape.tokens,) and padded.cu_seqlens.shape == (shape.examples + 1,)
    assert torch.equal(padded.input_ids[:n], batch.input_ids) and torch.equal(padded.labels[:n], batch.labels)
    assert torch.equal(padded.cu_seqlens[: len(lengths) + 1], batch.cu_seqlens)
    assert (padded.labels[n:] == IGNORE_INDEX).all()
    cu = padded.cu_seqlens.long()
    seg = cu[1:] - cu[:-1]
    assert (seg >= 0).all() and int(cu[-1]) == shape.tokens and int(seg.max()) <= shape.max_seqlen
    for s in range(shape.examples):  # positions restart at 0 in every example, filler included
        a, b = int(cu[s]), int(cu[s + 1])
        assert torch.equal(padded.position_ids[a:b], torch.arange(b - a))
    assert (padded.num_tokens, padded.num_trainable) == (batch.num_tokens, batch.num_trainable)


def test_too_big_batches_are_refused_by_name():
    batch = make_batch([10, 10], seed=1)
    with pytest.raises(ValueError, match="20 tokens > the static 16"):
        pad_micro_batch(batch, StaticShape(16, 8, 16))
    with pytest.raises(ValueError, match="example of 10 tokens > the static max_seqlen 8"):
        pad_micro_batch(batch, StaticShape(32, 8, 8))
    with pytest.raises(ValueError, match="static capacity 3"):
        pad_micro_batch(batch, StaticShape(32, 3, 10))
    with pytest.raises(ValueError, match=f"{batch.num_trainable} trainable tokens > the static max_trainable 5"):
        pad_micro_batch(batch, StaticShape(32, 8, 16, max_trainable=5))
    with pytest.raises(ValueError, match="max_trainable=33"):
        static_shape(32, 8, 16, max_trainable=33)


@pytest.mark.parametrize(
    ("family", "kernels"), [("qwen3", "reference"), ("qwen3", "triton"), ("llama", "triton")]
)  # llama: q/k straight from the LoRA projection into the in-place RoPE kernel (no q/k norm in between)
def test_padding_changes_no_loss_or_gradient(family, kernels, monkeypatch):
    monkeypatch.setenv("PADLESS_KERNELS", kernels)
    model = apply_adapters(tiny_model(family, seed=4), mode="lora", r=4, alpha=8, dropout=0.0)
    randomize_lora(model, seed=5)
    batch = make_batch([7, 12, 3, 9], seed=6, prompt=3)
    # max_trainable above the batch's own count: the loss runs on that many rows (counted first), as in a graph
    shape = static_shape(max_tokens=56, max_examples=6, max_seqlen=16, max_trainable=batch.num_trainable + 3)
    padded = pad_micro_batch(batch, shape)
    assert padded.counted_bound == batch.num_trainable + 3 and batch.counted_bound is None
    params = trainable(model)

    def run(b):
        loss, count = packed_loss(model, b, checkpointing="on", preserve_rng_state=False)
        return loss, count, grads_of(loss, params)

    loss, count, grads = run(batch)
    loss_p, count_p, grads_p = run(padded)
    assert int(count_p) == int(count) == batch.num_trainable
    torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_p.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_padded_batches_carry_the_attention_tiling_hint():
    batch = make_batch([30, 10, 20], seed=2)  # 60 real tokens, 3 examples: mean 20
    assert pad_micro_batch(batch, static_shape(64, 4, 32)).mean_seqlen == pytest.approx(20.0)
    assert pad_micro_batch(batch, static_shape(64, 4, 32, mean_seqlen=123.5)).mean_seqlen == 123.5
    with pytest.raises(ValueError, match="mean_seqlen=0"):
        static_shape(64, 4, 32, mean_seqlen=0)
