"""Setting up a run before the loop: device, dtype, the data checks, the model source check, the tokenizer check,
the model.

Kept apart from ``train.loop`` so the loop reads top to bottom. The model itself comes from the model path
(``train.modeling.load_model``, ``train.adapters.apply_adapters``, ``train.model_patch.patch_model``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from padless.shards import tokenizer_identity

from .config import TrainConfig, TrainError
from .data import PackSizes, pack_sizes
from .distributed import DistEnv
from .families import family_for_model_type

__all__ = [
    "build_model",
    "check_data",
    "check_eval_tokenizer",
    "check_model_source",
    "check_positions",
    "check_shards",
    "check_token_ids",
    "check_tokenizer",
    "model_overrides",
    "parse_device",
    "parse_model_overrides",
    "resolve_device",
    "resolve_dtype",
    "tiny_model_vocab",
    "tokenizer_file_hash",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def parse_device(text: str) -> torch.device:
    """``--device`` as a torch device (``train run``, ``train parity``, ``train chat``); a string torch does not know,
    or CUDA on a machine without it, is a TrainError rather than torch's traceback at the first tensor moved."""
    try:
        device = torch.device(text)
    except RuntimeError as error:  # torch: "Invalid device string"
        raise TrainError(f"--device {text!r} is not a device torch knows ({error}); use cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {text} asked for CUDA but no CUDA device is available; use --device cpu")
    return device


def resolve_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    """``--device``, else ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if cfg.device:
        return parse_device(cfg.device)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """``--dtype``, else bf16 on a GPU and fp32 on the CPU."""
    if cfg.dtype is not None:
        return _DTYPES[cfg.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_model_source(
    model: str | None,
    *,
    what: str = "--model",
    no_weights_fix: str = "download the weights into it or leave out --model to train the tiny random model",
) -> None:
    """Fail early and clearly on a local model path that is missing or holds no weights. ``what`` names where the
    path came from and ``no_weights_fix`` is the advice for a folder without weights (``train merge`` gives its
    own: it has no tiny model to fall back on)."""
    if model is None:
        return
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if not looks_local:
        return  # a hub id: transformers resolves it (and says so when offline)
    if not path.is_dir():
        raise TrainError(f"{what} {model!r}: no such folder; expected a Hugging Face model folder or a hub id")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():  # the output of a LoRA run: an adapter, not a model
            raise TrainError(
                f"{what} {model!r} holds a LoRA adapter, not a model (no config.json); merge it into its base with "
                f"`train merge {model} --out MERGED` and pass that folder"
            )
        raise TrainError(f"{what} {model!r} has no config.json; expected a Hugging Face model folder")
    if not any(next(path.glob(g), None) is not None for g in _WEIGHT_GLOBS):
        raise TrainError(f"{what} {model!r} holds no weights (no *.safetensors or *.bin files); {no_weights_fix}")


# The files (in this order) whose bytes, plus the chat template, make prep's tokenizer file hash (the manifest's
# ``tokenizer.hash``, compared only for shard sets written before ``tokenizer.content_hash`` existed). This mirrors
# prep/tokenizer.py::load_tokenizer (train may not import prep); tests/train/test_cli.py checks the two agree.
_HASHED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tokenizer_file_hash(folder: str | Path) -> str | None:
    """prep's file hash of the tokenizer in ``folder`` (None when it has no tokenizer.json)."""
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

    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
        path = str(folder / "tokenizer.json")
        raise TrainError(f"{path!r} is not a tokenizer `tokenizers` can read ({error})") from error
    return tok.get_vocab_size(with_added_tokens=True)


def _rows(model: torch.nn.Module) -> int:
    """How many token ids the model can take: its input embedding's rows (and its output layer's, if fewer)."""
    rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        rows = min(rows, head.weight.shape[0])
    return int(rows)


def check_token_ids(max_token_id: int, model: torch.nn.Module, where: str) -> None:
    """Every token id of the data must index the model's embedding: never overridable (an id past the embedding
    reads another tensor's memory on a GPU or fails deep inside the model)."""
    rows = _rows(model)
    if max_token_id >= rows:
        raise TrainError(
            f"{where} holds token id {max_token_id}, but the model's embedding has {rows} rows (ids 0..{rows - 1}): "
            "the shards were made with another tokenizer, and --force does not change that. Re-run `prep pack "
            "--tokenizer MODEL` with the model's tokenizer"
        )


def _position_limit(config: Any) -> int | None:
    """How many positions the text config says the model takes: ``max_position_embeddings``, or the length its rope
    scaling extends to (``factor`` x ``original_max_position_embeddings``, YaRN and the like) when that is larger."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None)
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 1:
        original = scaling.get("original_max_position_embeddings") or limit
        if isinstance(original, int):
            limit = max(limit, int(original * factor))
    return limit


def _position_table(model: torch.nn.Module, limit: int) -> str | None:
    """The name of a table with one row per position up to ``limit`` (OPT's has 2 rows more), looked up by position:
    an embedding (GPT-2's ``wpe``) or a precomputed buffer (GPT-J's and CodeGen's sinusoids), other than the token
    embedding and the output head; None where positions are computed (rotary)."""
    skip = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(model, get)() if hasattr(model, get) else None
        if layer is not None and getattr(layer, "weight", None) is not None:
            skip.add(id(layer.weight))
    for name, module in model.named_modules():
        table = isinstance(module, torch.nn.Embedding) and id(module.weight) not in skip
        if table and limit <= module.num_embeddings <= limit + 2:
            return name
    for name, buffer in model.named_buffers():
        if buffer.dim() >= 2 and limit <= buffer.shape[0] <= limit + 2:
            return name
    return None


def check_positions(longest: int, model: torch.nn.Module, where: str) -> list[str]:
    """The data's longest example (``longest`` tokens: positions 0 .. longest - 1) against the positions the model
    takes. A model that looks positions up in a table (one row per position: a learned embedding, precomputed
    sinusoids) cannot go past its end: an error before anything is written. Computed positions (rotary; every family
    padless patches computes its own) go on past it, untrained in pretraining: a warning, since extending a model's
    context is a reason to fine-tune. Returns the warnings."""
    limit = _position_limit(model.config.get_text_config())
    if limit is None or longest <= limit:
        return []
    text = f"{where} holds an example of {longest} tokens, more than the model's {limit} positions"
    table = (
        _position_table(model, limit)
        if family_for_model_type(getattr(model.config, "model_type", None) or "") is None
        else None
    )
    if table is not None:
        raise TrainError(
            f"{text}, and its position table {table!r} has no row past them; re-run `prep pack --max-len {limit}`"
        )
    return [
        f"{text} (max_position_embeddings): positions past {limit} were not seen in pretraining; re-pack with `prep "
        f"pack --max-len {limit}` unless you mean to extend the model's context"
    ]


def _identity_problems(tok: dict[str, Any], folder: Path) -> list[str]:
    """How the shards' tokenizer (manifest) differs from the one in the model folder, by content."""
    try:
        parts = tokenizer_identity.part_hashes(folder)
    except tokenizer_identity.TokenizerIdentityError as error:
        raise TrainError(f"--model {str(folder)!r}: {error}") from error
    if parts is None:
        return []
    if isinstance(tok.get("content_hash"), str):
        if tokenizer_identity.hash_parts(parts) == tok["content_hash"]:
            return []
        saved = tok.get("content_parts") if isinstance(tok.get("content_parts"), dict) else None
        which = tokenizer_identity.differing_parts(saved, parts)
        detail = f" (they differ in {', '.join(which)})" if which else ""
        return [f"the shards' tokenizer tokenizes differently from the model folder's{detail}"]
    model_hash = tokenizer_file_hash(folder)  # a shard set from before content hashes: compare the files
    if tok.get("hash") and model_hash != tok["hash"]:
        return [
            f"the shards' tokenizer file hash {str(tok['hash'])[:12]}... differs from the model folder's "
            f"{str(model_hash)[:12]}... (re-pack with this padless to compare by content)"
        ]
    return []


def check_tokenizer(
    manifest: dict[str, Any], model_source: str | None, model: torch.nn.Module, *, force: bool, max_token_id: int
) -> list[str]:
    """The shards' tokenizer must be the model's: the same content (``shards.tokenizer_identity``) and vocab size as
    the model folder's tokenizer, and every token id of the shards (``max_token_id``) inside the embedding.

    Returns warnings (identity mismatches overridden by ``force``); raises :class:`TrainError` otherwise. Token ids
    past the embedding are refused even with ``force``.
    """
    check_token_ids(max_token_id, model, "the shard set")
    tok = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    shard_vocab = tok.get("vocab_size")
    rows = _rows(model)
    problems = []
    if isinstance(shard_vocab, int) and shard_vocab > rows:
        problems.append(
            f"the shards' tokenizer has {shard_vocab} tokens but the model's embedding has {rows} rows "
            "(token ids could fall outside it)"
        )
    folder = Path(model_source) if model_source is not None else None
    if folder is not None and folder.is_dir():
        vocab = _model_tokenizer_vocab(folder)
        if vocab is not None and isinstance(shard_vocab, int) and vocab != shard_vocab:
            problems.append(f"the shards' tokenizer has {shard_vocab} tokens, the model folder's has {vocab}")
        problems += _identity_problems(tok, folder)
    if not problems:
        return []
    message = "; ".join(problems)
    if force:
        return [f"tokenizer mismatch overridden by --force: {message}"]
    raise TrainError(
        f"tokenizer mismatch: {message}. Re-run `prep pack --tokenizer {model_source or 'MODEL'}` to pack with the "
        "model's tokenizer, or pass --force if you know they agree"
    )


def check_data(cfg: TrainConfig, ss: Any, sizes: PackSizes, eval_ss: Any | None) -> tuple[int, PackSizes | None]:
    """The checks of the training (and eval) shard sets made before any model is loaded (:func:`check_shards`);
    returns the micro-batch token budget and the eval set's pack sizes (None without one), whose largest token id
    and longest example the loaded model must take, as the training set's (:func:`check_token_ids`,
    :func:`check_positions`).
    ``--tokens-per-micro-batch auto`` is checked as max_len, the smallest budget it chooses (``train.auto_batch``)."""
    given = isinstance(cfg.tokens_per_micro_batch, int) and cfg.tokens_per_micro_batch > 0
    budget = cfg.tokens_per_micro_batch if given else ss.max_len
    check_shards(ss.path, sizes, budget=budget, budget_given=given, max_len=ss.max_len)
    if eval_ss is None:
        return budget, None
    eval_sizes = pack_sizes(eval_ss)
    check_shards(eval_ss.path, eval_sizes, budget=budget, budget_given=given, max_len=ss.max_len, kind="eval set")
    return budget, eval_sizes


def check_eval_tokenizer(manifest: dict[str, Any], eval_ss: Any, *, force: bool) -> list[str]:
    """The eval set must be tokenized as the training shards (its eval_loss scores the same token ids); checked from
    the manifests, before any model is loaded. Returns warnings (a mismatch overridden by ``force``)."""
    difference = tokenizer_identity.manifest_difference(
        manifest, eval_ss.manifest, ("the training shards", "the eval set")
    )
    where = f"eval set {str(eval_ss.path)!r}"
    if difference is None:
        return []
    if force:
        return [f"{where} tokenizer mismatch overridden by --force: {difference}"]
    raise TrainError(
        f"{where} was not tokenized like the training shards ({difference}), so its eval_loss would not measure this "
        "model; pack it with the training shards' --tokenizer (prep pack --eval-fraction writes one), or pass --force "
        "if you know they agree"
    )


def check_shards(
    path: str | Path, sizes: PackSizes, *, budget: int, budget_given: bool, max_len: int, kind: str = "shard set"
) -> None:
    """The data checks made before any model is loaded: there is something to learn (trainable tokens), and the
    micro-batch token ``budget`` (``budget_given``: from --tokens-per-micro-batch, else the training set's
    max_len) holds the longest pack, since packs are never split."""
    trainable, tokens = int(sizes.num_trainable.sum()), int(sizes.num_tokens.sum())
    if trainable == 0:
        raise TrainError(
            f"{kind} {str(path)!r} has no trainable tokens (0 of {tokens} tokens in {len(sizes.num_tokens)} packs "
            "are targets: every loss_mask is False), so there is nothing to learn from it; re-run `prep pack` on "
            "data with responses, or with --train-on all"
        )
    longest = int(np.argmax(sizes.num_tokens))
    n = int(sizes.num_tokens[longest])
    if n <= budget:
        return
    if budget_given:
        raise TrainError(
            f"--tokens-per-micro-batch {budget} is smaller than the longest pack of {kind} {str(path)!r} (pack "
            f"{longest}: {n} tokens); packs are never split: pass --tokens-per-micro-batch {n} or more (0 = the "
            f"shards' max_len, {max_len})"
        )
    raise TrainError(
        f"pack {longest} of {kind} {str(path)!r} holds {n} tokens, more than the token budget {budget} (the training "
        f"shards' max_len); pass --tokens-per-micro-batch {n} or more, or check the set with `prep verify`"
    )


def model_overrides(cfg: TrainConfig) -> dict[str, Any] | None:
    """``--model-overrides`` parsed: inline JSON or a path to a JSON file (None when not given)."""
    return parse_model_overrides(cfg.model_overrides, cfg.model)


def model_overrides_file(text: str | None) -> str | None:
    """The file that ``--model-overrides`` names (None when it is inline JSON, which starts with ``{``, or absent)."""
    return None if text is None or text.lstrip().startswith("{") else text


def parse_model_overrides(text: str | None, model: str | None) -> dict[str, Any] | None:
    """``--model-overrides`` (inline JSON or a .json file) as a dict; None when not given. Overrides shape the
    random model, so they cannot go with ``--model``."""
    if text is None:
        return None
    if model is not None:
        raise TrainError("--model-overrides shapes the random model built without --model; drop one of the two")
    if model_overrides_file(text) is not None:
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


def tiny_model_vocab(manifest: dict[str, Any]) -> int:
    """The vocabulary of the tiny random model built without --model: the shards' tokenizer ``vocab_size``."""
    tok = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    vocab = tok.get("vocab_size")
    if vocab is None:
        raise TrainError("the shards' manifest does not record a tokenizer vocab_size; pass --model")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise TrainError(
            f"the shards' manifest records tokenizer vocab_size {vocab!r}; expected a positive int. The shard set is "
            "damaged: re-run `prep pack`, or pass --model"
        )
    return vocab


def build_model(cfg: TrainConfig, manifest: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """Load the base model (or the tiny one sized to the shards' vocab) on ``device`` in ``dtype``; a model without
    decoder layers (``num_hidden_layers`` 0) is refused: LoRA finds nothing to adapt and the packed path no layer."""
    from .modeling import load_model

    check_model_source(cfg.model)
    model = load_model(
        cfg.model,
        vocab_size=tiny_model_vocab(manifest) if cfg.model is None else None,
        family=cfg.family,
        dtype=dtype,
        device=str(device),
        quantize_4bit=cfg.mode == "qlora",
        seed=cfg.seed,
        config_overrides=model_overrides(cfg),
    )
    if getattr(model.config.get_text_config(), "num_hidden_layers", None) == 0:
        source = f"--model {cfg.model!r}" if cfg.model is not None else "the model of --model-overrides"
        raise TrainError(f"{source} has no decoder layers (num_hidden_layers 0); padless trains at least one")
    return model
