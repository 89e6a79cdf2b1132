"""``train report``: the PNG and the text summary from a hand-written ``metrics.jsonl``; a damaged one is one
error naming the line. (``train run`` writing the report at its end is checked in test_outputs.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from padless.train.cli import main
from tests.user_errors import assert_one_line_error


def _step(step: int, loss: float, **extra) -> dict:
    record = {"step": step, "epoch": 0, "loss": loss, "lr": 1e-3 * step, "grad_norm": 1.0, "tokens": 1000,
              "trainable_tokens": 400, "tokens_per_s": 1000.0, "trainable_tokens_per_s": 400.0, "mfu": None,
              "peak_mem_gib": 1.5 + step / 10, "step_time_s": 1.0 if step > 1 else 9.0}  # fmt: skip
    record.update(extra)
    return record


def _write(run: Path, records: list) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def read_png(path: Path) -> np.ndarray:
    """The decoded image (height, width, channels) of a PNG file."""
    from matplotlib.image import imread

    return imread(str(path))


def test_report_plots_and_summarises_metrics_jsonl(tmp_path: Path) -> None:
    records = [_step(1, 5.0), _step(2, 4.0), {"step": 2, "eval_loss": 4.5, "eval_trainable_tokens": 90},
               _step(3, 3.0, tokens=2000, trainable_tokens=800), _step(4, 2.5),
               {"step": 4, "eval_loss": 4.75, "eval_trainable_tokens": 90}]  # fmt: skip
    run = _write(tmp_path / "run", records)
    (run / "summary.json").write_text(json.dumps({"wall_s": 42.5}))
    res = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output

    text = (tmp_path / "rep" / "report.txt").read_text()
    assert text in res.output
    assert "steps: 4, the last one in epoch 1 (epochs count from 1)" in text
    assert "final loss: 2.5000 (step 4)" in text
    assert "best eval loss: 4.5000 (step 2; last 4.7500 at step 4)" in text
    # Steady throughput leaves out step 1 (9 s of compiles): 4000 tokens and 1600 trainable over 3 s.
    assert "throughput: 1,333 tokens/s (533 trainable), over 3 steps without the first" in text
    assert "peak memory: 1.90 GiB" in text
    assert "wall time: 42.5 s (12.0 s in steps)" in text

    image = read_png(tmp_path / "rep" / "report.png")
    assert image.shape[:2] == (750, 1100)
    assert image[..., :3].std() > 0.05  # drawn on, not a blank canvas
    # Every panel has a drawn curve: the coloured line pixels (not white, not grey) in each quarter.
    rgb = image[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3
    h, w = coloured.shape
    for quarter in (coloured[: h // 2, : w // 2], coloured[: h // 2, w // 2 :], coloured[h // 2 :, : w // 2],
                    coloured[h // 2 :, w // 2 :]):  # fmt: skip
        assert quarter.sum() > 200
    assert not (run / "report.png").exists()  # --out: the run folder is left alone


def test_report_of_an_unfinished_run_without_evaluation(tmp_path: Path) -> None:
    run = _write(tmp_path / "run", [_step(1, 5.0)])
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0, res.output
    text = (run / "report.txt").read_text()
    assert "best eval loss: n/a (no evaluation)" in text
    assert "throughput: 111 tokens/s (44 trainable), over 1 step\n" in text
    assert "wall time: n/a (the run did not finish; 9.0 s in steps)" in text
    assert read_png(run / "report.png").shape[:2] == (750, 1100)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([_step(1, 5.0), '{"step": 2, "loss": 4.', _step(3, 3.0)], r"metrics.jsonl:2: not JSON"),
        ([_step(1, 5.0), "[1, 2]"], r"metrics.jsonl:2: a JSON list, not an object"),
        ([_step(1, 5.0), _step(2, "4.0")], r"metrics.jsonl:2: 'loss' is '4.0', expected a number or null"),
        ([{"loss": 5.0}], r"metrics.jsonl:1: 'step' is None, expected a non-negative int"),
        ([{"step": 1, "note": "hi"}], r"metrics.jsonl:1: neither a training step"),
        ([{"step": 1, "eval_loss": 2.0}], r"holds no training step; nothing to report"),
    ],
    ids=["cut-short", "not-an-object", "string-loss", "no-step", "unknown-record", "no-steps"],
)
def test_a_damaged_metrics_jsonl_is_one_error(tmp_path: Path, lines: list, match: str) -> None:
    run = _write(tmp_path / "run", lines)
    line = assert_one_line_error(CliRunner().invoke(main, ["report", str(run)]), match)
    assert "Traceback" not in line
    assert not (run / "report.png").exists()


def test_report_needs_a_run_folder(tmp_path: Path) -> None:
    assert_one_line_error(CliRunner().invoke(main, ["report", str(tmp_path / "nope")]), r"is not a folder")
    assert_one_line_error(CliRunner().invoke(main, ["report", str(tmp_path)]), r"metrics.jsonl' does not exist")


def test_an_out_that_is_not_a_writable_folder_is_one_error(tmp_path: Path) -> None:
    run = _write(tmp_path / "run", [_step(1, 5.0)])
    (tmp_path / "a-file").write_text("mine\n")
    cases = [
        ("a-file", r"--out '.*a-file' is a file; expected a folder for report.png"),
        ("a-file/sub", r"--out '.*a-file/sub': cannot write the report there \(Not a directory\)"),
    ]
    for out, match in cases:
        result = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / out)])
        assert "Traceback" not in assert_one_line_error(result, match)
    assert (tmp_path / "a-file").read_text() == "mine\n"


def test_the_best_eval_loss_is_the_least_finite_one(tmp_path: Path) -> None:
    """An evaluation that gave NaN (or null) is no 'best' eval loss: min() over NaN depends on the order."""
    records = [_step(1, 5.0), {"step": 1, "eval_loss": float("nan")}, _step(2, 4.0), {"step": 2, "eval_loss": None},
               _step(3, 3.0), {"step": 3, "eval_loss": 3.5}, {"step": 4, "eval_loss": 3.75}]  # fmt: skip
    run = _write(tmp_path / "run", records)
    assert CliRunner().invoke(main, ["report", str(run)]).exit_code == 0
    assert "best eval loss: 3.5000 (step 3; last 3.7500 at step 4)" in (run / "report.txt").read_text()
