"""Each family's own features, packed == one by one against stock Hugging Face, on every path the trainer takes.

The tiny models of ``test_packed_parity`` keep Hugging Face's initial values: every norm weight equal, every bias
zero, tied embeddings, ``query_pre_attn_scalar == head_dim``. Wiring mistakes are invisible there (one norm module
used for another, q_norm for k_norm, the embedding for an untied lm_head, a dropped bias, ``1/sqrt(head_dim)`` for
Gemma 2's scale). Here every vector parameter (norm weights, biases) is random, and each case switches on what its
family has: attention and MLP biases, untied lm_heads, sliding windows on some layers, both soft-caps, a query
scalar that is not the head dim, a head dim that is not hidden / heads, one key-value head and as many as query
heads, llama3 and yarn RoPE. The reference is the unpatched model run on each example alone; the packed paths are
those of ``train run`` (checkpointing off / on with --keep-attention / offload with --mlp-tile-tokens) and of the
evaluation (eval mode, no grad), with ``config.use_cache=True`` set after patching: the packed path builds no mask
and keeps no cache whatever the config says.
"""

from __future__ import annotations

import pytest
import torch

from padless.train.adapters import apply_adapters
from padless.train.model_patch import patch_model
from padless.train.packed_forward import packed_loss
from tests.train.tiny_models import (
    example_only_labels,
    grads_of,
    hf_example_loss,
    make_batch,
    randomize_lora,
    tiny_model,
    trainable,
)

LENGTHS = [7, 12, 5]  # ragged; longer than every sliding window below

FEATURES = {
    "llama-untied-mha-biases-llama3": ("llama", {
        "tie_word_embeddings": False, "num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True,
        "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    }),
    "mistral-window-mqa-head-dim": ("mistral", {"sliding_window": 3, "num_key_value_heads": 1, "head_dim": 16}),
    "qwen2-biases-window-on-layer-1-untied": ("qwen2", {
        "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, "tie_word_embeddings": False,
    }),
    "qwen3-qk-norm-biases-window-head-dim-yarn": ("qwen3", {
        "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1, "head_dim": 16,
        "attention_bias": True, "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 100.0,
                            "original_max_position_embeddings": 16},
    }),
    "gemma-mqa-head-dim": ("gemma", {"num_key_value_heads": 1, "head_dim": 16}),
    "gemma2-scalar-softcaps-window-untied": ("gemma2", {
        "query_pre_attn_scalar": 5, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.5,
        "sliding_window": 3, "tie_word_embeddings": False,
    }),
}  # fmt: skip

PATHS = {
    "off": {},
    "on-keep-attention": {"checkpointing": "on", "keep_attention": True},
    "offload-tiled-mlp": {"checkpointing": "offload", "mlp_tile_tokens": 5},
}


def randomize_vectors(model: torch.nn.Module, seed: int = 7, std: float = 0.3) -> None:
    """Add noise to every 1-D parameter (norm weights, biases), so that each module's own values matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn(param.shape, generator=gen) * std)


def feature_model(case: str, mode: str) -> torch.nn.Module:
    family, overrides = FEATURES[case]
    model = tiny_model(family, **overrides)
    randomize_vectors(model)
    model = apply_adapters(model, mode=mode, r=4, alpha=8)
    randomize_lora(model)
    model.train()
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp_min(1e-3)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale + 1e-7, f"{what}: max abs diff {err:.3e}, reference scale {scale:.3e}"


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("case", list(FEATURES))
def test_family_features_packed_equal_one_by_one(case, mode):
    model = feature_model(case, mode)
    params = trainable(model)
    if mode == "full":
        assert any(name.endswith(".bias") for name in params) == case.startswith(("llama", "qwen"))
    batch = make_batch(LENGTHS, seed=3)
    alone = [hf_example_loss(model, batch, s) for s in range(len(LENGTHS))]  # unpatched: the reference
    want_total = sum(loss.detach() for loss in alone)
    want_grads = grads_of(sum(alone), params)

    patch_model(model)
    model.config.use_cache = True
    for path, options in PATHS.items():
        model.zero_grad(set_to_none=True)
        total, n = packed_loss(model, batch, **options)
        total.backward()  # a tiled MLP's weights get their gradients in .grad only
        assert int(n) == batch.num_trainable
        assert_close(total.detach(), want_total, f"{path}: pack loss")
        for name, param in params.items():
            got = torch.zeros_like(param) if param.grad is None else param.grad
            assert_close(got, want_grads[name], f"{path}: grad {name}")

    model.eval()
    with torch.no_grad():
        for s, want in enumerate(alone):
            got, _ = packed_loss(model, example_only_labels(batch, s), checkpointing="on", keep_attention=True)
            assert_close(got, want.detach(), f"eval: example {s} loss")
