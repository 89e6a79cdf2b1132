"""The Alpaca header is tokenized once and reused only where that is exact: batch output == joint encoding.

The tokenizers are built here with the ``tokenizers`` library, each a small BPE trained on the test's own text and
set up like a real family: Qwen2 (NFC, a digit-by-digit split regex, byte level), Llama 3 (digits in threes, BOS
added by the post-processor), Mistral v3 (SentencePiece-style ``▁`` with a prepended space and byte fallback), plus
the bundled demo tokenizer. The byte-level ones must take the cached path; the SentencePiece one must not (its
prepended space makes ``ids(header + rest) != ids(header) + ids(rest)``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from padless.prep.render import ALPACA_HEADERS, render_row
from padless.prep.tokenize import Encoder, Task, _PrefixCache, encode_example
from padless.prep.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

FIRST = ["Give", "3 ways", "(a) pick", "é", "数字", '"quoted"', "#tag", "-dash", "'s", "Ünïcode", "\u0301x", "💡 idea"]
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
SPECIALS = ["<s>", "</s>", "<|endoftext|>"]


def rows() -> list[dict]:
    out = []
    for i, f in enumerate(FIRST * 3):
        out.append({"instruction": f + f" task {i}.", "input": "" if i % 2 else f"{f} input", "output": f"answer {i}"})
    return out


def _corpus() -> list[str]:
    texts = [text for row in rows() for text, _ in render_row(row, "alpaca", "completion").segments]
    return texts * 4  # enough repeats for merges across words of the header and the instructions


def _save(tok: Tokenizer, folder: Path, config: dict) -> Path:
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _byte_level(folder: Path, split: str, nfc: bool, bos: bool) -> Path:
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    config = {"eos_token": "<|endoftext|>"}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        config["bos_token"] = "<s>"
    return _save(tok, folder, config)


def _sentencepiece_like(folder: Path) -> Path:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", *SPECIALS])
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return _save(tok, folder, {"bos_token": "<s>", "eos_token": "</s>"})


BUILDERS = {
    "demo": (lambda folder: DEFAULT_TOKENIZER, True),
    "qwen2-like": (lambda folder: _byte_level(folder, QWEN2_SPLIT, nfc=True, bos=False), True),
    "llama3-like": (lambda folder: _byte_level(folder, LLAMA3_SPLIT, nfc=False, bos=True), True),
    "mistral-v3-like": (_sentencepiece_like, False),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_batch_with_header_cache_equals_joint_encoding(name: str, tmp_path: Path) -> None:
    build, cached = BUILDERS[name]
    tk = load_tokenizer(build(tmp_path / name))
    data = rows()
    with Encoder(tk) as enc:
        [got] = enc.put(Task("alpaca", "completion"), 0, data)
    off = 0
    for i, row in enumerate(data):
        ids, mask = encode_example(row, "alpaca", "completion", tk)
        n = int(got.lengths[i])
        assert got.tokens[off : off + n].tolist() == ids, f"row {i}: {row['instruction']!r}"
        assert got.mask[off : off + n].tolist() == mask
        off += n
    assert off == len(got.tokens)
    # The cache decision itself: reused for the byte-level tokenizers, refused for the SentencePiece-style one.
    cache = _PrefixCache(tk, ALPACA_HEADERS)
    prompts = [render_row(row, "alpaca", "completion").segments[0][0] for row in data]
    hits = [cache.split(p) is not None for p in prompts]
    assert any(hits) if cached else not any(hits), hits
    if cached:
        assert not all(hits), "a rest starting with a combining mark or a space must not take the cached path"
