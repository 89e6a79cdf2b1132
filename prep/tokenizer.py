"""Load a Hugging Face fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) without transformers/torch.

``tokenizers`` does the encoding; the chat template is rendered with jinja2 in a sandbox set up the way
transformers sets it up (trim_blocks, lstrip_blocks, loop controls, ``raise_exception``, ``tojson``), so the
text is the same as ``apply_chat_template`` gives. The identity (name, vocab size with added tokens, special
ids, a hash of the files and template, and the content hash of ``padless.shards.tokenizer_identity``, which
``train`` compares with the model folder's tokenizer) goes into the manifest and the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from padless.shards.tokenizer_identity import TokenizerIdentityError, hash_parts, part_hashes

from .chat import ChatTemplate
from .config import template_datetime
from .errors import PrepError
from .load import ASSETS

__all__ = ["DEFAULT_TOKENIZER", "SPECIAL_TOKEN_NAMES", "TokenizerInfo", "load_tokenizer"]

DEFAULT_TOKENIZER = ASSETS / "demo_tokenizer"
# The named special tokens a chat template sees as variables (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


@dataclass
class TokenizerInfo:
    """A loaded tokenizer plus what prep needs to know about it."""

    name: str
    folder: Path
    tok: Any  # tokenizers.Tokenizer
    config: dict[str, Any]
    chat_template: str | None
    file_hash: str
    content_parts: dict[str, str] | None = None  # shards.tokenizer_identity.part_hashes of the folder
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # --chat-template-kwargs
    template_date: str | None = None  # --template-date (None: the default date)
    template_names: tuple[str, ...] = ()  # names of the config's named chat templates, if it has a list of them
    _env: Any = field(default=None, repr=False)

    def token_id(self, key: str) -> int | None:
        s = _token_str(self.config.get(key))
        return None if s is None else self.tok.token_to_id(s)

    @cached_property
    def bos_id(self) -> int | None:
        return self.token_id("bos_token")

    @cached_property
    def eos_id(self) -> int | None:
        return self.token_id("eos_token")

    @cached_property
    def pad_id(self) -> int | None:
        return self.token_id("pad_token")

    @cached_property
    def adds_bos(self) -> bool:
        """Whether the tokenizer's post-processor puts BOS in front (Llama-style) when special tokens are on."""
        if self.bos_id is None:
            return False
        ids = self.tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "has_chat_template": self.chat_template is not None,
            "hash": self.file_hash,
            "content_hash": hash_parts(self.content_parts) if self.content_parts else None,
            "content_parts": self.content_parts,
        }

    @property
    def chat(self) -> ChatTemplate:
        """The compiled chat template (built on first use; raises PrepError when the tokenizer has none)."""
        if self.chat_template is None and self.template_names:
            raise PrepError(
                f"tokenizer {self.name!r} has named chat templates {list(self.template_names)} but none named "
                "'default', so chat data (messages/conversations) cannot be rendered; name the one to use 'default' "
                "in tokenizer_config.json, or save it as chat_template.jinja beside the tokenizer files"
            )
        if self.chat_template is None:
            raise PrepError(
                f"tokenizer {self.name!r} has no chat template, so chat data (messages/conversations) cannot be "
                "rendered; use a tokenizer whose tokenizer_config.json has a chat_template, or --format text"
            )
        if self._env is None:
            special = {k: _token_str(self.config.get(k)) for k in SPECIAL_TOKEN_NAMES}
            self._env = ChatTemplate(
                self.chat_template,
                self.name,
                special_tokens={k: str(v) for k, v in special.items() if v is not None},
                template_kwargs=self.template_kwargs,
                date=template_datetime(self.template_date) if self.template_date is not None else None,
            )
        return self._env

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: list | None = None,
        documents: list | None = None,
    ) -> str:
        """The chat template applied to ``messages`` (as text), with ``tools`` and ``documents`` as its arguments."""
        return self.chat.render(messages, add_generation_prompt, tools, documents)

    def __getstate__(self) -> dict[str, Any]:  # worker processes rebuild the jinja template themselves
        d = dict(self.__dict__)
        d["_env"] = None
        return d


def _fetch_hub(name: str) -> Path:
    from .load import _online

    if not _online():
        raise PrepError(
            f"tokenizer {name!r} is not a local folder and the Hugging Face Hub cannot be reached (offline); "
            "give a local folder with tokenizer.json (default: the demo tokenizer)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=list(_FILES)))
    except (OSError, ValueError) as e:  # huggingface_hub: HTTP / not found errors are OSErrors, a bad id ValueError
        raise PrepError(f"cannot fetch tokenizer {name!r} from the Hugging Face Hub: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    """A tokenizer folder's JSON file as a dict ({} when absent)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepError(f"cannot read {str(path)!r} ({e}); expected a JSON object") from e
    if not isinstance(value, dict):
        raise PrepError(f"{str(path)!r} holds a {type(value).__name__}; expected a JSON object")
    return value


def _chat_template(folder: Path, config: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """The folder's chat template as transformers picks it, and the names of its named templates.

    ``chat_template.jinja`` wins; else the config's ``chat_template``: text, or a list of ``{name, template}``
    objects of which the one named ``default`` is used. A list of another shape or a template file that is not
    UTF-8 is a :class:`PrepError` naming the file."""
    template = config.get("chat_template")
    names: tuple[str, ...] = ()
    if isinstance(template, list):  # named templates: use "default"
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t for t in template):
            raise PrepError(
                f"{str(folder / 'tokenizer_config.json')!r}: chat_template is a list, but not of {{name, template}} "
                "objects; expected Jinja text or a list of named templates"
            )
        names = tuple(t["name"] for t in template)
        template = {t["name"]: t["template"] for t in template}.get("default")
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = jinja.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PrepError(f"cannot read {str(jinja)!r} ({e}); expected a UTF-8 Jinja chat template") from e
    return template, names


def load_tokenizer(
    spec: str | Path | None = None,
    *,
    template_kwargs: dict[str, Any] | None = None,
    template_date: str | None = None,
) -> TokenizerInfo:
    """Load from a local folder (or a ``tokenizer.json`` file's folder), or a hub id when online.

    ``template_kwargs`` / ``template_date``: extra chat template variables and the date ``strftime_now`` gives."""
    from tokenizers import Tokenizer

    spec = str(spec) if spec is not None else str(DEFAULT_TOKENIZER)
    folder = Path(spec).expanduser()
    if folder.is_file():
        folder = folder.parent
    if not folder.exists():
        folder = _fetch_hub(spec)
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise PrepError(
            f"tokenizer folder {str(folder)!r} has no tokenizer.json; expected a Hugging Face fast tokenizer "
            "(save one with AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        )
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise PrepError(f"{str(tj)!r} is not a tokenizer.json that `tokenizers` can read ({e})") from e
    config = _read_json(folder / "tokenizer_config.json")
    for k, v in _read_json(folder / "special_tokens_map.json").items():
        config.setdefault(k, v)
    template, names = _chat_template(folder, config)
    h = hashlib.sha256()
    for name in _FILES:
        p = folder / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    h.update(b"template\0" + (template or "").encode())
    try:
        parts = part_hashes(folder)
    except TokenizerIdentityError as e:
        raise PrepError(str(e)) from e
    return TokenizerInfo(
        name=config.get("name_or_path") or folder.name,
        folder=folder,
        tok=tok,
        config=config,
        chat_template=template,
        file_hash=h.hexdigest(),
        content_parts=parts,
        template_kwargs=dict(template_kwargs or {}),
        template_date=template_date,
        template_names=names,
    )
