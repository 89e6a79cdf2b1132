"""The final output of ``train run``: a peft adapter (LoRA/QLoRA) or a Hugging Face model (full), written into the
run folder next to its checkpoints, with the tokenizer files (chat template included) beside it, so the folder
alone loads with ``AutoPeftModelForCausalLM`` / ``AutoModelForCausalLM`` and ``AutoTokenizer``.

The tokenizer comes from the ``--model`` folder, else from the folder the shards were tokenized with (the
manifest's ``tokenizer_source``, which is also what the tiny random model was sized to). An adapter's config names
its base by absolute path (a local ``--model`` folder, or the tiny random base saved in ``OUTPUT/base_model``),
so it loads from any working directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TOKENIZER_FILES",
    "copy_tokenizer_files",
    "gather_output_state",
    "has_tokenizer",
    "save_base_model",
    "save_output",
    "tokenizer_folder",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
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


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer's vocabulary file (fast, sentencepiece or BPE vocab)."""
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def tokenizer_folder(model: str | None, manifest: dict[str, Any]) -> tuple[Path | None, str | None]:
    """The local folder whose tokenizer files go into the output, and a note for the user when there is none:
    the ``--model`` folder when it holds a tokenizer, else the shards' ``tokenizer_source`` when it still exists."""
    candidates = [("--model", model), ("the shards' tokenizer_source", manifest.get("tokenizer_source"))]
    candidates = [(label, source) for label, source in candidates if isinstance(source, str)]
    for _, source in candidates:
        folder = Path(source).expanduser()
        if folder.is_dir() and has_tokenizer(folder):
            return folder, None
    looked = ", ".join(f"{label} {source!r}" for label, source in candidates)
    why = f"none of {looked} is a local folder holding one" if looked else "the shards' manifest names none"
    return None, (
        f"the output folder will hold no tokenizer ({why}); copy the tokenizer files into it before loading it with "
        "AutoTokenizer or `train chat`"
    )


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
    tokenizer_from: str | os.PathLike | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    record: Callable[[list[str]], None] | None = None,
) -> Path:
    """Write the trained result into ``output``: a peft adapter (LoRA/QLoRA) or a Hugging Face model (full).

    With no ``--model`` (the tiny random model) the trainer saved the frozen base under ``output/base_model``
    (:func:`save_base_model`) and the adapter's config points at it, so ``PeftModel.from_pretrained`` works from
    the folder alone. ``tokenizer_from``: the folder whose tokenizer files are copied beside the weights
    (:func:`tokenizer_folder`). ``state_dict``: the gathered tensors of an FSDP2 run (:func:`gather_output_state`).
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
        if model_source is not None and Path(model_source).expanduser().is_dir():
            base_ref = str(Path(model_source).expanduser().resolve())  # loadable from any working directory
        else:
            base_ref = model_source or (str(saved_base.resolve()) if saved_base.is_dir() else None)
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_ref
        model.save_pretrained(str(tmp), **extra)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True, **extra)
    copy_tokenizer_files(tokenizer_from, tmp)
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
