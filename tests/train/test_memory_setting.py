"""train.memory_setting: what ``--memory low`` changes, what it keeps, and what it refuses."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from padless.train import memory_setting
from padless.train.config import TrainError
from padless.train.loop import train
from padless.train.memory_setting import (
    LOW_MEMORY_MLP_TILE,
    LOW_MEMORY_ONLOAD_TOKENS,
    resolve_low_memory_checkpointing,
    resolve_memory_setting,
)
from tests.train.runs import base_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_fast_changes_nothing(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, tmp_path / "out")
    assert resolve_memory_setting(cfg, CUDA, 1) is cfg


def test_low_fills_in_the_defaults_and_keeps_explicit_choices(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, tmp_path / "out", memory="low")
    low = resolve_memory_setting(cfg, CUDA, 1)
    assert (low.optimizer, low.cuda_graphs, low.mlp_tile_tokens) == ("adamw8bit", "auto", LOW_MEMORY_MLP_TILE)
    assert low.checkpointing == "off"  # decided once the token budget is known:
    assert resolve_low_memory_checkpointing(low, LOW_MEMORY_ONLOAD_TOKENS).checkpointing == "on"
    assert resolve_low_memory_checkpointing(low, LOW_MEMORY_ONLOAD_TOKENS + 1).checkpointing == "offload"
    assert resolve_memory_setting(dataclasses.replace(cfg, mlp_tile_tokens=64), CUDA, 1).mlp_tile_tokens == 64
    assert resolve_memory_setting(cfg, CPU, 1).optimizer == "adamw"  # 8-bit AdamW needs CUDA
    for chosen in ("on", "offload"):
        kept = resolve_memory_setting(dataclasses.replace(cfg, checkpointing=chosen), CUDA, 1)
        assert resolve_low_memory_checkpointing(kept, 1).checkpointing == chosen
        assert resolve_low_memory_checkpointing(kept, 10**6).checkpointing == chosen
    fast = base_config(tmp_path, tmp_path / "out")
    assert resolve_low_memory_checkpointing(fast, 10**6) is fast


def test_low_refuses_several_processes_and_sharding(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, tmp_path / "out", memory="low")
    with pytest.raises(TrainError, match="one GPU"):
        resolve_memory_setting(cfg, CUDA, 2)
    with pytest.raises(TrainError, match="drop --fsdp"):
        resolve_memory_setting(dataclasses.replace(cfg, fsdp=True), CUDA, 1)


def test_low_with_cuda_graphs_on_keeps_layer_inputs_on_the_gpu_and_tiles_the_mlp(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, tmp_path / "out", memory="low", cuda_graphs="on")
    low = resolve_memory_setting(cfg, CUDA, 1)
    assert low.mlp_tile_tokens == LOW_MEMORY_MLP_TILE  # the tiled MLP replays inside the graph
    assert resolve_low_memory_checkpointing(low, LOW_MEMORY_ONLOAD_TOKENS * 8).checkpointing == "on"  # not offload


@pytest.mark.parametrize("onload_tokens", [10**6, 0], ids=["layer-inputs-kept", "layer-inputs-offloaded"])
def test_a_low_memory_run_trains_like_a_fast_one(
    synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, onload_tokens: int
) -> None:
    from padless.train.loop import Callbacks
    from padless.train.model_patch import get_patch

    monkeypatch.setattr(memory_setting, "LOW_MEMORY_ONLOAD_TOKENS", onload_tokens)
    fast = train(base_config(synthetic_shards, tmp_path / "fast", max_steps=3))
    models = []
    low = train(base_config(synthetic_shards, tmp_path / "low", max_steps=3, memory="low"),
                callbacks=Callbacks(on_model=models.append))  # fmt: skip
    assert get_patch(models[0]).vocab_on_host  # the host-vocab path ran (the loss's and gather's references)
    assert low.summary["config"]["checkpointing"] == ("on" if onload_tokens else "offload")
    assert low.summary["cuda_graphs"] is False and low.summary["warnings"] == low.warnings  # a CPU run is eager
    assert low.losses == pytest.approx(fast.losses, rel=1e-4)


@pytest.mark.gpu
def test_gpu_short_low_memory_micro_batches_run_as_cuda_graphs(synthetic_shards: Path, tmp_path: Path) -> None:
    """Host embedding rows and the streamed loss replay inside a CUDA graph, and train as the fast setting does."""
    settings = dict(device="cuda", model_overrides=None, max_steps=4, tokens_per_micro_batch=300, lr=1e-3)
    fast = train(base_config(synthetic_shards, tmp_path / "fast", cuda_graphs="on", **settings))
    low = train(base_config(synthetic_shards, tmp_path / "low", cuda_graphs="on", memory="low", **settings))
    assert low.summary["config"]["checkpointing"] == "on" and low.warnings == fast.warnings
    assert low.summary["cuda_graphs"] and fast.summary["cuda_graphs"]
    assert all(math.isfinite(x) for x in low.losses)
    assert low.losses == pytest.approx(fast.losses, rel=1e-2)


# Qwen3-4B's shapes (tied embedding, vocabulary of 151,936), loaded as a user loads a saved model folder.
QWEN3_4B = {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_memory")
def test_gpu_qwen3_4b_qlora_at_2k_tokens_peaks_under_3_gib(tmp_path: Path) -> None:
    """The low-memory promise, guarded: Qwen3-4B QLoRA (r16, all projections) at 2K tokens per micro-batch with
    --memory low peaks at most 3.0 GiB, from loading the model through the last step."""
    from padless.train.modeling import tiny_config
    from padless.train.random_weights import write_random_model
    from tests.train.runs import write_synthetic_shards

    vocab = 151936
    folder = write_random_model(tiny_config("qwen3", vocab, **QWEN3_4B), tmp_path / "model", seed=0, device="cuda")
    shards = write_synthetic_shards(tmp_path / "shards", examples=400, seed=5, max_len=1024, vocab=vocab)
    torch.cuda.reset_peak_memory_stats()
    cfg = base_config(shards, tmp_path / "run", model=str(folder), model_overrides=None, mode="qlora",
                      memory="low", tokens_per_micro_batch=2048, max_steps=3, device="cuda", dtype="bf16")  # fmt: skip
    result = train(cfg)
    assert (result.summary["config"]["optimizer"], result.summary["config"]["checkpointing"]) == ("adamw8bit", "on")
    assert result.summary["peak_mem_gib"] <= 3.0, result.summary["memory_gib"]
