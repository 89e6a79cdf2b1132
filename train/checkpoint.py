"""Checkpoints (for an exact ``--resume``) and the final output (peft adapter or Hugging Face model).

A checkpoint is a folder ``OUTPUT/checkpoints/step-00000010/`` holding the trainable parameters
(``trainable.safetensors``: the LoRA weights, or every weight under ``--full``), ``optimizer.pt``,
``scheduler.pt``, ``rng-rank{r}.pt`` (Python, numpy, torch CPU and CUDA generators of each rank) and
``state.json`` (step, data position = epoch and micro-batch index, the config). It is written into a temp folder
and renamed into place with ``os.replace``, then ``checkpoints/latest`` (a one-line file, also replaced
atomically) names it: a crash mid-write leaves the previous checkpoint intact and current. A checkpoint that is
incomplete, unreadable or written by another kind of run raises :class:`TrainError` naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainConfig, TrainError

__all__ = [
    "TOKENIZER_FILES",
    "Position",
    "copy_tokenizer_files",
    "gather_output_state",
    "latest_checkpoint",
    "load_checkpoint",
    "save_base_model",
    "save_checkpoint",
    "save_output",
    "trainable_state",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class Position:
    """Where training stands: ``step`` optimizer steps done; the next micro-batch is ``micro_batch`` of ``epoch``."""

    step: int
    epoch: int
    micro_batch: int


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors: gather the full value before saving.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _is_sharded(model: torch.nn.Module) -> bool:
    """True when FSDP2 has turned the parameters into DTensor shards."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with full (unsharded) tensors keyed by parameter name: a collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name, detached, contiguous, on the CPU."""
    return {
        name: _full(p.detach()).to("cpu", copy=True).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(
    output: str | os.PathLike,
    position: Position,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    *,
    rank: int = 0,
    barrier: Any = None,
) -> Path:
    """Write checkpoint ``step-{position.step}`` atomically; every rank calls it (rank 0 writes the shared parts)."""
    from safetensors.torch import save_file

    root = Path(output) / "checkpoints"
    final = root / f"step-{position.step:08d}"
    tmp = root / f".tmp-step-{position.step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if barrier:
        barrier()
    state = trainable_state(model)  # collective under FSDP: every rank takes part
    sharded = _is_sharded(model)
    # FSDP2's optimizer state is sharded like the parameters: gather it by parameter name (also a collective).
    optim_state = _full_optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        save_file(state, str(tmp / "trainable.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        meta = {
            **dataclasses.asdict(position),
            "optimizer_format": _OPTIM_FSDP if sharded else _OPTIM_PLAIN,
            "config": dataclasses.asdict(cfg),
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if barrier:
        barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint appears whole or not at all
        _atomic_write_text(root / "latest", final.name + "\n")
    if barrier:
        barrier()
    return final


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names, or None when the run has none."""
    pointer = Path(output) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


_OPTIM_PLAIN, _OPTIM_FSDP = "torch", "full-by-name"


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)  # our own files: RNG states need pickle


def _read(path: Path, load: Callable[[Path], Any]) -> Any:
    """``load(path)``; a file that cannot be read back (truncated, corrupted) is a TrainError naming it."""
    from safetensors import SafetensorError

    try:
        return load(path)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError, SafetensorError) as error:
        raise TrainError(
            f"checkpoint file {str(path)!r} cannot be read ({error}); it is damaged. Remove its checkpoint folder "
            "and point checkpoints/latest at an earlier one, or start without --resume"
        ) from error


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, rank: int = 0
) -> Position:
    """Restore parameters, optimizer, scheduler and RNG from ``path``; return the data position to continue at."""
    from safetensors.torch import load_file

    path = Path(path)
    needed = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise TrainError(
            f"checkpoint {str(path)!r} lacks {missing}; it is incomplete. Remove it and resume from another"
        )
    saved = _read(path / "trainable.safetensors", lambda p: load_file(str(p)))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    shapes = {name: tuple(p.shape) for name, p in params.items()}  # a DTensor's shape is the full shape
    if set(saved) != set(params) or any(tuple(t.shape) != shapes[name] for name, t in saved.items()):
        diff = (
            sorted(set(saved) ^ set(params))[:5]
            or [
                f"{name} {tuple(t.shape)} vs {shapes[name]}"
                for name, t in saved.items()
                if tuple(t.shape) != shapes[name]
            ][:3]
        )
        raise TrainError(
            f"checkpoint {str(path)!r} does not fit this model (parameters differ, e.g. {diff}); resume with the "
            "same --model, mode, --lora-r and --target-modules as the run that wrote it"
        )
    meta = _read(path / "state.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
    if not isinstance(meta, dict) or not {"step", "epoch", "micro_batch"} <= set(meta):
        raise TrainError(
            f"checkpoint {str(path)!r}: state.json lacks step/epoch/micro_batch; it is damaged or not a padless one"
        )
    sharded = _is_sharded(model)
    fmt = meta.get("optimizer_format", _OPTIM_PLAIN)
    if (fmt == _OPTIM_FSDP) != sharded:
        raise TrainError(
            f"checkpoint {str(path)!r} was written {'with' if fmt == _OPTIM_FSDP else 'without'} --fsdp; resume "
            f"it the same way (this run is {'with' if sharded else 'without'} --fsdp)"
        )
    optim_state = _read(path / "optimizer.pt", _torch_load)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, saved, options=full)  # every rank keeps its own shard of the full tensors
        set_optimizer_state_dict(model, optimizer, optim_state, options=full)
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name].to(p.device, p.dtype))
        try:
            optimizer.load_state_dict(optim_state)
        except ValueError as error:  # torch: the saved parameter groups do not match this optimizer's
            raise TrainError(
                f"checkpoint {str(path)!r} holds optimizer state of another set-up ({error}); resume with the same "
                "--optimizer and --weight-decay as the run that wrote it"
            ) from error
    scheduler.load_state_dict(_read(path / "scheduler.pt", _torch_load))
    rng = path / f"rng-rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(_read(rng, _torch_load))
    return Position(step=int(meta["step"]), epoch=int(meta["epoch"]), micro_batch=int(meta["micro_batch"]))


def copy_tokenizer_files(source: str | os.PathLike | None, dest: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files a model folder has (if ``source`` is a local folder) next to the output."""
    if source is None or not Path(source).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(dest) / name)
            copied.append(name)
    return copied


def gather_output_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """What :func:`save_output` writes, as full CPU tensors, when FSDP2 has sharded the parameters; else None.

    Under FSDP2 the parameters are DTensor shards that ``save_pretrained`` cannot serialise; gathering them is a
    collective, so EVERY rank must call this (rank 0 then saves). A peft model gathers only its trainable
    (adapter) parameters; a full fine-tune gathers every parameter and buffer.
    """
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return None
    is_peft = hasattr(model, "peft_config")
    items = list(model.named_parameters()) + ([] if is_peft else list(model.named_buffers()))
    return {
        name: _full(t.detach()).to("cpu", copy=True).contiguous() for name, t in items if t.requires_grad or not is_peft
    }


def save_output(
    model: torch.nn.Module,
    output: str | os.PathLike,
    *,
    model_source: str | None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the trained result into ``output``: a peft adapter (LoRA/QLoRA) or a Hugging Face model (full).

    With no ``--model`` (the tiny random model) the trainer saved the frozen base under ``output/base_model``
    (:func:`save_base_model`) and the adapter's config points at it, so ``PeftModel.from_pretrained`` works from
    the folder alone. ``state_dict``: the gathered tensors of an FSDP2 run (:func:`gather_output_state`).
    """
    extra = {} if state_dict is None else {"state_dict": state_dict}
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / ".tmp-output"
    shutil.rmtree(tmp, ignore_errors=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft:
        saved_base = output / "base_model"
        base_ref = model_source or (str(saved_base.resolve()) if saved_base.is_dir() else None)
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_ref
        model.save_pretrained(str(tmp), **extra)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True, **extra)
        copy_tokenizer_files(model_source, tmp)
    for item in tmp.iterdir():  # move file by file: the output folder also holds checkpoints/ and metrics.jsonl
        os.replace(item, output / item.name)
    tmp.rmdir()
    return output


def save_base_model(model: torch.nn.Module, base_dir: str | os.PathLike) -> Path:
    """Save a (not yet adapted) Hugging Face model as a folder, atomically; used for the tiny random base."""
    base_dir = Path(base_dir)
    tmp = base_dir.with_name(base_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(base_dir, ignore_errors=True)
    os.replace(tmp, base_dir)
    return base_dir
