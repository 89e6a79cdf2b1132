"""Contamination: rewriting every token of one packed example changes nothing about the other examples.

Checked on the patched varlen path and on the fallback path (an architecture padless does not patch). A control
test runs the same check against a deliberately leaky forward (one causal mask over the whole stream) and
expects it to fail, so the check itself is known to catch a leak.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from padless.train.adapters import apply_adapters
from padless.train.batch import IGNORE_INDEX
from padless.train.config import TrainError
from padless.train.model_patch import FallbackWarning, patch_model
from padless.train.packed_forward import block_causal_mask, packed_loss
from tests.train.tiny_models import (
    example_only_labels,
    grads_of,
    make_batch,
    randomize_lora,
    replace,
    tiny_model,
    trainable,
)

LENGTHS = [6, 11, 8]
VICTIM = 1  # the example whose tokens are rewritten


def rewrite_example(batch, s, seed=99, vocab=97):
    """All tokens (and trained labels) of example s replaced by fresh random tokens."""
    a, b = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
    gen = torch.Generator().manual_seed(seed)
    ids = batch.input_ids.clone()
    new = torch.randint(0, vocab, (b - a,), generator=gen)
    new = torch.where(new == ids[a:b], (new + 1) % vocab, new)  # every token really changes
    ids[a:b] = new
    labels = batch.labels.clone()
    trained = labels[a:b] != IGNORE_INDEX
    labels[a:b] = torch.where(trained, new, labels[a:b])
    return replace(batch, input_ids=ids, labels=labels)


def others_only(batch, victim):
    labels = batch.labels.clone()
    a, b = int(batch.cu_seqlens[victim]), int(batch.cu_seqlens[victim + 1])
    labels[a:b] = IGNORE_INDEX
    return replace(batch, labels=labels)


def leaks(loss_fn, model, params) -> bool:
    """True if rewriting example VICTIM changes any other example's loss or the others' gradient."""
    batch = make_batch(LENGTHS, seed=21)
    changed = rewrite_example(batch, VICTIM)
    for s in range(len(LENGTHS)):
        if s == VICTIM:
            continue
        before = loss_fn(model, example_only_labels(batch, s))
        after = loss_fn(model, example_only_labels(changed, s))
        if not torch.allclose(before, after, rtol=1e-6, atol=1e-7):
            return True
    g_before = grads_of(loss_fn(model, others_only(batch, VICTIM)), params)
    g_after = grads_of(loss_fn(model, others_only(changed, VICTIM)), params)
    return any(not torch.allclose(g_before[k], g_after[k], rtol=1e-5, atol=1e-7) for k in params)


def padless_loss(model, batch):
    return packed_loss(model, batch)[0]


def leaky_loss(model, batch):
    """One causal mask over the whole stream: what a packed forward without cu_seqlens would do."""
    n = batch.input_ids.shape[0]
    one = torch.tensor([0, n], dtype=torch.int32)
    mask = block_causal_mask(one, n, torch.float32)
    logits = model(
        input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], attention_mask=mask, use_cache=False
    ).logits[0]
    targets = torch.full_like(batch.labels, IGNORE_INDEX)
    targets[:-1] = batch.labels[1:]
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def lora_model(family, **overrides):
    model = apply_adapters(tiny_model(family, **overrides), mode="lora", r=4)
    randomize_lora(model)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_patched_path_is_uncontaminated(family):
    model = lora_model(family)
    patch_model(model)
    assert not leaks(padless_loss, model, trainable(model))


def tiny_neox():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_neox",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=256,
        use_cache=False,
        rotary_pct=0.5,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_fallback_path_warns_and_is_uncontaminated():
    model = apply_adapters(tiny_neox(), mode="lora", r=4)
    randomize_lora(model)
    params = trainable(model)
    assert params
    with pytest.warns(FallbackWarning, match="does not patch model_type 'gpt_neox'.*block-diagonal causal mask"):
        patch_model(model)
    assert model.config.use_cache is False
    # The trap: with a KV cache on, transformers stops building its packed mask. Our explicit mask does not care.
    model.config.use_cache = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # patched once: no second warning per step
        assert not leaks(padless_loss, model, params)


def test_fallback_path_equals_one_by_one():
    model = tiny_neox()
    with pytest.warns(FallbackWarning):
        patch_model(model)
    batch = make_batch(LENGTHS, seed=22)
    total, n = packed_loss(model, batch, checkpointing="on")
    assert int(n) == batch.num_trainable
    expected = 0.0
    for s in range(len(LENGTHS)):
        a, b = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
        logits = model(input_ids=batch.input_ids[None, a:b]).logits[0]
        expected += F.cross_entropy(logits[:-1], batch.labels[a + 1 : b], reduction="sum").item()
    assert abs(total.item() - expected) <= 1e-5 * abs(expected)


def test_fallback_path_refuses_a_tiled_mlp():
    model = tiny_neox()
    with pytest.warns(FallbackWarning):
        patch_model(model)
    with pytest.raises(TrainError, match=r"--mlp-tile-tokens 8: model_type 'gpt_neox' takes the unpatched fallback"):
        packed_loss(model, make_batch(LENGTHS, seed=23), mlp_tile_tokens=8)


def test_leak_detector_catches_a_leaky_forward():
    """Control: a whole-stream causal mask leaks, and the check above says so."""
    model = lora_model("llama")
    assert leaks(leaky_loss, model, trainable(model))
