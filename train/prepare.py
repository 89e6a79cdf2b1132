"""Setting up a run before the loop: device, dtype, the model source check, the tokenizer check, the model.

Kept apart from ``train.loop`` so the loop reads top to bottom. The model itself comes from the model path
(``train.modeling.load_model``, ``train.adapters.apply_adapters``, ``train.model_patch.patch_model``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, TrainError
from .distributed import DistEnv

__all__ = [
    "build_model",
    "check_model_source",
    "check_tokenizer",
    "model_overrides",
    "parse_device",
    "resolve_device",
    "resolve_dtype",
    "tokenizer_content_hash",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def parse_device(text: str) -> torch.device:
    """``--device`` as a torch device; a string torch does not know is a TrainError."""
    try:
        return torch.device(text)
    except RuntimeError as error:  # torch: "Invalid device string"
        raise TrainError(f"--device {text!r} is not a device torch knows ({error}); use cpu, cuda or cuda:N") from error


def resolve_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    """``--device``, else ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if cfg.device:
        device = parse_device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"--device {cfg.device} asked for CUDA but no CUDA device is available; use --device cpu")
        return device
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """``--dtype``, else bf16 on a GPU and fp32 on the CPU."""
    if cfg.dtype is not None:
        return _DTYPES[cfg.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_model_source(model: str | None) -> None:
    """Fail early and clearly on a local model path that is missing or holds no weights."""
    if model is None:
        return
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if not looks_local:
        return  # a hub id: transformers resolves it (and says so when offline)
    if not path.is_dir():
        raise TrainError(f"--model {model!r}: no such folder; expected a Hugging Face model folder or a hub id")
    if not (path / "config.json").is_file():
        raise TrainError(f"--model {model!r} has no config.json; expected a Hugging Face model folder")
    if not any(next(path.glob(g), None) is not None for g in _WEIGHT_GLOBS):
        raise TrainError(
            f"--model {model!r} holds no weights (no *.safetensors or *.bin files); download the weights into it "
            "or leave out --model to train the tiny random model"
        )


# The files (in this order) whose bytes, plus the chat template, make prep's tokenizer content hash. This mirrors
# prep/tokenizer.py::load_tokenizer (train may not import prep); tests/train/test_cli.py checks the two agree.
_HASHED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tokenizer_content_hash(folder: str | Path) -> str | None:
    """prep's content hash of the tokenizer in ``folder`` (None when it has no tokenizer.json)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return None
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: prep uses "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    h = hashlib.sha256()
    for name in _HASHED_FILES:
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    h.update(b"template\0" + (template or "").encode())
    return h.hexdigest()


def _model_tokenizer_vocab(folder: Path) -> int | None:
    """Vocabulary size with added tokens (as prep counts it) of the tokenizer.json in a model folder, or None."""
    if not (folder / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def check_tokenizer(
    manifest: dict[str, Any], model_source: str | None, model: torch.nn.Module, *, force: bool
) -> list[str]:
    """The shards' tokenizer must fit the model: ids inside the embedding, same vocab/hash as the model folder's.

    Returns warnings (mismatches overridden by ``force``); raises :class:`TrainError` otherwise.
    """
    tok = manifest.get("tokenizer") or {}
    shard_vocab = tok.get("vocab_size")
    rows = model.get_input_embeddings().weight.shape[0]
    problems = []
    if shard_vocab is not None and int(shard_vocab) > rows:
        problems.append(
            f"the shards' tokenizer has {shard_vocab} tokens but the model's embedding has {rows} rows "
            "(token ids would fall outside it)"
        )
    folder = Path(model_source) if model_source is not None else None
    if folder is not None and folder.is_dir():
        vocab = _model_tokenizer_vocab(folder)
        if vocab is not None and shard_vocab is not None and vocab != int(shard_vocab):
            problems.append(f"the shards' tokenizer has {shard_vocab} tokens, the model folder's has {vocab}")
        model_hash = tokenizer_content_hash(folder)
        if model_hash is not None and tok.get("hash") and model_hash != tok["hash"]:
            problems.append(
                f"the shards' tokenizer hash {str(tok['hash'])[:12]}... differs from the model folder's "
                f"{model_hash[:12]}..."
            )
    if not problems:
        return []
    message = "; ".join(problems)
    if force:
        return [f"tokenizer mismatch overridden by --force: {message}"]
    raise TrainError(
        f"tokenizer mismatch: {message}. Re-run `prep pack --tokenizer {model_source or 'MODEL'}` to pack with the "
        "model's tokenizer, or pass --force if you know they agree"
    )


def model_overrides(cfg: TrainConfig) -> dict[str, Any] | None:
    """``--model-overrides`` parsed: inline JSON or a path to a JSON file (None when not given)."""
    if cfg.model_overrides is None:
        return None
    if cfg.model is not None:
        raise TrainError("--model-overrides shapes the random model built without --model; drop one of the two")
    text = cfg.model_overrides
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise TrainError(f"--model-overrides {text!r} is neither a JSON object nor an existing .json file")
        text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise TrainError(f"--model-overrides is not valid JSON ({error}): {text[:80]!r}") from error
    if not isinstance(value, dict):
        raise TrainError(f"--model-overrides must be a JSON object of config fields, got {type(value).__name__}")
    return value


def build_model(cfg: TrainConfig, manifest: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """Load the base model (or the tiny one sized to the shards' vocab) on ``device`` in ``dtype``."""
    from .modeling import load_model

    check_model_source(cfg.model)
    vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
    if cfg.model is None and vocab is None:
        raise TrainError("the shards' manifest does not record a tokenizer vocab_size; pass --model to train")
    return load_model(
        cfg.model,
        vocab_size=int(vocab) if cfg.model is None else None,
        family=cfg.family,
        dtype=dtype,
        device=str(device),
        quantize_4bit=cfg.mode == "qlora",
        seed=cfg.seed,
        config_overrides=model_overrides(cfg),
    )
