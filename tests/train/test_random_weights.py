"""write_random_model: a folder from_pretrained loads whole, the family's own initialisation, reproducible weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from padless.train.modeling import TINY_FAMILIES, tiny_config
from padless.train.random_weights import write_random_model

SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}


def _load(folder: Path) -> tuple[torch.nn.Module, dict]:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
def test_every_weight_is_written_once_and_loads(family: str, tied: bool, tmp_path: Path) -> None:
    config = tiny_config(family, 97, tie_word_embeddings=tied, **SHAPE)
    model, info = _load(write_random_model(config, tmp_path, seed=1))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    # The family's initialisation, as from_config gives it: the same constants (norm scales, biases) and linear
    # weights of the same spread.
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        if ours.ndim == 1:
            assert torch.equal(ours, theirs), name
        else:
            assert ours.std().item() == pytest.approx(theirs.std().item(), rel=0.25), name


def test_weights_depend_on_the_seed_alone(tmp_path: Path) -> None:
    config = tiny_config("qwen3", 97, **SHAPE)
    whole, _ = _load(write_random_model(config, tmp_path / "whole", seed=5))
    sharded_folder = write_random_model(config, tmp_path / "sharded", seed=5, shard_bytes=4096)
    assert len(list(sharded_folder.glob("*.safetensors"))) > 3
    assert (sharded_folder / "model.safetensors.index.json").is_file()
    sharded, _ = _load(sharded_folder)
    other, _ = _load(write_random_model(config, tmp_path / "other", seed=6))
    for (name, a), b, c in zip(whole.named_parameters(), sharded.parameters(), other.parameters()):
        assert torch.equal(a, b), name
        if a.ndim > 1:
            assert not torch.equal(a, c), name


@pytest.mark.gpu
def test_gpu_random_qlora_base_never_exists_whole_in_bf16() -> None:
    """Loading a random QLoRA base peaks near its NF4 size: about a quarter of the bf16 model it stands for."""
    from padless.train.modeling import load_model

    overrides = {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 8, "head_dim": 128,
                 "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True}  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = load_model(None, vocab_size=32000, family="qwen3", dtype=torch.bfloat16, device="cuda",
                       quantize_4bit=True, config_overrides=overrides)  # fmt: skip
    loaded = torch.cuda.memory_allocated() - start
    peak = torch.cuda.max_memory_allocated() - start
    logical = sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel() for p in model.parameters())
    bf16 = 2 * logical
    layer_bf16 = 2 * (2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 6144)  # one decoder layer's projections
    assert loaded < 0.45 * bf16, (loaded, bf16)
    assert peak < loaded + 2 * layer_bf16, (peak, loaded, bf16)
