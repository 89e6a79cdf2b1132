"""The progress display: a tqdm bar with the step's numbers, or a plain line every N steps off a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["Progress", "format_record", "library_progress_bars"]


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """Hugging Face's own progress bars (transformers' "Loading weights", "Writing model shards") follow
    ``--progress``: off for the run with ``--no-progress``, as ours is, and back as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            hf_logging.enable_progress_bar()


def format_record(record: dict[str, Any]) -> dict[str, str]:
    """The short, human form of a step record (what the bar's postfix shows)."""
    out = {
        "loss": f"{record['loss']:.4f}",
        "lr": f"{record['lr']:.2e}",
        "gnorm": f"{record['grad_norm']:.3f}",
        "tok/s": f"{record['tokens_per_s']:,.0f}",
        "train tok/s": f"{record['trainable_tokens_per_s']:,.0f}",
    }
    if record.get("mfu") is not None:
        out["mfu"] = f"{100 * record['mfu']:.1f}%"
    out["mem"] = f"{record['peak_mem_gib']:.2f}GiB"
    return out


class Progress:
    """``update(record)`` once per step; refreshes the bar (or prints a line) every ``every`` steps.

    ``enabled``: show progress; ``main``: this process speaks for the run (notes and warnings, see ``write``).
    """

    def __init__(self, *, total: int, initial: int, enabled: bool, every: int, main: bool = True) -> None:
        self.every = every
        self.enabled = enabled
        self.main = main
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        due = record["step"] % self.every == 0
        if self.bar is not None:
            self.bar.update(1)
            if due:
                self.bar.set_postfix(format_record(record), refresh=False)
        elif due:
            fields = " ".join(f"{k}={v}" for k, v in format_record(record).items())
            print(f"step {record['step']}: {fields}", file=sys.stderr, flush=True)

    def write(self, line: str, *, always: bool = False) -> None:
        """Print ``line`` above the bar; ``always`` (notes and warnings): also without progress, on the main rank."""
        if not (self.enabled or (always and self.main)):
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
