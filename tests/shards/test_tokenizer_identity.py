"""Tokenizer identity by content: a re-saved copy hashes alike, whatever version wrote it; any change that alters
token ids (a merge, an added token, a special token, the chat template) changes the hash and is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from padless.shards.tokenizer_identity import (
    TokenizerIdentityError,
    content_hash,
    differing_parts,
    identity,
    part_hashes,
)

DEMO = Path(__file__).resolve().parents[2] / "prep" / "assets" / "demo_tokenizer"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def build_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE trained in code, saved by transformers (tokenizer.json, config, template file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, then sleeps"] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "a")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text(encoding="utf-8"))
    edit(value)
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")


def test_resave_by_transformers_keeps_the_hash(saved: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(saved)).save_pretrained(str(tmp_path / "b"))
    assert (saved / "tokenizer_config.json").read_bytes() != (tmp_path / "b" / "tokenizer_config.json").read_bytes()
    assert content_hash(tmp_path / "b") == content_hash(saved) is not None


def test_the_file_layouts_of_other_versions_keep_the_hash(saved: Path, tmp_path: Path) -> None:
    """Merges as "a b" strings, no ignore_merges / use_regex fields, offsets-only and padding/truncation fields,
    the template inside tokenizer_config.json instead of chat_template.jinja, bookkeeping keys: all alike."""
    old = _copy(saved, tmp_path / "old")

    def older_tokenizer_json(d):
        d["model"]["merges"] = [" ".join(m) for m in d["model"]["merges"]]
        d["model"].pop("ignore_merges", None)
        d["pre_tokenizer"].pop("use_regex", None)
        d["pre_tokenizer"]["trim_offsets"] = not d["pre_tokenizer"].get("trim_offsets", True)
        d["model"]["continuing_subword_prefix"] = ""
        d["truncation"] = {"max_length": 512, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
        d["decoder"] = None
        d["model"]["vocab"] = dict(reversed(list(d["model"]["vocab"].items())))  # key order is not content

    _edit_json(old / "tokenizer.json", older_tokenizer_json)
    template = (old / "chat_template.jinja").read_text(encoding="utf-8")
    (old / "chat_template.jinja").unlink()

    def older_config(d):
        d.update(chat_template=template, model_max_length=2048, tokenizer_class="GPT2TokenizerFast",
                 padding_side="left", clean_up_tokenization_spaces=False,
                 eos_token={"content": "<|im_end|>", "lstrip": False, "__type": "AddedToken"})  # fmt: skip
        d.pop("backend", None)

    _edit_json(old / "tokenizer_config.json", older_config)
    assert content_hash(old) == content_hash(saved)


@pytest.mark.parametrize(
    ("change", "part"),
    [
        ("merge", "model"),
        ("vocab", "model"),
        ("added_token", "added_tokens"),
        ("template", "chat_templates"),
        ("eos", "special_tokens"),
        ("normalizer", "normalizer"),
    ],
)
def test_a_change_that_alters_token_ids_changes_the_hash(saved: Path, tmp_path: Path, change: str, part: str) -> None:
    other = _copy(saved, tmp_path / "other")
    tj, cfg = other / "tokenizer.json", other / "tokenizer_config.json"
    if change == "merge":
        _edit_json(tj, lambda d: d["model"]["merges"].__setitem__(slice(0, 2), d["model"]["merges"][1::-1]))
    elif change == "vocab":

        def swap(d):
            v = d["model"]["vocab"]
            a, b = list(v)[10:12]
            v[a], v[b] = v[b], v[a]

        _edit_json(tj, swap)
    elif change == "added_token":
        _edit_json(tj, lambda d: d["added_tokens"].append({**d["added_tokens"][-1], "id": 999, "content": "<x>"}))
    elif change == "template":
        (other / "chat_template.jinja").write_text(TEMPLATE.replace("\n{{", "\n\n{{"), encoding="utf-8")
    elif change == "eos":
        _edit_json(cfg, lambda d: d.update(eos_token="<|endoftext|>"))
    elif change == "normalizer":
        _edit_json(tj, lambda d: d.update(normalizer={"type": "NFC"}))
    assert content_hash(other) != content_hash(saved)
    assert differing_parts(part_hashes(saved), part_hashes(other)) == [part]


def test_the_committed_demo_tokenizer_and_its_resave_agree(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(DEMO)).save_pretrained(str(tmp_path / "demo"))
    assert content_hash(tmp_path / "demo") == content_hash(DEMO)
    assert identity(DEMO)["chat_templates"]["default"].startswith("{% for message in messages %}")


def test_no_tokenizer_json_and_damaged_files(tmp_path: Path) -> None:
    assert content_hash(tmp_path) is None and part_hashes(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerIdentityError, match=r"cannot read .*tokenizer.json.*expected a JSON object"):
        content_hash(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}, "merges": [3]}}')
    with pytest.raises(TokenizerIdentityError, match=r"merge 0 is 3; expected 'a b' or \['a', 'b'\]"):
        content_hash(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerIdentityError, match=r"holds a list; expected a JSON object"):
        content_hash(tmp_path)


def test_prep_writes_the_same_content_hash() -> None:
    from padless.prep.tokenizer import load_tokenizer

    ident = load_tokenizer(DEMO).identity()
    assert ident["content_hash"] == content_hash(DEMO)
    assert ident["content_parts"] == part_hashes(DEMO)
