"""``prep``: the command line of the offline stage (pack, stats, show, verify).

Each command parses options into one config, calls one library function; a user error (``PrepError``, a bad
shard set, a bad option) is one ``error: ...`` line on stderr and exit status 2. ``prep verify`` reports a shard
set that fails verification with exit status 1 (a result, not a usage error). ``prep pack`` and ``prep stats``
take their options from :class:`~prep.config.PackConfig` and :class:`~prep.config.CostConfig`. Start-up stays
light: nothing heavy (never torch) is imported at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

from padless.shards.cli_config import Group, click_options, config_from_params, one_line
from padless.shards.errors import ShardFormatError

from .config import CostConfig, PackConfig
from .errors import PrepError

__all__ = ["main"]


@click.group(
    cls=Group,
    known_errors=(PrepError, ShardFormatError),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)
def main() -> None:
    """padless offline prep: pack a dataset into reusable shards, inspect and verify them.

    A user error is one line on stderr and exit status 2.
    """


@main.command("pack")
@click_options(
    PackConfig,
    exclude=("zstd_level", "tokens_per_batch", "extra"),
    config_note="Every shard set keeps its resolved settings in OUT/config.yaml: `prep pack --config "
    "OUT/config.yaml --out NEW` writes the same shards again.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def pack_cmd(as_json: bool, **params: Any) -> None:
    """Tokenize DATASETS (files, folders, demo:alpaca, demo:chat, hub ids; each PATH_OR_ID[:SUBSET][@SPLIT], e.g.
    org/dataset:default@validation), or the datasets of --mix, and pack them into shards."""
    from .pipeline import run_pack
    from .report import format_pack_summary

    with _sigterm_exits():
        summary = run_pack(config_from_params(PackConfig, params))
    click.echo(json.dumps(summary, indent=2) if as_json else format_pack_summary(summary))


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Make SIGTERM sent to ``prep pack`` (``kill PID``) end it as Ctrl-C does: as an exception in this process, so
    the staging folder and its spill are removed and ``--out`` is left as it was; exit status 143 (128 + SIGTERM).
    Tokenizer workers reset SIGTERM to its default when they start (``prep.tokenize``); one signalled before that
    dies of it here too. A SIGTERM to the whole process group (``timeout``, a job scheduler) with ``--num-proc`` above
    1 can kill an idle worker inside the pool's queue lock, and the pool's shutdown then waits for SIGKILL."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    pid = os.getpid()

    def exit_here(signum: int, frame: Any) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_here)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@main.command("stats")
@click.argument("shard_set")
@click_options(CostConfig)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats_cmd(shard_set: str, as_json: bool, **params: Any) -> None:
    """Counts, fill, length percentiles, padded-batching cost and a GPU cost estimate for SHARD_SET."""
    from .report import format_stats, shard_stats

    st = shard_stats(shard_set, config_from_params(CostConfig, params))
    click.echo(json.dumps(st, indent=2) if as_json else format_stats(st))


@main.command("show")
@click.argument("shard_set")
@click.option("--pack", "pack_i", type=int, default=0, show_default=True, help="Pack index.")
@click.option("--tokenizer", default=None, help="Tokenizer to decode with (default: as in the manifest, else demo).")
@click.option("--color/--no-color", default=None, help="Colour trained tokens (default: when a terminal).")
def show_cmd(shard_set: str, pack_i: int, tokenizer: str | None, color: bool | None) -> None:
    """Decode one pack: example boundaries, trained tokens vs masked ones."""
    from .report import show_pack

    click.echo(show_pack(shard_set, pack_i, tokenizer, color=sys.stdout.isatty() if color is None else color))


@main.command("verify")
@click.argument("shard_set")
def verify_cmd(shard_set: str) -> None:
    """Check checksums, schema and every pack invariant of SHARD_SET and of its held-out set SHARD_SET/eval.

    Exit status 0 when both pass; 1 when it fails verification (the message names the set, shard and pack); 2 for a
    usage error.
    """
    from pathlib import Path

    from padless.shards.verify import verify_with_eval

    try:
        report = verify_with_eval(shard_set)
    except ShardFormatError as error:
        if not Path(shard_set).is_dir():  # no shard set at all: a usage error (a missing file), as in prep show
            raise
        click.echo(f"error: {one_line(error)}", err=True)
        sys.exit(1)
    line = f"ok: {_counts(report['main'])} verified"
    ev = report["eval"]
    click.echo(line + (f"; held-out eval/: {_counts(ev)} verified" if ev else "; no held-out eval/ set"))


def _counts(r: dict[str, Any]) -> str:
    return f"{r['packs']} packs, {r['tokens']} tokens in {r['shards']} shard(s)"


if __name__ == "__main__":
    main()
