"""A tokenizer's identity by content: one hash that is equal exactly when two tokenizer folders tokenize alike.

The hash covers what decides the token ids of a text and of a rendered conversation: the vocabulary, the merges
(or other model tables), the normalizer, the pre-tokenizer, the post-processor, the added and special tokens,
and the chat templates. It ignores what only changes decoding, offsets, padding or truncation, and the
bookkeeping that each transformers / tokenizers version writes differently, so a copy re-saved by another
version hashes the same:

- ``tokenizer.json``: ``version``, ``truncation``, ``padding`` and ``decoder`` are dropped; the vocabulary becomes
  ``[[id, token], ...]`` sorted by id; merges written as ``"a b"`` strings (tokenizers < 0.20) and as
  ``["a", "b"]`` pairs (later versions) become pairs; fields that later versions added with a default that keeps
  the old behaviour are dropped when they hold that default (``ignore_merges``, ``byte_fallback``, ``use_regex``,
  Metaspace's ``split``, ...), and ``trim_offsets`` (offsets only) always;
- ``tokenizer_config.json`` (and ``special_tokens_map.json`` for what it lacks): only the special tokens
  (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``, ``sep_token``, ``cls_token``, ``mask_token``, as
  strings) and the chat template are kept; ``model_max_length``, ``tokenizer_class``, ``padding_side``,
  ``added_tokens_decoder`` (tokenizer.json's ``added_tokens`` is the one the fast tokenizer uses) and every other
  field are left out;
- chat templates: ``chat_template`` in tokenizer_config.json (a string, or a list of named templates),
  ``chat_template.jinja`` (the default template, as transformers >= 4.50 saves it), ``chat_template.json`` and
  ``additional_chat_templates/NAME.jinja``, gathered as ``{name: template}``; a file wins over the config entry.

Pure JSON parsing: no ``tokenizers`` or ``transformers`` import, so ``prep`` (which writes the hash into a shard
set's manifest as ``tokenizer.content_hash``) and ``train`` (which compares it with the model folder's) share it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEME",
    "TokenizerIdentityError",
    "content_hash",
    "differing_parts",
    "hash_parts",
    "identity",
    "manifest_difference",
    "part_hashes",
]

SCHEME = "padless-tokenizer-identity/1"

# Special-token fields of tokenizer_config.json / special_tokens_map.json that the hash keeps.
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")

# Component fields that only affect offsets (never ids): dropped wherever they appear.
_OFFSETS_ONLY = ("trim_offsets",)

# Fields that later tokenizers versions added, with the value that keeps the earlier behaviour: dropped when they
# hold it, so files written before and after the field existed hash alike. Keyed by the component's "type".
_DEFAULTS: dict[str, dict[str, Any]] = {
    "BPE": {
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
    },
    "ByteLevel": {"use_regex": True},
    "Metaspace": {"split": True},
    "Unigram": {"byte_fallback": False},
    "WordPiece": {"max_input_chars_per_word": 100},
}
# BPE affixes: an empty string and null mean the same (no prefix / suffix).
_EMPTY_IS_NONE = ("continuing_subword_prefix", "end_of_word_suffix")


class TokenizerIdentityError(ValueError):
    """A tokenizer folder's files cannot be read as the JSON a Hugging Face fast tokenizer is saved as."""


def _read_json(path: Path, *, required: bool = False) -> Any:
    if not path.is_file():
        if required:
            raise TokenizerIdentityError(f"{str(path)!r} is missing; expected a Hugging Face fast tokenizer folder")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerIdentityError(f"cannot read {str(path)!r} ({error}); expected a JSON object") from error


def _object(path: Path, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TokenizerIdentityError(f"{str(path)!r} holds a {type(value).__name__}; expected a JSON object")
    return value


def _component(value: Any) -> Any:
    """A normalizer / pre-tokenizer / post-processor / model table with version-only differences removed."""
    if isinstance(value, list):
        return [_component(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _component(v) for k, v in value.items() if k not in _OFFSETS_ONLY}
    kind = out.get("type")
    if kind == "Metaspace":
        # tokenizers < 0.19 wrote add_prefix_space (and str_rep); later versions prepend_scheme (and split).
        add = out.pop("add_prefix_space", None)
        out.pop("str_rep", None)
        if "prepend_scheme" not in out and add is not None:
            out["prepend_scheme"] = "always" if add else "never"
    if kind == "BPE":
        for k in _EMPTY_IS_NONE:
            if out.get(k) == "":
                out[k] = None
    for k, default in _DEFAULTS.get(kind, {}).items():
        if k in out and out[k] == default:
            del out[k]
    return out


def _merges(path: Path, merges: Any) -> list[list[str]]:
    if not isinstance(merges, list):
        raise TokenizerIdentityError(f"{str(path)!r}: model.merges is a {type(merges).__name__}; expected a list")
    pairs = []
    for i, m in enumerate(merges):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, list):
            parts = m
        else:
            parts = None
        if parts is None or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise TokenizerIdentityError(f"{str(path)!r}: merge {i} is {m!r}; expected 'a b' or ['a', 'b']")
        pairs.append(list(parts))
    return pairs


def _vocab(path: Path, vocab: Any) -> Any:
    if isinstance(vocab, dict):  # BPE / WordPiece / WordLevel: token -> id, stored as [[id, token]] by id
        if not all(isinstance(i, int) for i in vocab.values()):
            raise TokenizerIdentityError(f"{str(path)!r}: model.vocab maps a token to a non-integer id")
        return sorted([i, t] for t, i in vocab.items())
    return vocab  # Unigram: an ordered list of [piece, score]


def _model(path: Path, model: Any) -> dict[str, Any]:
    model = _object(path, model)
    rest = {k: v for k, v in model.items() if k not in ("vocab", "merges")}
    out: dict[str, Any] = {"options": _component(rest), "vocab": _vocab(path, model.get("vocab"))}
    if "merges" in model:
        out["merges"] = _merges(path, model["merges"])
    return out


def _added_tokens(path: Path, tokens: Any) -> list[dict[str, Any]]:
    if tokens is None:
        return []
    if not isinstance(tokens, list) or not all(isinstance(t, dict) and "id" in t for t in tokens):
        raise TokenizerIdentityError(f"{str(path)!r}: added_tokens is not a list of tokens with ids")
    out = []
    for t in tokens:
        special = bool(t.get("special", False))
        out.append(
            {
                "id": t["id"],
                "content": t.get("content"),
                "special": special,
                "single_word": bool(t.get("single_word", False)),
                "lstrip": bool(t.get("lstrip", False)),
                "rstrip": bool(t.get("rstrip", False)),
                "normalized": bool(t.get("normalized", not special)),
            }
        )
    return sorted(out, key=lambda t: (t["id"], str(t["content"])))


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": ..., "__type": "AddedToken", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    templates: dict[str, str] = {}
    value = config.get("chat_template")
    if isinstance(value, str):
        templates["default"] = value
    elif isinstance(value, list):
        for t in value:
            if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str):
                templates[t["name"]] = t["template"]
    processor = _object(folder / "chat_template.json", _read_json(folder / "chat_template.json"))
    if isinstance(processor.get("chat_template"), str):
        templates["default"] = processor["chat_template"]
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return templates


def identity(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The canonical content of the tokenizer in ``folder`` by part (None when it has no ``tokenizer.json``).

    Parts: ``model`` (vocabulary, merges, model options), ``added_tokens``, ``normalizer``, ``pre_tokenizer``,
    ``post_processor``, ``special_tokens`` and ``chat_templates``. Raises :class:`TokenizerIdentityError` for a
    file that is not the JSON it should be.
    """
    folder = Path(folder)
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        return None
    tj = _object(tj_path, _read_json(tj_path, required=True))
    config_path = folder / "tokenizer_config.json"
    config = dict(_object(config_path, _read_json(config_path)))
    stm_path = folder / "special_tokens_map.json"
    for k, v in _object(stm_path, _read_json(stm_path)).items():
        config.setdefault(k, v)
    special = {k: _token_text(config.get(k)) for k in _SPECIAL}
    return {
        "model": _model(tj_path, tj.get("model")),
        "added_tokens": _added_tokens(tj_path, tj.get("added_tokens")),
        "normalizer": _component(tj.get("normalizer")),
        "pre_tokenizer": _component(tj.get("pre_tokenizer")),
        "post_processor": _component(tj.get("post_processor")),
        "special_tokens": {k: v for k, v in special.items() if v is not None},
        "chat_templates": _templates(folder, config),
    }


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def part_hashes(folder: str | os.PathLike) -> dict[str, str] | None:
    """sha256 of each part of :func:`identity` (None when ``folder`` has no ``tokenizer.json``)."""
    doc = identity(folder)
    return None if doc is None else {part: _digest(value) for part, value in sorted(doc.items())}


def hash_parts(parts: dict[str, str]) -> str:
    """The content hash made of :func:`part_hashes`: sha256 over the scheme name and the part hashes."""
    return _digest({"scheme": SCHEME, "parts": parts})


def content_hash(folder: str | os.PathLike) -> str | None:
    """The content hash of the tokenizer in ``folder`` (None when it has no ``tokenizer.json``)."""
    parts = part_hashes(folder)
    return None if parts is None else hash_parts(parts)


def differing_parts(a: dict[str, str] | None, b: dict[str, str] | None) -> list[str]:
    """The parts whose hashes differ between two :func:`part_hashes` results ([] when either is unknown)."""
    if not a or not b:
        return []
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def manifest_difference(a: Mapping[str, Any], b: Mapping[str, Any], names: tuple[str, str]) -> str | None:
    """How the tokenizers of two shard-set manifests differ, or None when they agree or neither block can tell.

    Compared by ``content_hash``, else the file ``hash``, else ``vocab_size``: the first that both record; a content
    difference names the parts that differ where both record ``content_parts`` (a chat template alone, say, which
    changes no token id of packed data). ``names`` say which set is which in the message (``"the training shards"``,
    ``"the eval set"``)."""
    x, y = (m.get("tokenizer") if isinstance(m.get("tokenizer"), dict) else {} for m in (a, b))
    for key, what in (("content_hash", "content"), ("hash", "files"), ("vocab_size", "vocab size")):
        if x.get(key) is not None and y.get(key) is not None:
            if x[key] == y[key]:
                return None
            shown = [v[:12] + "..." if isinstance(v, str) and len(v) > 16 else str(v) for v in (x[key], y[key])]
            parts = differing_parts(*(t.get("content_parts") if isinstance(t.get("content_parts"), dict) else None
                                      for t in (x, y)))  # fmt: skip
            which = f" ({', '.join(parts)})" if key == "content_hash" and parts else ""
            return f"the tokenizers differ in {what}{which}: {shown[0]} for {names[0]}, {shown[1]} for {names[1]}"
    return None
