"""The run's progress output: --no-progress also silences Hugging Face's own bars."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from padless.train.cli import main

from .runs import CLI_FAST


@pytest.mark.parametrize("progress", [True, False], ids=["progress", "no-progress"])
def test_no_progress_silences_the_model_writer_s_bar(synthetic_shards: Path, tmp_path: Path, progress: bool) -> None:
    args = [a for a in CLI_FAST if a != "--no-progress"] + ([] if progress else ["--no-progress"])
    r = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(tmp_path / "run"), *args,
                                  "--full", "--max-steps", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert ("Writing model shards" in r.stderr) == progress
