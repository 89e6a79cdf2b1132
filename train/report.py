"""``train report RUN``: a run's ``metrics.jsonl`` as plots (``report.png``) and a short text summary
(``report.txt``); ``train run`` writes both at its end.

The PNG has four panels against the optimizer step: training loss with the eval loss, learning rate, tokens/s
(all and trainable), peak memory. The summary gives steps, final loss, best eval loss, steady throughput (step
time only, the first step left out when there are several: it pays the compiles), MFU where known, peak memory
and wall time (from ``summary.json`` when the run finished, else the steps' own time). Plots go through
matplotlib's Agg canvas directly (no pyplot, no global backend switch), so a report never needs a display.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainError

__all__ = ["Metrics", "read_metrics", "summary_text", "write_report"]

REPORT_PNG, REPORT_TXT = "report.png", "report.txt"
_NUMBERS = ("loss", "lr", "grad_norm", "tokens_per_s", "trainable_tokens_per_s", "mfu", "peak_mem_gib",
            "step_time_s", "tokens", "trainable_tokens", "eval_loss")  # fmt: skip


@dataclass
class Metrics:
    """The records of one ``metrics.jsonl``: training steps (with ``loss``) and evaluations (with ``eval_loss``)."""

    path: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str, records: list[dict[str, Any]] | None = None) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` where it is a number."""
        pairs = [(r["step"], r[key]) for r in (self.steps if records is None else records) if r.get(key) is not None]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]


def _bad(path: Path, line: int, why: str) -> TrainError:
    return TrainError(
        f"{path!s}:{line}: {why}; metrics.jsonl is damaged (each line must be one JSON object written by "
        "`train run`). Remove the bad line to report the rest"
    )


def read_metrics(path: str | os.PathLike) -> Metrics:
    """Read and check ``metrics.jsonl``: every line a JSON object with an int ``step`` and numeric metrics."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(
            f"{str(path)!r} does not exist; `train report` reads the metrics.jsonl of a `train run` output folder"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TrainError(f"{str(path)!r} cannot be read ({error})") from error
    metrics = Metrics(path)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _bad(path, number, f"not JSON ({error.msg} at column {error.colno})") from error
        if not isinstance(record, dict):
            raise _bad(path, number, f"a JSON {type(record).__name__}, not an object")
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise _bad(path, number, f"'step' is {step!r}, expected a non-negative int")
        for key in _NUMBERS:
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise _bad(path, number, f"{key!r} is {value!r}, expected a number or null")
        if "eval_loss" in record:
            metrics.evals.append(record)
        elif "loss" in record:
            metrics.steps.append(record)
        else:
            raise _bad(path, number, "neither a training step ('loss') nor an evaluation ('eval_loss')")
    if not metrics.steps:
        raise TrainError(f"{str(path)!r} holds no training step; nothing to report (the run logged none)")
    return metrics


def _finished_summary(run: Path) -> dict[str, Any]:
    try:
        value = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def summary_text(metrics: Metrics, summary: dict[str, Any] | None = None) -> str:
    """The text summary of a run (``summary``: its ``summary.json`` when it finished)."""
    summary = summary or {}
    steps = metrics.steps
    last = steps[-1]
    steady = steps[1:] if len(steps) > 1 else steps
    step_time = sum(float(r.get("step_time_s") or 0.0) for r in steady)
    tokens = sum(int(r.get("tokens") or 0) for r in steady)
    trainable = sum(int(r.get("trainable_tokens") or 0) for r in steady)
    mfus = [float(r["mfu"]) for r in steady if r.get("mfu") is not None]
    peak = max((float(r["peak_mem_gib"]) for r in steps if r.get("peak_mem_gib") is not None), default=None)
    lines = [
        f"run: {metrics.path.parent}",
        f"steps: {last['step']}, the last one in epoch {last.get('epoch', 0) + 1} (epochs count from 1)",
        f"final loss: {_fmt(last.get('loss'))} (step {last['step']})",
    ]
    # The best of the finite eval losses: NaN (an eval set without trainable tokens) or null compares as nothing.
    finite = [r for r in metrics.evals if r["eval_loss"] is not None and math.isfinite(r["eval_loss"])]
    if metrics.evals:
        best, final = min(finite or metrics.evals[:1], key=lambda r: r["eval_loss"]), metrics.evals[-1]
        lines.append(
            f"best eval loss: {_fmt(best['eval_loss'])} (step {best['step']}; last {_fmt(final['eval_loss'])} at step "
            f"{final['step']})"
        )
    else:
        lines.append("best eval loss: n/a (no evaluation)")
    if step_time > 0:
        over = f"{len(steady)} steps" if len(steady) != 1 else "1 step"
        first = " without the first" if len(steps) > 1 else ""
        mfu = f"; MFU {100 * sum(mfus) / len(mfus):.1f}%" if mfus else ""
        lines.append(
            f"throughput: {tokens / step_time:,.0f} tokens/s ({trainable / step_time:,.0f} trainable), over "
            f"{over}{first}{mfu}"
        )
    lines.append(f"peak memory: {_fmt(peak, '.2f')} GiB")
    total_steps = sum(float(r.get("step_time_s") or 0.0) for r in steps)
    wall = summary.get("wall_s")
    if isinstance(wall, int | float) and not isinstance(wall, bool):
        lines.append(f"wall time: {wall:.1f} s ({total_steps:.1f} s in steps)")
    else:
        lines.append(f"wall time: n/a (the run did not finish; {total_steps:.1f} s in steps)")
    return "\n".join(lines) + "\n"


def _plot(metrics: Metrics, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (loss_ax, lr_ax), (speed_ax, mem_ax) = fig.subplots(2, 2)
    loss_ax.plot(*metrics.series("loss"), label="loss", linewidth=1)
    if metrics.evals:
        loss_ax.plot(*metrics.series("eval_loss", metrics.evals), "o-", label="eval loss", markersize=3)
    loss_ax.set_title("loss")
    loss_ax.legend()
    lr_ax.plot(*metrics.series("lr"), color="tab:green")
    lr_ax.set_title("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    speed_ax.plot(*metrics.series("tokens_per_s"), label="tokens/s", linewidth=1)
    speed_ax.plot(*metrics.series("trainable_tokens_per_s"), label="trainable tokens/s", linewidth=1)
    speed_ax.set_title("throughput")
    speed_ax.legend()
    mem_ax.plot(*metrics.series("peak_mem_gib"), color="tab:red")
    mem_ax.set_title("peak memory (GiB)")
    for ax in (loss_ax, lr_ax, speed_ax, mem_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"padless run {metrics.path.parent.resolve().name}")
    fig.savefig(path)


def write_report(run: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.txt`` for the run folder ``run`` into ``out`` (default: ``run``);
    returns their paths. A missing or malformed ``metrics.jsonl`` is a TrainError naming the file and line, and so
    is an ``out`` that cannot be made a folder or written (a file, a read-only place)."""
    run = Path(run)
    if not run.is_dir():
        raise TrainError(f"{str(run)!r} is not a folder; expected the --output folder of a `train run`")
    metrics = read_metrics(run / "metrics.jsonl")
    target = Path(out) if out is not None else run
    png, txt = target / REPORT_PNG, target / REPORT_TXT
    where = f"--out {str(target)!r}" if out is not None else repr(str(target))
    if target.exists() and not target.is_dir():
        raise TrainError(f"{where} is a file; expected a folder for report.png and report.txt")
    try:
        target.mkdir(parents=True, exist_ok=True)
        _plot(metrics, png)
        txt.write_text(summary_text(metrics, _finished_summary(run)), encoding="utf-8")
    except OSError as error:
        raise TrainError(
            f"{where}: cannot write the report there ({error.strerror or error}); give --out a folder you can write"
        ) from error
    return png, txt
