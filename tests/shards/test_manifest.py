"""manifest.json is checked field by field on open: one ShardFormatError naming the JSON path, the value and what
was expected, whatever the file holds; the writer refuses the metadata the reader would refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from padless.shards import manifest as manifest_module
from padless.shards.errors import ShardFormatError
from padless.shards.manifest import Manifest, parse_manifest
from padless.shards.reader import open_shards
from padless.shards.writer import ShardWriter

from .packs import random_packs

TOKENIZER = {"name": "t", "vocab_size": 5000, "bos_id": 1, "eos_id": 2, "pad_id": None, "hash": "ab" * 32}
META = {
    "tokenizer": TOKENIZER,
    "tokenizer_source": "/somewhere",
    "options": {"max_len": 64},
    "source": {"inputs": ["a.jsonl"], "fingerprint": "0" * 64},
    "fingerprint": "1" * 64,
    "prep": {"split": 0, "rows": 40, "truncated": 0, "dropped": 0, "empty": 0, "fill": 0.8},
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    tokens, mask, lengths, per, index = random_packs(np.random.default_rng(11), 120, 64)
    path = tmp_path_factory.mktemp("m") / "s"
    with ShardWriter(path, max_len=64, metadata=META, tokens_per_batch=300, tokens_per_shard=1000) as w:
        w.add_packs(tokens % 5000, mask, lengths, per, index)
    return path


@pytest.fixture
def edit(good, tmp_path):
    """A copy of the good set; ``edit(fn)`` applies ``fn`` to its manifest (or writes ``text`` / ``raw``)."""

    def apply(fn=None, *, text: str | None = None, raw: bytes | None = None) -> Path:
        path = tmp_path / "s"
        if not path.exists():
            path.mkdir()
            for f in good.iterdir():
                (path / f.name).write_bytes(f.read_bytes())
        man = json.loads((good / "manifest.json").read_text())
        if fn is not None:
            man = fn(man) or man
        data = raw if raw is not None else (text if text is not None else json.dumps(man)).encode()
        (path / "manifest.json").write_bytes(data)
        return path

    return apply


def _set(path: str, value):
    def fn(man):
        *parents, last = path
        target = man
        for k in parents:
            target = target[k]
        target[last] = value

    return fn


def _delete(path: str):
    def fn(man):
        *parents, last = path
        target = man
        for k in parents:
            target = target[k]
        del target[last]

    return fn


BAD_FIELDS = [
    (("max_len",), "64", r"max_len is '64' \(a string\); expected an integer in \[1, 2147483647\]"),
    (("max_len",), -1, r"max_len is -1 \(an integer\); expected an integer in \[1,"),
    (("max_len",), True, r"max_len is true \(a boolean\); expected an integer"),
    (("max_len",), 1.5, r"max_len is 1.5 \(a number\)"),
    (("max_len",), 2**31, r"max_len is 2147483648"),
    (("max_len",), None, r"max_len is null; expected an integer"),
    (("shards",), {}, r"shards is \{\} \(an object\); expected a non-empty array"),
    (("shards",), [], r"shards is \[\] \(an array\); expected a non-empty array"),
    (("shards", 0), 7, r"shards\[0\] is 7 \(an integer\); expected an object"),
    (("shards", 1, "file"), "../../elsewhere/shard.arrow", r"shards\[1\]\.file is '\.\./\.\./elsewhere/shard\.arrow'"),
    (("shards", 0, "file"), "/abs/shard-00000.arrow", r"shards\[0\]\.file is '/abs/shard-00000\.arrow' \(a string\); "
     r"expected 'shard-00000\.arrow'"),
    (("shards", 0, "file"), "shard-00001.arrow", r"shards\[0\]\.file is 'shard-00001\.arrow'"),
    (("shards", 0, "file"), ["x"], r"shards\[0\]\.file is \['x'\] \(an array\)"),
    (("shards", 0, "batches"), [], r"shards\[0\]\.batches is \[\] \(an array\); expected a non-empty array"),
    (("shards", 0, "batches", 1), 0, r"shards\[0\]\.batches\[1\] is 0 .*expected an integer in \[1, 2147483647\]"),
    (("shards", 0, "batches", 1), -4, r"shards\[0\]\.batches\[1\] is -4"),
    (("shards", 0, "batches", 1), True, r"shards\[0\]\.batches\[1\] is true \(a boolean\)"),
    (("shards", 0, "batches", 0), 10**30, r"shards\[0\]\.batches\[0\] is 1000000000000000000000000000000"),
    (("shards", 0, "batches"), "4", r"shards\[0\]\.batches is '4' \(a string\)"),
    (("shards", 0, "packs"), 1, r"shards\[0\]\.packs is 1 .*expected \d+, the sum of shards\[0\]\.batches"),
    (("shards", 0, "examples"), 10**6, r"shards\[0\]\.examples is 1000000 .*expected between packs="),
    (("shards", 0, "tokens"), 10**9, r"shards\[0\]\.tokens is 1000000000 .*expected at most packs x max_len = \d+"),
    (("shards", 0, "trainable"), 10**6, r"shards\[0\]\.trainable is 1000000 .*expected at most tokens - examples"),
    (("shards", 0, "bytes"), -5, r"shards\[0\]\.bytes is -5 .*expected an integer in \[0,"),
    (("shards", 0, "bytes"), 0, r"shards\[0\]\.bytes is 0 .*expected an integer >= 1"),
    (("shards", 0, "sha256"), "xyz", r"shards\[0\]\.sha256 is 'xyz' \(a string\); expected 64 lowercase hex digits"),
    (("shards", 0, "sha256"), "AB" * 32, r"shards\[0\]\.sha256 is 'ABAB"),
    (("totals",), [], r"totals is \[\] \(an array\); expected an object"),
    (("totals", "packs"), 1, r"totals\.packs is 1 .*expected \d+, the sum over the shards"),
    (("totals", "bytes"), "1", r"totals\.bytes is '1' \(a string\)"),
    (("tokenizer",), None, r"tokenizer is null; expected an object"),
    (("tokenizer",), "gpt2", r"tokenizer is 'gpt2' \(a string\); expected an object"),
    (("tokenizer", "vocab_size"), -1, r"tokenizer\.vocab_size is -1 \(an integer\); expected an integer in \[1, "),
    (("tokenizer", "vocab_size"), 0, r"tokenizer\.vocab_size is 0"),
    (("tokenizer", "vocab_size"), 2**33, r"tokenizer\.vocab_size is 8589934592"),
    (("tokenizer", "vocab_size"), "5000", r"tokenizer\.vocab_size is '5000' \(a string\)"),
    (("tokenizer", "vocab_size"), 5000.0, r"tokenizer\.vocab_size is 5000\.0 \(a number\)"),
    (("tokenizer", "bos_id"), 5000, r"tokenizer\.bos_id is 5000 .*expected an integer in \[0, 4999\] or null"),
    (("tokenizer", "eos_id"), -1, r"tokenizer\.eos_id is -1"),
    (("tokenizer", "pad_id"), "0", r"tokenizer\.pad_id is '0' \(a string\)"),
    (("tokenizer", "pad_id"), False, r"tokenizer\.pad_id is false \(a boolean\)"),
    (("tokenizer", "name"), 5, r"tokenizer\.name is 5 \(an integer\); expected a string or null"),
    (("tokenizer", "hash"), ["a"], r"tokenizer\.hash is \['a'\] \(an array\)"),
    (("tokenizer", "content_hash"), 1, r"tokenizer\.content_hash is 1 \(an integer\); expected a string or null"),
    (("tokenizer", "has_chat_template"), "yes", r"tokenizer\.has_chat_template is 'yes' .*expected true or false"),
    (("tokenizer_source",), 7, r"tokenizer_source is 7 \(an integer\); expected a string or null"),
    (("fingerprint",), {}, r"fingerprint is \{\} \(an object\); expected a string or null"),
    (("prep",), [], r"prep is \[\] \(an array\); expected an object"),
    (("prep", "rows"), -1, r"prep\.rows is -1 .*expected an integer in \[0, "),
    (("prep", "truncated"), "0", r"prep\.truncated is '0' \(a string\)"),
    (("options",), 5, r"options is 5 \(an integer\); expected an object"),
    (("source",), "x", r"source is 'x' \(a string\); expected an object"),
    (("options", "deep"), json.loads("[" * 70 + "]" * 70), r"options\.deep.* expected JSON nested at most 64 levels"),
    (("options", "text"), "\ud800", r"options\.text is '\\ud800' \(a string\); expected a string of Unicode"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "value", "match"), BAD_FIELDS, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD_FIELDS])
def test_a_bad_field_is_one_error_naming_its_path(edit, path, value, match):
    with pytest.raises(ShardFormatError, match=match) as info:
        open_shards(edit(_set(path, value)))
    assert "manifest.json'" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "match"),
    [
        (("shards", 0, "sha256"), r"shards\[0\]\.sha256 is missing"),
        (("shards", 1, "batches"), r"shards\[1\]\.batches is missing"),
        (("totals", "trainable"), r"totals\.trainable is missing"),
        (("tokenizer", "vocab_size"), r"tokenizer\.vocab_size is missing"),
        (("max_len",), r"lacks the keys \['max_len'\]"),
    ],
)
def test_a_missing_field_is_named(edit, key, match):
    with pytest.raises(ShardFormatError, match=match):
        open_shards(edit(_delete(key)))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[]", r"holds \[\] \(an array\), expected a JSON object"),
        ('"padless-shards"', r"holds 'padless-shards' \(a string\), expected a JSON object"),
        ("null", r"holds null, expected a JSON object"),
        ("{", r"is not valid JSON"),
        ("", r"is not valid JSON"),
        ('{"max_len": NaN}', r"is not valid JSON \(NaN is not a JSON number\)"),
        ('{"max_len": -Infinity}', r"is not valid JSON \(-Infinity is not a JSON number\)"),
        ('{"max_len": 1e400}', r"is not valid JSON \(1e400 overflows a finite number\)"),
        ('{"max_len": ' + "9" * 5000 + "}", r"is not valid JSON \(Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, r"is not valid JSON \(maximum recursion depth"),
    ],
)
def test_a_manifest_that_is_not_a_json_object_is_refused(edit, text, match):
    with pytest.raises(ShardFormatError, match=match):
        open_shards(edit(text=text))


def test_non_utf8_bytes_and_oversized_manifests_are_refused(edit, good, monkeypatch):
    raw = (good / "manifest.json").read_bytes()
    with pytest.raises(ShardFormatError, match=r"is not UTF-8 text \(byte 7: b'\\xff'\)"):
        open_shards(edit(raw=raw[:7] + b"\xff" + raw[8:]))
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(ShardFormatError, match=r"is over 1000 bytes"):
        open_shards(edit())


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (_set(("format_version",), True), r"unsupported shard format version true \(a boolean\)"),
        (_set(("format_version",), 1.0), r"unsupported shard format version 1\.0 \(a number\)"),
        (_set(("format_version",), "1"), r"unsupported shard format version '1' \(a string\)"),
        (_set(("format",), ["padless-shards"]), r"has format \['padless-shards'\], expected 'padless-shards'"),
        (_set(("schema",), None), r"declares the schema null, expected"),
    ],
)
def test_format_version_and_schema_compare_by_type_too(edit, fn, match):
    with pytest.raises(ShardFormatError, match=match):
        open_shards(edit(fn))


def test_extra_keys_optional_fields_and_content_hash_are_accepted(edit):
    def fn(man):
        man["tokenizer"].update(content_hash="cd" * 32, bos_id=None)
        del man["tokenizer"]["eos_id"], man["tokenizer"]["name"]
        man["shards"][0]["note"] = {"anything": [1, 2.5, None]}
        man["my_key"] = [True]
        del man["prep"], man["tokenizer_source"]

    ss = open_shards(edit(fn))
    assert isinstance(ss.info, Manifest) and ss.info.tokenizer.content_hash == "cd" * 32
    assert ss.info.tokenizer.bos_id is None and ss.info.tokenizer.name is None and ss.info.tokenizer_source is None
    assert ss.manifest["my_key"] == [True] and ss.vocab_size == 5000
    assert [s.file for s in ss.info.shards] == [f"shard-{i:05d}.arrow" for i in range(len(ss.info.shards))]
    assert ss.info.totals.packs == len(ss) == sum(sum(s.batches) for s in ss.info.shards)
    list(ss)


def test_parse_manifest_checks_a_decoded_object_and_names_its_source():
    with pytest.raises(ShardFormatError, match=r"^upload: holds 3 \(an integer\), expected a JSON object"):
        parse_manifest(3, where="upload:")


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"tokenizer": {"vocab_size": 0}}, r"metadata: tokenizer\.vocab_size is 0"),
        ({"tokenizer": {"vocab_size": 10, "eos_id": 10}}, r"metadata: tokenizer\.eos_id is 10"),
        ({"prep": {"rows": -2}}, r"metadata: prep\.rows is -2"),
        ({"fill": float("nan")}, r"metadata must be strict JSON .*Out of range float values"),
        ({"name": "\ud800"}, r"metadata must be strict JSON .*surrogates not allowed"),
        ({"path": Path("x")}, r"metadata must be strict JSON .*not JSON serializable"),
    ],
)
def test_writer_refuses_metadata_the_reader_would_refuse(tmp_path, metadata, match):
    with pytest.raises(ValueError, match=match):
        ShardWriter(tmp_path / "s", max_len=16, metadata=metadata)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_token_ids_outside_the_vocabulary(tmp_path):
    tokens, mask, lengths, per, index = random_packs(np.random.default_rng(12), 20, 32)
    tokens = tokens % 100
    tokens[7] = 100
    w = ShardWriter(tmp_path / "s", max_len=32, metadata={"tokenizer": {"vocab_size": 100}})
    with pytest.raises(ValueError, match=r"token id 100 \(token 7\) is outside the vocabulary"), w:
        w.add_packs(tokens, mask, lengths, per, index)
    assert list(tmp_path.iterdir()) == []
