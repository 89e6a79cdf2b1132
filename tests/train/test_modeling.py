"""load_model / tiny_config / apply_adapters: what is built, what is trainable, and the errors users meet."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from padless.train.adapters import DEFAULT_TARGETS, apply_adapters
from padless.train.config import TrainError
from padless.train.modeling import TINY_FAMILIES, load_model, tiny_config
from padless.train.packed_forward import packed_loss
from padless.train.random_weights import write_random_model
from tests.train.tiny_models import SMALL, make_batch, trainable


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_config_per_family(family):
    config = tiny_config(family, 321, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    assert config.model_type == family
    assert config.vocab_size == 321 and config.hidden_size == 48
    assert config.head_dim == 12  # follows hidden_size / heads when not given
    assert config.use_cache is False


def test_tiny_config_errors():
    with pytest.raises(TrainError, match="--family 'gpt2' has no tiny config; expected one of llama, mistral"):
        tiny_config("gpt2", 100)
    with pytest.raises(TrainError, match="vocab_size=0"):
        tiny_config("llama", 0)


def test_tiny_model_is_seeded_small_and_cache_free():
    a = load_model(None, vocab_size=151_000, family="qwen3", seed=3)
    b = load_model(None, vocab_size=151_000, family="qwen3", seed=3)
    c = load_model(None, vocab_size=151_000, family="qwen3", seed=4)
    assert a.config.use_cache is False and not a.training
    assert 64 <= a.config.hidden_size <= 128 and 2 <= a.config.num_hidden_layers <= 4
    assert a.get_input_embeddings().weight.shape == (151_000, a.config.hidden_size)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="needs vocab_size"):
        load_model(None)
    (tmp_path / "config.json").write_text(tiny_config("llama", 50).to_json_string())
    with pytest.raises(TrainError, match=re.escape(f"model folder '{tmp_path}' has a config.json but no weights")):
        load_model(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainError, match=r"has no config\.json"):
        load_model(str(empty))
    with pytest.raises(TrainError, match="is not a model folder"):
        load_model(str(tmp_path / "missing"))


def test_a_damaged_weights_file_is_a_train_error(tmp_path: Path) -> None:
    load_model(None, vocab_size=61, config_overrides=SMALL).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TrainError, match=r"^cannot load the model folder .*: a \*\.safetensors file in it is damaged"):
        load_model(str(tmp_path))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrainError, match=r"(?s)padless-no-such-org/no-such-model.*not a local folder.*Offline"):
        load_model("padless-no-such-org/no-such-model")


def test_load_model_from_folder_roundtrip(tmp_path):
    built = load_model(None, vocab_size=61, family="gemma", seed=5, config_overrides=SMALL)
    built.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype=torch.float32)
    assert loaded.config.use_cache is False
    for (name, p), q in zip(built.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    bf16 = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16


def test_apply_adapters_modes():
    lora = apply_adapters(load_model(None, vocab_size=50, config_overrides=SMALL), mode="lora", r=4, alpha=8)
    names = list(trainable(lora))
    assert names and all("lora_" in n for n in names)
    for target in DEFAULT_TARGETS:
        assert any(f"{target}.lora_A" in n for n in names), target
    only_q = apply_adapters(
        load_model(None, vocab_size=50, config_overrides=SMALL), mode="lora", target_modules=["q_proj"]
    )
    assert all("q_proj" in n for n in trainable(only_q))
    full = apply_adapters(load_model(None, vocab_size=50, config_overrides=SMALL), mode="full")
    assert all(p.requires_grad for p in full.parameters())
    with pytest.raises(TrainError, match="--qlora needs a base loaded in 4 bits"):
        apply_adapters(load_model(None, vocab_size=50, config_overrides=SMALL), mode="qlora")
    with pytest.raises(TrainError, match="mode='dora'"):
        apply_adapters(load_model(None, vocab_size=50, config_overrides=SMALL), mode="dora")


def test_adding_lora_warns_about_nothing_the_user_did():
    """peft reads a property transformers deprecated; a user's run must not print that warning."""
    import warnings

    model = load_model(None, vocab_size=50, config_overrides=SMALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_adapters(model, mode="lora", r=4)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_readme_demo_size_trains_on_cpu():
    """The default tiny model learns: a few AdamW steps on one fixed pack lower the packed loss."""
    model = load_model(None, vocab_size=500, family="llama", seed=0)
    model = apply_adapters(model, mode="full")
    model.train()
    batch = make_batch([40, 60, 28], vocab_size=500, seed=1)
    opt = torch.optim.AdamW(trainable(model).values(), lr=3e-3)
    losses = []
    for _ in range(6):
        total, n = packed_loss(model, batch)
        loss = total / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize(
    ("device", "checkpointing"), [("cpu", "on"), pytest.param("cuda", "offload", marks=pytest.mark.gpu)]
)
def test_qlora_loads_and_trains_one_step(device: str, checkpointing: str, tmp_path: Path) -> None:
    """A random QLoRA base: every projection NF4, its weights those the random folder held (up to NF4 rounding),
    and one packed step trains the adapters."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    overrides = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
    model = load_model(
        None, vocab_size=1024, family="qwen3", dtype=torch.bfloat16, device=device, quantize_4bit=True,
        config_overrides=overrides,
    )  # fmt: skip
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 7 * model.config.num_hidden_layers
    folder = write_random_model(tiny_config("qwen3", 1024, **overrides), tmp_path, seed=0, device=device)
    name = "model.layers.1.mlp.down_proj"
    written = load_file(str(folder / "model.safetensors"))[f"{name}.weight"].float()
    weight = quantized[name].weight
    restored = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float().cpu()
    assert restored.shape == written.shape
    # NF4 keeps each weight to within about a tenth of its block's scale: the same weights, not merely the same shape
    assert (restored - written).abs().mean() < 0.12 * written.abs().mean()
    assert torch.corrcoef(torch.stack([restored.flatten(), written.flatten()]))[0, 1] > 0.99
    model = apply_adapters(model, mode="qlora", r=8)
    model.train()
    params = trainable(model)
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    batch = make_batch([100, 37, 200], vocab_size=1024, seed=2, device=device)
    total, n = packed_loss(model, batch, checkpointing=checkpointing)
    (total / n).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    opt.step()
    assert torch.isfinite(total)
    assert any(not torch.equal(before[k], v) for k, v in params.items())


def test_vocab_override_may_grow_the_vocabulary_but_not_shrink_it() -> None:
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    grown = load_model(None, vocab_size=50, config_overrides={**small, "vocab_size": 64})
    assert grown.config.vocab_size == 64 and grown.get_input_embeddings().weight.shape[0] == 64
    with pytest.raises(TrainError, match=r"vocab_size=40 is smaller than the shards' tokenizer vocabulary \(50\)"):
        load_model(None, vocab_size=50, config_overrides={**small, "vocab_size": 40})
