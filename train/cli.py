"""``train``: the command line. Thin: parse options into one config, call one library function; a user error
(:class:`~train.config.TrainError`, a bad shard set, a bad option) is one ``error: ...`` line on stderr and exit
status 2, never a traceback.

``train run SHARDS``  -> :func:`train.loop.train` (options = the fields of :class:`train.config.TrainConfig`)
``train merge ADAPTER --model BASE --out DIR`` -> :func:`train.merge.merge`
``train parity SHARDS --model M`` -> :func:`train.parity.parity` (exit status 1 when the check fails)
``train report RUN [--out DIR]`` -> :func:`train.report.write_report`
``train plan SHARDS --model M [--gpu-mem-gib G]`` -> :func:`train.plan.plan` (options of ``PlanConfig``)
``train chat RUN --prompt TEXT`` -> :func:`train.chat.chat`
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from padless.shards.cli_config import Group, choice, click_options, config_from_params
from padless.shards.errors import ShardFormatError

from .config import Dtype, PlanConfig, TrainConfig, TrainError
from .families import FamilyName

__all__ = ["main"]


@click.group(
    cls=Group,
    known_errors=(TrainError, ShardFormatError),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)
def main() -> None:
    """padless trainer: stream packed shards into a varlen model (LoRA, QLoRA or full fine-tuning).

    A user error is one line on stderr and exit status 2.
    """
    # bitsandbytes' CPU backend warns on import that an optional kernel from the Hugging Face hub is not trusted;
    # it falls back to its own code, and to a CPU user the warning reads as an error.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@main.command("run")
@click_options(
    TrainConfig,
    config_note="Every run saves its resolved settings as OUTPUT/config.yaml: `train run --config "
    "OUTPUT/config.yaml --output NEW` trains the same run again.",
)
def run_command(**params: Any) -> None:
    """Fine-tune on SHARDS (a folder made by `prep pack`)."""
    from .distributed import detect
    from .loop import train

    cfg = config_from_params(TrainConfig, params)
    _refuse_lora_options_with_full(cfg)
    result = train(cfg)
    if result.summary and detect().is_main:  # one line per run, as its notes: not one per torchrun process
        click.echo(_done_line(result.summary))


def _refuse_lora_options_with_full(cfg: TrainConfig) -> None:
    """LoRA options typed with ``--full`` would be ignored: full fine-tuning trains every weight and no adapter.
    Only the command line is judged: their defaults, and a saved config.yaml (which lists every setting, so a LoRA
    run's file replayed with ``--full`` holds them), say nothing."""
    if cfg.mode != "full":
        return
    ctx = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name in ("lora_r", "lora_alpha", "lora_dropout", "target_modules")
             if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]  # fmt: skip
    if given:
        raise TrainError(
            f"{' and '.join(given)} {'configure' if len(given) > 1 else 'configures'} a LoRA adapter, and --full "
            f"trains every weight and no adapter; leave out {' and '.join(given)}, or drop --full to train LoRA"
        )


def _done_line(s: dict[str, Any]) -> str:
    """The summary line of a run; a figure the run did not measure is left out (a resumed run whose checkpoint is
    at its last step trains no step and only writes its output)."""

    def part(key: str, text: str) -> str:
        return text.format(s[key]) if s.get(key) is not None else ""

    return (
        f"done: {s['steps']} steps"
        + part("final_loss", ", final loss {:.4f}")
        + part("eval_loss", ", eval_loss {:.4f}")
        + part("steady_tokens_per_s", ", {:,.0f} tokens/s")
        + part("steady_trainable_tokens_per_s", " ({:,.0f} trainable)")
        + part("mfu", ", MFU {:.1%}")
        + f", peak memory {s['peak_mem_gib']:.2f} GiB, {s['wall_s']:.1f} s; output in {s['output']}"
    )


@main.command("plan")
@click_options(PlanConfig)
def plan_command(**params: Any) -> None:
    """Predict peak GPU memory and step time per mode, tokens per micro-batch and checkpointing, from the model's
    config alone (no weights read), mark what fits the GPU, and recommend the fastest setting that fits."""
    from .plan import as_row, plan

    cfg = config_from_params(PlanConfig, params)
    result = plan(cfg)
    rows = [{**as_row(e), "fits": result.fits(e)} for e in result.estimates]
    if cfg.json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    header = f"{'mode':<6} {'tokens':>7} {'ckpt':<14} {'weights':>8} {'adapters':>8} {'step':>7} {'peak GiB':>8} " \
             f"{'host':>6} {'s/step':>7} {'tokens/s':>9}  fits"  # fmt: skip
    click.echo(header)
    click.echo("-" * len(header))
    for row in rows:
        fits = {True: "yes", False: "no", None: "?"}[row["fits"]]
        ckpt = row["checkpointing"] + (f"/{row['checkpoint_layers']}" if row["checkpoint_layers"] > 1 else "")
        ckpt += f"+{row['checkpoint_gpu_gib']:g}G" if row["checkpoint_gpu_gib"] else ""
        click.echo(
            f"{row['mode']:<6} {row['tokens']:>7} {ckpt:<14} {row['weights_gib']:>8.2f} "
            f"{row['trainable_gib']:>8.2f} {row['step_gib']:>7.2f} {row['peak_gib']:>8.2f} {row['host_gib']:>6.1f} "
            f"{row['step_s']:>7.3f} {row['tokens_per_s']:>9,.0f}  {fits}"
        )
    if result.gpu_bytes is None:
        click.echo("no GPU here and no --gpu-mem-gib: nothing is marked as fitting")
    elif result.recommended is None:
        click.echo(f"nothing asked for fits {result.gpu_bytes / 2**30:.1f} GiB (the card less 1 GiB of headroom)")
    else:
        best = result.recommended
        click.echo(
            f"recommended for {result.gpu_bytes / 2**30:.1f} GiB usable: {' '.join(best.setting.run_options())} "
            f"(predicted peak {best.peak / 2**30:.2f} GiB, about {best.tokens_per_s:,.0f} tokens/s)"
        )


@main.command("merge")
@click.argument("adapter_dir", type=click.Path())
@click.option("--model", "base", default=None, help="Base model folder or hub id (default: the adapter's base).")
@click.option("--out", "out", required=True, type=click.Path(), help="Folder for the merged Hugging Face model.")
@click.option("--dtype", type=choice(Dtype), default=None, help="Save in this dtype.")
def merge_command(adapter_dir: str, base: str | None, out: str, dtype: str | None) -> None:
    """Merge a LoRA adapter into its base model and save the result as a Hugging Face folder."""
    from .merge import merge

    path = merge(adapter_dir, base=base, out=out, dtype=dtype)
    click.echo(f"merged model written to {path}")


@main.command("parity")
@click.argument("shards_path", metavar="SHARDS", type=click.Path())
@click.option("--model", default=None, help="Model folder or hub id (default: the tiny model sized to the shards).")
@click.option("--packs", default=4, show_default=True, help="How many packs of SHARDS to check.")
@click.option("--family", type=choice(FamilyName), default="llama", show_default=True, help="Tiny model family.")
@click.option("--dtype", type=choice(Dtype), default="fp32", show_default=True)
@click.option("--device", default=None, help="Device (default: cuda when available, else cpu).")
@click.option("--tolerance", default=None, type=float, help="Relative error allowed (default: 1e-4 fp32, 2e-2 else).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--force",
    is_flag=True,
    help="Check even if the shards' tokenizer is not the model's (token ids beyond the model's embedding are refused "
    "all the same).",
)
def parity_command(**params: Any) -> None:
    """Check that packed training equals running every example alone on YOUR shards and model.

    Exit status 0 when they agree within the tolerance, 1 when they do not (the report says where).
    """
    from .parity import parity

    report = parity(
        params["shards_path"],
        model=params["model"],
        packs=params["packs"],
        family=params["family"],
        dtype=params["dtype"],
        device=params["device"],
        tolerance=params["tolerance"],
        force=params["force"],
    )
    click.echo(json.dumps(report.as_dict(), indent=2) if params["as_json"] else report.render())
    if not report.passed:
        sys.exit(1)


@main.command("report")
@click.argument("run", type=click.Path())
@click.option("--out", default=None, type=click.Path(), help="Folder for report.png and report.txt (default: RUN).")
def report_command(run: str, out: str | None) -> None:
    """Plot RUN's metrics.jsonl (loss, eval loss, learning rate, tokens/s, memory) into report.png and summarise
    it in report.txt; `train run` writes both at its end."""
    from .report import write_report

    png, txt = write_report(run, out)
    click.echo(txt.read_text(encoding="utf-8"), nl=False)
    click.echo(f"report written to {png} and {txt}")


@main.command("chat")
@click.argument("run", type=click.Path())
@click.option("--prompt", required=True, help="The user message (through the chat template when there is one).")
@click.option("--system", default=None, help="A system prompt before the user message (needs a chat template).")
@click.option("--tools", "tools_file", default=None, type=click.Path(),
              help="JSON file: a list of tool schemas the chat template shows the model.")  # fmt: skip
@click.option("--max-new-tokens", default=128, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature (0 = greedy).")
@click.option("--seed", default=0, show_default=True, help="Seed for sampling (--temperature > 0).")
@click.option("--device", default=None, help="Device (default: cuda when available, else cpu).")
def chat_command(
    run: str, prompt: str, system: str | None, tools_file: str | None, max_new_tokens: int, temperature: float,
    seed: int, device: str | None,
) -> None:  # fmt: skip
    """Generate one reply with the model in RUN (a `train run` output or `train merge` folder), loaded with
    transformers and peft from that folder alone."""
    from .chat import chat, read_tools

    tools = read_tools(tools_file) if tools_file else None
    reply = chat(run, prompt, system=system, tools=tools, max_new_tokens=max_new_tokens, temperature=temperature,
                 device=device, seed=seed)  # fmt: skip
    click.echo(reply)
    if not reply.strip():
        click.echo(
            "note: the model ended its reply at once. The prompt went through the tokenizer's chat template; a run "
            "trained on another prompt format (e.g. Alpaca's) answers in that one: write the prompt in it",
            err=True,
        )


if __name__ == "__main__":
    main()
