"""Fixtures for the prep tests (row builders live in ``tests.prep.rows``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from padless.prep.tokenizer import DEFAULT_TOKENIZER


@pytest.fixture
def no_template_tokenizer(tmp_path) -> Path:
    folder = tmp_path / "tok_no_template"
    shutil.copytree(DEFAULT_TOKENIZER, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder
