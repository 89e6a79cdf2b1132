"""``--memory low``: the settings that trade a little speed for the smallest GPU footprint, resolved once.

``fast`` (the default) changes nothing. ``low`` keeps everything exact and changes where things live:
checkpointed layer inputs go to pinned host memory (``--checkpointing off`` becomes ``offload``), the AdamW state
is 8-bit on CUDA (``--optimizer adamw`` becomes ``adamw8bit``, when bitsandbytes is installed), each layer's MLP
runs in tiles of ``LOW_MEMORY_MLP_TILE`` tokens (``--mlp-tile-tokens 0`` becomes that; :mod:`train.tiled_mlp`),
CUDA graphs stay off (their memory pool holds a whole step), and the packed forward keeps the frozen embedding and
lm_head in host memory (:mod:`train.host_vocab`). Settings the user chose otherwise (``--checkpointing on``, a
tile size) are kept; ``--cuda-graphs on`` is an error.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import TrainConfig, TrainError

__all__ = ["LOW_MEMORY_MLP_TILE", "low_memory_choices", "resolve_memory_setting"]

# MLP tile of --memory low: the (tokens x intermediate) tensors stop growing past it, and a 2048-row GEMM still
# keeps a Hopper GPU's tensor cores busy.
LOW_MEMORY_MLP_TILE = 2048


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def low_memory_choices(
    checkpointing: str, optimizer: str, mlp_tile_tokens: int, eight_bit: bool
) -> tuple[str, str, int]:
    """(checkpointing, optimizer, MLP tile) under ``--memory low``: ``off`` becomes offload, ``adamw`` becomes
    8-bit AdamW where ``eight_bit`` (CUDA with bitsandbytes), an untiled MLP gets ``LOW_MEMORY_MLP_TILE``."""
    return (
        "offload" if checkpointing == "off" else checkpointing,
        "adamw8bit" if optimizer == "adamw" and eight_bit else optimizer,
        mlp_tile_tokens or LOW_MEMORY_MLP_TILE,
    )


def resolve_memory_setting(cfg: TrainConfig, device: torch.device, world_size: int) -> TrainConfig:
    """``cfg`` with ``--memory``'s defaults applied (the run records these effective settings)."""
    if cfg.memory != "low":
        return cfg
    if world_size > 1:
        raise TrainError(
            "--memory low keeps the embedding and lm_head in one process's host memory; it runs on one GPU. Use "
            "--memory fast with several processes"
        )
    if cfg.fsdp:
        raise TrainError("--memory low runs in one process without sharding; drop --fsdp or use --memory fast")
    if cfg.cuda_graphs == "on":
        raise TrainError("--memory low runs eagerly (a CUDA graph's pool holds a whole step); drop --cuda-graphs on")
    eight_bit = device.type == "cuda" and _has_bitsandbytes()
    checkpointing, optimizer, tile = low_memory_choices(
        cfg.checkpointing, cfg.optimizer, cfg.mlp_tile_tokens, eight_bit
    )
    return dataclasses.replace(
        cfg, cuda_graphs="off", checkpointing=checkpointing, optimizer=optimizer, mlp_tile_tokens=tile
    )
