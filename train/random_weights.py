"""Write a randomly initialised model to a Hugging Face folder one module at a time.

A random model of real shapes (an 8B-shaped benchmark, a 4B QLoRA memory test) must reach the GPU the way a
user's model does: read from safetensors and, for QLoRA, quantized to NF4 tensor by tensor while loading. Building
the whole model in bf16 on the GPU first and quantizing afterwards costs a full bf16 copy of the weights at peak
(8.3 GiB for Qwen3-4B shapes, where the trained model needs under 4), which no user pays.

:func:`write_random_model` never holds more than one module's weights: the model is built on the meta device, and
each module with parameters in turn is materialised on ``device``, initialised by the family's own
``_init_weights`` (so the distribution matches ``from_config``), copied to the host and written into safetensors
shards of at most ``shard_bytes``. Each module's weights come from a seed derived from ``seed`` and the module's
name, so the result depends neither on the device order of operations nor on the sharding. Tied weights are written
once, under the name ``from_pretrained`` expects.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

__all__ = ["write_random_model"]

_INDEX = "model.safetensors.index.json"


def _module_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _owned_parameters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that owns parameters, each parameter's first owner only (ties skipped)."""
    seen: set[int] = set()
    owners: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if own:
            seen.update(id(p) for p in own)
            owners.append((name, module))
    return owners


def write_random_model(
    config: PretrainedConfig,
    folder: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    shard_bytes: int = 2 * 2**30,
) -> Path:
    """Save a random ``config`` model (config.json + safetensors) into ``folder`` without holding it whole.

    Returns the folder, ready for ``AutoModelForCausalLM.from_pretrained`` (with or without quantization).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_size = 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_size = {}, 0

    for module_name, module in _owned_parameters(model):
        module.to_empty(device=device, recurse=False)
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            torch.manual_seed(_module_seed(seed, module_name))
            model._init_weights(module)
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            tensor = param.detach().to("cpu", copy=True).contiguous()
            if shard and shard_size + tensor.nbytes > shard_bytes:
                flush()
            shard[full_name] = tensor
            shard_size += tensor.nbytes
        module.to_empty(device="meta", recurse=False)  # free this module's weights before the next one is built
    flush()
    if len(files) == 1:
        (folder / files[0]).rename(folder / "model.safetensors")
    else:
        total = sum((folder / name).stat().st_size for name in files)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / _INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    return folder
