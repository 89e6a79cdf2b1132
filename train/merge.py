"""``train merge``: fold a LoRA adapter into its base model and save a plain Hugging Face folder.

The merged folder loads with ``AutoModelForCausalLM.from_pretrained`` alone (no peft) and computes what base +
adapter computed; it holds the tokenizer files of the adapter folder (``train run`` puts them there), else those
of the base folder. It is written to a temp folder next to ``out`` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from padless.shards.cli_config import one_line

from .config import TrainError
from .output import copy_tokenizer_files, has_tokenizer
from .prepare import check_model_source
from .run_folder import refuse_under_file

__all__ = ["merge"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merge(
    adapter_dir: str | os.PathLike, *, base: str | None = None, out: str | os.PathLike, dtype: str | None = None
) -> Path:
    """Merge the peft adapter in ``adapter_dir`` into ``base`` (default: the adapter's own base); save to ``out``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir, out = Path(adapter_dir), Path(out)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise TrainError(
            f"{str(adapter_dir)!r} has no adapter_config.json: not a peft adapter folder (the --output of a LoRA "
            "`train run`). A --full run already wrote a complete model; there is nothing to merge"
        )
    what = "--model" if base else f"the adapter's base model (base_model_name_or_path in {str(config_path)!r})"
    base = base or json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise TrainError(f"{str(config_path)!r} names no base model; pass --model BASE")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {str(out)!r} is a file; expected a new or empty folder")
    refuse_under_file(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise TrainError(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    check_model_source(
        base,
        what=what,
        no_weights_fix="download the weights into it, or pass --model with the base model the adapter was trained on",
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=_DTYPES[dtype] if dtype else "auto")
    except OSError as error:  # transformers: a hub id it cannot fetch, or a folder it cannot read
        raise TrainError(f"cannot load the base model {base!r} ({error}); pass --model with a local folder") from error
    if getattr(model, "hf_quantizer", None) is not None:
        # A quantized base (a QLoRA run's random base is saved in NF4): its adapter was trained against the
        # dequantized weights, and transformers cannot save a quantized model after peft merged into it.
        model = model.dequantize()
        if dtype:
            model = model.to(_DTYPES[dtype])
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except RuntimeError as error:  # torch: the adapter's weights have other shapes than the base's layers
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        detail = mismatches[0] + (f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else "")
        raise TrainError(
            f"the adapter in {str(adapter_dir)!r} does not fit the base model {base!r} "
            f"({detail if mismatches else one_line(error)[:300]}); pass the --model it was trained on, or leave out "
            "--model to use the adapter's own base"
        ) from error
    tmp = out.with_name(out.name + ".tmp-merge")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        copy_tokenizer_files(adapter_dir if has_tokenizer(adapter_dir) else base, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written merged model behind
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
