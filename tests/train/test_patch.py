"""patch_model: per-instance and reversible, plans read from the instance, RoPE cache from HF's rotary module; ops."""

from __future__ import annotations

import pytest
import torch

from padless.train import ops
from padless.train.config import TrainError
from padless.train.model_patch import PatchHandle, get_patch, patch_model
from padless.train.packed_forward import packed_loss
from tests.train.tiny_models import make_batch, tiny_model


def test_patch_is_per_instance_idempotent_and_reversible():
    model, other = tiny_model("llama"), tiny_model("llama")
    cls_dict_before = dict(vars(type(model)))
    handle = patch_model(model)
    assert isinstance(handle, PatchHandle) and handle.active and not handle.fallback
    assert patch_model(model) is handle  # idempotent
    assert get_patch(model) is handle and get_patch(other) is None
    assert dict(vars(type(model))) == cls_dict_before  # no class / module-level change
    assert all("forward" in vars(layer) for layer in model.model.layers)  # instance forwards only
    assert not any("forward" in vars(layer) for layer in other.model.layers)
    handle.unpatch()
    assert get_patch(model) is None and not handle.active
    assert not any("forward" in vars(layer) for layer in model.model.layers)
    assert model.config.use_cache is False


def test_unpatched_model_is_stock_transformers():
    """Patching, running and unpatching leaves the stock forward's output bit-identical."""
    model = tiny_model("qwen3")
    ids = make_batch([13], seed=1).input_ids[None]
    before = model(input_ids=ids).logits
    handle = patch_model(model)
    packed_loss(model, make_batch([5, 8], seed=2))
    assert torch.equal(model(input_ids=ids).logits, before)  # while patched, the stock forward is untouched
    handle.unpatch()
    assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}}),
        ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                       "original_max_position_embeddings": 64}}),
    ],
)  # fmt: skip
def test_rope_cache_matches_hf_rotary_and_grows(family, overrides):
    model = tiny_model(family, max_position_embeddings=512, **overrides)
    handle = patch_model(model)
    cos, _ = handle.rope_cache(10, torch.device("cpu"))
    assert cos.dtype == torch.float32 and cos.shape[0] >= 10 and cos.shape[1] == model.config.head_dim // 2
    bigger, _ = handle.rope_cache(3000, torch.device("cpu"))  # past max_position_embeddings: extended
    assert bigger.shape[0] >= 3000
    positions = torch.tensor([[0, 1, 7, 511, 2999]])
    hf_cos, hf_sin = model.model.rotary_emb(torch.empty(0), positions)
    half = hf_cos.shape[-1] // 2
    torch.testing.assert_close(bigger[positions[0]], hf_cos[0, :, :half], rtol=0, atol=0)
    torch.testing.assert_close(handle.rope_cache(3000, torch.device("cpu"))[1][positions[0]], hf_sin[0, :, :half])


def test_plan_reads_family_switches():
    gemma = patch_model(tiny_model("gemma"))
    assert gemma.activation == "geglu_tanh" and gemma.family.norm_offset == 1.0
    llama = patch_model(tiny_model("llama"))
    assert llama.activation == "swiglu" and llama.embed_scale is None
    mistral = patch_model(tiny_model("mistral", sliding_window=5))
    assert [p.window for p in mistral.layers] == [5, 5]
    qwen2 = patch_model(tiny_model("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1))
    assert [p.window for p in qwen2.layers] == [None, 6]
    gemma2 = patch_model(tiny_model("gemma2", attn_logit_softcapping=7.0, final_logit_softcapping=11.0))
    assert gemma2.final_softcap == 11.0 and all(p.softcap == 7.0 for p in gemma2.layers)


def test_patch_refuses_a_model_it_cannot_score():
    model = tiny_model("llama")
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    with pytest.raises(TrainError, match="lm_head is adapter-wrapped or has a bias"):
        patch_model(model)
    with pytest.raises(TypeError, match="expects a Hugging Face causal LM"):
        patch_model(torch.nn.Linear(2, 2))


def test_ops_backend_choice(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.backend_for(torch.device("cpu")) == "reference"
    assert ops.backend_for(torch.device("cuda")) == "triton"
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.backend_for(torch.device("cuda")) == "reference"
    monkeypatch.setenv(ops.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="PADLESS_KERNELS='cuda-please'"):
        ops.backend_for(torch.device("cpu"))


def test_ops_triton_dispatch_matches_reference_under_interpreter(monkeypatch):
    """PADLESS_KERNELS=triton routes to the Triton kernels (interpreted on CPU); same numbers as the references."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=gen)
    w = torch.randn(16, generator=gen)
    gate, up = torch.randn(5, 24, generator=gen), torch.randn(5, 24, generator=gen)
    q, k = torch.randn(5, 4, 16, generator=gen), torch.randn(5, 2, 16, generator=gen)
    cos, sin = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    pos = torch.tensor([0, 1, 2, 0, 1])
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(ops.ENV_VAR, backend)
        q_rot, k_rot = ops.rope(q.clone(), k.clone(), cos, sin, pos)
        results[backend] = (ops.rms_norm(x, w, 1e-6, 1.0), ops.swiglu(gate, up), q_rot, k_rot)
    for ref, tri in zip(results["reference"], results["triton"]):
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5)


def test_length_dependent_rope_types_warn():
    model = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.warns(UserWarning, match="rope_type='dynamic'"):
        patch_model(model)


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_layer_hooks_fire_around_the_packed_step(checkpointing):
    """FSDP2 all-gathers a layer's weights in its forward pre-hook: the packed path must call layers as modules."""
    model = tiny_model("llama")
    model.train()
    calls = []
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda module, args, kwargs, i=index: calls.append(i), with_kwargs=True)
    total, _ = packed_loss(model, make_batch([5, 8], seed=3), checkpointing=checkpointing)
    assert calls == [0, 1]
    total.backward()
    assert calls == ([0, 1] if checkpointing == "off" else [0, 1, 1, 0])  # the recompute calls the layers again
