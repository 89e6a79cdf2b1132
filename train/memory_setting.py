"""``--memory low``: the settings that trade step time for the smallest GPU footprint, resolved once.

``fast`` (the default) changes nothing. ``low`` keeps everything exact and changes where things live:

- the packed forward keeps the frozen embedding and lm_head in pinned host memory (:mod:`train.host_vocab`);
- the AdamW state is 8-bit on CUDA (``--optimizer adamw`` becomes ``adamw8bit``, when bitsandbytes is installed);
- every layer is checkpointed (``--checkpointing off`` becomes ``on``), and micro-batches of more than
  ``LOW_MEMORY_ONLOAD_TOKENS`` tokens send the checkpointed layer inputs to pinned host memory (``offload``);
- each layer's MLP runs in tiles of ``LOW_MEMORY_MLP_TILE`` tokens (``--mlp-tile-tokens 0`` becomes that;
  :mod:`train.tiled_mlp`).

Why short micro-batches keep their layer inputs: a step of a few thousand tokens is bound by kernel launches,
and only a CUDA graph removes that cost (Qwen3-4B QLoRA at 2K tokens on an H100: 0.13 s a step as a graph, 0.68 s
eagerly), while offload rules graphs out; their layer inputs are small (0.35 GiB for Qwen3-4B at 2K tokens) and
the peak of such a step lies elsewhere. Longer micro-batches are bound by their GEMMs, and their layer inputs grow
with them. Settings the user chose otherwise (``--checkpointing on`` or ``offload``, a tile size) are kept, and
``--cuda-graphs on`` keeps the layer inputs on the GPU. The tiled MLP replays inside a CUDA graph like the rest of
the step, so a run that keeps its layer inputs (``--checkpointing on``) is graphed at any size.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import TrainConfig, TrainError

__all__ = [
    "LOW_MEMORY_MLP_TILE",
    "LOW_MEMORY_ONLOAD_TOKENS",
    "low_memory_checkpointing",
    "low_memory_choices",
    "resolve_low_memory_checkpointing",
    "resolve_memory_setting",
]

# MLP tile of --memory low: the (tokens x intermediate) tensors stop growing past it. Each tile costs a nested
# backward and its own weight reads, so the tile is as large as the memory targets allow.
LOW_MEMORY_MLP_TILE = 4096
# Micro-batches up to this many tokens keep their checkpointed layer inputs on the GPU under --memory low.
LOW_MEMORY_ONLOAD_TOKENS = 2048


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def low_memory_checkpointing(checkpointing: str, tokens: int, cuda_graphs: str = "auto") -> str:
    """``--checkpointing`` under ``--memory low`` for micro-batches of ``tokens``: ``off`` becomes ``on`` up to
    ``LOW_MEMORY_ONLOAD_TOKENS`` tokens and ``offload`` above (``on`` at every size with ``--cuda-graphs on``,
    which offload rules out); a mode the user chose is kept."""
    if checkpointing != "off":
        return checkpointing
    return "on" if tokens <= LOW_MEMORY_ONLOAD_TOKENS or cuda_graphs == "on" else "offload"


def low_memory_choices(
    checkpointing: str, optimizer: str, mlp_tile_tokens: int, eight_bit: bool, tokens: int
) -> tuple[str, str, int]:
    """(checkpointing, optimizer, MLP tile) under ``--memory low`` for micro-batches of ``tokens``: see
    :func:`low_memory_checkpointing`; ``adamw`` becomes 8-bit AdamW where ``eight_bit`` (CUDA with bitsandbytes);
    an untiled MLP gets ``LOW_MEMORY_MLP_TILE``."""
    return (
        low_memory_checkpointing(checkpointing, tokens),
        "adamw8bit" if optimizer == "adamw" and eight_bit else optimizer,
        mlp_tile_tokens or LOW_MEMORY_MLP_TILE,
    )


def resolve_memory_setting(cfg: TrainConfig, device: torch.device, world_size: int) -> TrainConfig:
    """``cfg`` with ``--memory``'s optimizer and MLP tile applied; the checkpointing mode waits for the token budget
    (:func:`resolve_low_memory_checkpointing`). The run records these effective settings."""
    if cfg.memory != "low":
        return cfg
    if world_size > 1:
        raise TrainError(
            "--memory low keeps the embedding and lm_head in one process's host memory; it runs on one GPU. Use "
            "--memory fast with several processes"
        )
    if cfg.fsdp:
        raise TrainError("--memory low runs in one process without sharding; drop --fsdp or use --memory fast")
    eight_bit = device.type == "cuda" and _has_bitsandbytes()
    _, optimizer, tile = low_memory_choices(cfg.checkpointing, cfg.optimizer, cfg.mlp_tile_tokens, eight_bit, 0)
    return dataclasses.replace(cfg, optimizer=optimizer, mlp_tile_tokens=tile)


def resolve_low_memory_checkpointing(cfg: TrainConfig, tokens: int) -> TrainConfig:
    """``cfg`` with ``--memory low``'s checkpointing mode for micro-batches of ``tokens`` (unchanged under fast)."""
    if cfg.memory != "low":
        return cfg
    return dataclasses.replace(cfg, checkpointing=low_memory_checkpointing(cfg.checkpointing, tokens, cfg.cuda_graphs))
