"""The Alpaca header is tokenized once and reused only where that is exact: batch output == joint encoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from padless.prep.tokenize import encode_example, tokenize_rows
from padless.prep.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "tokenizers"
FIRST = ["Give", "3 ways", "(a) pick", "é", "数字", '"quoted"', "#tag", "-dash", "'s", "Ünïcode", "\u0301x", "💡 idea"]


def rows():
    out = []
    for i, f in enumerate(FIRST * 3):
        out.append({"instruction": f + f" task {i}.", "input": "" if i % 2 else f"{f} input", "output": f"answer {i}"})
    return out


@pytest.mark.parametrize(
    "folder",
    [DEFAULT_TOKENIZER, SHARED / "qwen2", SHARED / "llama3", SHARED / "mistral-v3"],
    ids=["demo", "qwen2", "llama3", "mistral-v3"],
)
def test_batch_with_header_cache_equals_joint_encoding(folder):
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} not present")
    tk = load_tokenizer(folder)
    data = rows()
    got = tokenize_rows(data, "alpaca", "completion", tk)
    off = 0
    for i, row in enumerate(data):
        ids, mask = encode_example(row, "alpaca", "completion", tk)
        n = int(got.lengths[i])
        assert got.tokens[off : off + n].tolist() == ids, f"row {i}: {row['instruction']!r}"
        assert got.mask[off : off + n].tolist() == mask
        off += n
