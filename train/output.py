"""The final output of ``train run``: a peft adapter (LoRA/QLoRA) or a Hugging Face model (full), written into the
run folder next to its checkpoints; and the tokenizer files a model folder carries along.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["TOKENIZER_FILES", "copy_tokenizer_files", "gather_output_state", "save_base_model", "save_output"]

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


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors: gather the full value before saving.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
    record: Callable[[list[str]], None] | None = None,
) -> Path:
    """Write the trained result into ``output``: a peft adapter (LoRA/QLoRA) or a Hugging Face model (full).

    With no ``--model`` (the tiny random model) the trainer saved the frozen base under ``output/base_model``
    (:func:`save_base_model`) and the adapter's config points at it, so ``PeftModel.from_pretrained`` works from
    the folder alone. ``state_dict``: the gathered tensors of an FSDP2 run (:func:`gather_output_state`).
    ``record(names)`` is told the file names before they are moved into ``output`` (the run folder's marker
    lists them, so ``--overwrite`` knows them as padless's).
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
    items = sorted(tmp.iterdir())
    if record is not None:
        record([item.name for item in items])
    for item in items:  # move file by file: the output folder also holds checkpoints/ and metrics.jsonl
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
