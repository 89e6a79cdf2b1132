"""``prep``: the command line of the offline stage (pack, stats, show, verify).

Each command parses options into one config, calls one library function, and turns known errors
(``PrepError``, ``ShardFormatError``) into one clear line and exit status 2 (1 for a failed verify).
Start-up stays light: nothing heavy (and never torch) is imported at module level.
"""

from __future__ import annotations

import json
import sys

import click

__all__ = ["main"]

# Kept here (not imported from report) so `prep --help` stays light; report.GPUS holds the rates.
GPU_NAMES = ("B200", "H200", "H100", "A100", "L40S", "RTX4090", "A10G", "L4")


def _fail(e: Exception, code: int = 2):
    click.echo(f"error: {e}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
def main() -> None:
    """padless offline prep: pack a dataset into reusable shards, inspect and verify them."""


@main.command("pack")
@click.argument("datasets", nargs=-1, required=True)
@click.option("--max-len", type=int, required=True, help="Tokens per pack (>= 16).")
@click.option("--out", default="packed", show_default=True, help="Output folder (must be absent or empty).")
@click.option("--tokenizer", default=None, help="Local folder or hub id. Default: the demo tokenizer in prep/assets.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "alpaca", "prompt-completion", "chat", "sharegpt"]),
    default=None,
    help="Data format. Default: detected from the columns.",
)
@click.option("--map", "maps", multiple=True, metavar="NAME=COLUMN", help="Use COLUMN as field NAME (repeatable).")
@click.option(
    "--train-on",
    type=click.Choice(["completion", "all"]),
    default="completion",
    show_default=True,
    help="Loss on responses only (every assistant turn) or on all tokens; text is always all.",
)
@click.option(
    "--overlong",
    type=click.Choice(["truncate", "split", "drop"]),
    default="truncate",
    show_default=True,
    help="What to do with examples longer than --max-len.",
)
@click.option("--max-examples-per-pack", type=int, default=0, show_default=True, help="Cap per pack (0 = no cap).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the pack-order shuffle and eval split.")
@click.option("--eval-fraction", type=float, default=0.0, help="Held-out fraction of rows, packed into OUT/eval/.")
@click.option("--eval-examples", type=int, default=0, help="Held-out number of rows, packed into OUT/eval/.")
@click.option("--num-proc", type=int, default=1, show_default=True, help="Tokenizer processes (output identical).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def pack_cmd(datasets, max_len, out, tokenizer, fmt, maps, train_on, overlong, max_examples_per_pack, seed,
             eval_fraction, eval_examples, num_proc, overwrite, no_progress, as_json) -> None:  # fmt: skip
    """Tokenize DATASETS (files, folders, demo:alpaca, demo:chat, hub ids) and pack them into shards."""
    from padless.shards.errors import ShardFormatError

    from .errors import PrepError
    from .pipeline import PackConfig, run_pack
    from .report import format_pack_summary

    cfg = PackConfig(
        datasets=tuple(datasets), max_len=max_len, out=out, tokenizer=tokenizer, format=fmt, maps=tuple(maps),
        train_on=train_on, overlong=overlong, max_examples_per_pack=max_examples_per_pack, seed=seed,
        eval_fraction=eval_fraction, eval_examples=eval_examples, num_proc=num_proc, overwrite=overwrite,
        progress=not no_progress,
    )  # fmt: skip
    try:
        summary = run_pack(cfg)
    except (PrepError, ShardFormatError, FileExistsError) as e:
        _fail(e)
    click.echo(json.dumps(summary, indent=2) if as_json else format_pack_summary(summary))


@main.command("stats")
@click.argument("shard_set")
@click.option("--model-params", default=None, help="Model size, e.g. 7e9, 1.5B, 500M (or use --model-config).")
@click.option("--model-config", default=None, help="A Hugging Face config.json to count parameters from.")
@click.option("--gpu", default="H100", show_default=True, help=f"GPU for the cost estimate: {', '.join(GPU_NAMES)}.")
@click.option("--mfu", type=float, default=0.4, show_default=True, help="Model FLOPs utilisation assumed.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--price-per-hour", type=float, default=None, help="GPU price per hour (default: the table's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats_cmd(shard_set, model_params, model_config, gpu, mfu, epochs, price_per_hour, as_json) -> None:
    """Counts, fill, length percentiles, padded-batching cost and a GPU cost estimate for SHARD_SET."""
    from padless.shards.errors import ShardFormatError

    from .errors import PrepError
    from .report import CostConfig, format_stats, shard_stats

    try:
        cost = CostConfig(model_params=model_params, model_config=model_config, gpu=gpu, mfu=mfu, epochs=epochs,
                          price_per_hour=price_per_hour)  # fmt: skip
        st = shard_stats(shard_set, cost)
    except (PrepError, ShardFormatError) as e:
        _fail(e)
    click.echo(json.dumps(st, indent=2) if as_json else format_stats(st))


@main.command("show")
@click.argument("shard_set")
@click.option("--pack", "pack_i", type=int, default=0, show_default=True, help="Pack index.")
@click.option("--tokenizer", default=None, help="Tokenizer to decode with (default: as in the manifest, else demo).")
@click.option("--color/--no-color", default=None, help="Colour trained tokens (default: when a terminal).")
def show_cmd(shard_set, pack_i, tokenizer, color) -> None:
    """Decode one pack: example boundaries, trained tokens vs masked ones."""
    from padless.shards.errors import ShardFormatError

    from .errors import PrepError
    from .report import show_pack

    try:
        click.echo(show_pack(shard_set, pack_i, tokenizer, color=sys.stdout.isatty() if color is None else color))
    except (PrepError, ShardFormatError, IndexError) as e:
        _fail(e)


@main.command("verify")
@click.argument("shard_set")
def verify_cmd(shard_set) -> None:
    """Check checksums, schema and every pack invariant; exit 1 naming the shard and pack on a violation."""
    from padless.shards.errors import ShardFormatError
    from padless.shards.verify import verify_shard_set

    try:
        report = verify_shard_set(shard_set)
    except ShardFormatError as e:
        _fail(e, 1)
    click.echo(f"ok: {report['packs']} packs, {report['tokens']} tokens in {report['shards']} shard(s) verified")


if __name__ == "__main__":
    main()
