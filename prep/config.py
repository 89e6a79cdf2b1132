"""The typed configs of ``prep``: :class:`PackConfig` (``prep pack``) and :class:`CostConfig` (``prep stats``).

Each field's help is its click help: ``prep.cli`` builds the options from these fields
(``padless.shards.cli_config.click_options``). Enum-like options are ``Literal`` types; ``__post_init__`` checks
every field's type and range, so a library caller gets the same :class:`PrepError` as the command line. This module
stays light (no numpy, no tokenizers): ``prep --help`` imports it.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from padless.shards.cli_config import check_fields, option
from padless.shards.manifest import INT32_MAX

from .errors import PrepError

__all__ = ["DEFAULT_TEMPLATE_DATE", "GPUS", "MIN_MAX_LEN", "CostConfig", "Format", "GpuName", "Overlong",
           "PackConfig", "TrainOn", "parse_param_count", "parse_template_kwargs", "template_datetime"]  # fmt: skip

MIN_MAX_LEN = 16
# strftime_now() in chat templates: a fixed date, so a shard set never depends on the day it was packed.
DEFAULT_TEMPLATE_DATE = "2024-01-01"
# Template variables that come from the data or from prep itself, never from --chat-template-kwargs.
_RESERVED_TEMPLATE_VARS = ("messages", "tools", "documents", "add_generation_prompt")

Format = Literal["text", "alpaca", "prompt-completion", "chat", "sharegpt"]
TrainOn = Literal["completion", "all"]
Overlong = Literal["truncate", "split", "drop"]
GpuName = Literal["B200", "H200", "H100", "A100", "L40S", "RTX4090", "A10G", "L4"]

# Peak dense bf16 tensor TFLOP/s (vendor datasheets, no sparsity) and an assumed on-demand $/hour.
GPUS: dict[str, tuple[float, float]] = {
    "B200": (2250.0, 6.00),
    "H200": (989.0, 3.50),
    "H100": (989.0, 2.50),
    "A100": (312.0, 1.50),
    "L40S": (362.0, 1.00),
    "RTX4090": (165.0, 0.40),
    "A10G": (70.0, 1.00),
    "L4": (121.0, 0.80),
}
assert tuple(GPUS) == typing.get_args(GpuName), "GpuName and the GPUS table name the same GPUs"


@dataclass(kw_only=True, frozen=True)
class PackConfig:
    """Options of ``prep pack`` (each field's help is its command-line help)."""

    datasets: tuple[str, ...] = option(
        (),
        help="Files, folders, demo:alpaca, demo:chat or hub ids to pack together, each PATH_OR_ID[:SUBSET][@SPLIT].",
        positional=True,
    )
    max_len: int = option(help=f"Tokens per pack (>= {MIN_MAX_LEN}).")
    out: str = option(
        "packed", help="Output folder: absent or empty, or with --overwrite a shard set made by prep pack."
    )
    mix: tuple[str, ...] = option(
        (),
        help="Mix datasets by weight instead of giving DATASETS: a weight is the fraction of the mix's examples drawn "
        "from that dataset (without replacement; a dataset asked for more rows than it has is repeated). Repeatable.",
        metavar="DATASET=WEIGHT[,...]",
    )
    mix_examples: int = option(0, help="Examples (rows) in the --mix; 0 = as many as its datasets hold together.")
    tokenizer: str | None = option(None, help="Local folder or hub id. Default: the demo tokenizer in prep/assets.")
    format: Format | None = option(None, help="Data format. Default: detected from the columns.")
    maps: tuple[str, ...] = option(
        (), help="Rename COLUMN to field NAME (repeatable).", flag="--map", metavar="NAME=COLUMN"
    )
    chat_template_kwargs: tuple[str, ...] = option(
        (),
        help="Extra chat template variables, e.g. enable_thinking=false: NAME=VALUE[,NAME=VALUE...] (VALUE read as "
        "JSON, else as text) or a JSON object. Repeatable.",
        metavar="NAME=VALUE",
    )
    template_date: str = option(
        DEFAULT_TEMPLATE_DATE,
        help="The date a chat template's strftime_now() gives (YYYY-MM-DD, midnight), fixed so the output never "
        "depends on the day it ran.",
        metavar="DATE",
    )
    train_on: TrainOn = option(
        "completion", help="Loss on responses only (every assistant turn) or on all tokens; text is always all."
    )
    overlong: Overlong = option("truncate", help="What to do with examples longer than --max-len.")
    max_examples_per_pack: int = option(0, help="Cap per pack (0 = no cap).")
    seed: int = option(0, help="Seed of the --mix draw, the pack-order shuffle and the eval split.")
    eval_fraction: float = option(0.0, help="Held-out fraction of rows, packed into OUT/eval/.")
    eval_examples: int = option(0, help="Held-out number of rows, packed into OUT/eval/.")
    num_proc: int = option(1, help="Tokenizer processes (the output is identical for any number).")
    overwrite: bool = option(
        False, help="Replace --out if it is a shard set made by prep pack (any other folder is refused)."
    )
    skip_bad_rows: bool = option(
        False, help="Leave out rows with a missing or mistyped field (counted in the summary and manifest)."
    )
    prompt_separator: str | None = option(
        None,
        help="prompt-completion: text put in front of the completion when neither side has whitespace at the join. "
        "Default: one space; '' joins as is.",
        metavar="TEXT",
    )
    progress: bool = option(True, help="Show progress bars.")
    # Library-only (no command-line option): writer settings, None = the writer's defaults.
    zstd_level: int | None = None
    tokens_per_batch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, PrepError)
        if not self.datasets and not self.mix:
            raise PrepError(
                "no DATASET given; expected a file, a folder, demo:alpaca / demo:chat, or a hub id (or --mix)"
            )
        if self.datasets and self.mix:
            raise PrepError("give DATASETS or --mix, not both (--mix names its datasets with their weights)")
        if self.mix:
            from .mix import parse_mix  # numpy: only when a config is built, never for --help

            parse_mix(self.mix)
        if self.mix_examples < 0 or (self.mix_examples and not self.mix):
            raise PrepError(f"--mix-examples {self.mix_examples}: expected >= 0, and only with --mix")
        parse_template_kwargs(self.chat_template_kwargs)
        template_datetime(self.template_date)
        if self.max_len < MIN_MAX_LEN:
            raise PrepError(
                f"--max-len {self.max_len} is below {MIN_MAX_LEN}; expected at least {MIN_MAX_LEN} tokens per pack"
            )
        if self.max_len > INT32_MAX:  # the shard format's bound: positions and cu_seqlens are int32
            raise PrepError(f"--max-len {self.max_len} is above {INT32_MAX}, the most tokens a pack can hold")
        if self.max_examples_per_pack < 0:
            raise PrepError(f"--max-examples-per-pack {self.max_examples_per_pack}: expected >= 0 (0 = no cap)")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise PrepError(f"--eval-fraction {self.eval_fraction}: expected a fraction in [0, 1)")
        if self.eval_examples < 0 or (self.eval_examples and self.eval_fraction):
            raise PrepError("give at most one of --eval-fraction and --eval-examples (and --eval-examples >= 0)")
        if self.seed < 0:  # numpy's generators take only non-negative seeds
            raise PrepError(f"--seed {self.seed}: expected an integer >= 0")
        if self.num_proc < 1:
            raise PrepError(f"--num-proc {self.num_proc}: expected >= 1")
        if not self.out:
            raise PrepError("--out is empty; expected the folder to write the shard set into")

    def output_options(self) -> dict[str, Any]:
        """The options that change the output (so they enter the fingerprint); num_proc, out, ... do not."""
        skip = ("datasets", "out", "num_proc", "overwrite", "progress", "tokenizer", "extra")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["maps"] = sorted(self.maps)  # one mapping per field (prep.render.parse_maps), so their order is no option
        # The mix's weights in order (its datasets' content is in the source fingerprint; paths differ by machine).
        d["mix"] = [e.weight for e in self.mix_entries()]
        d["chat_template_kwargs"] = parse_template_kwargs(self.chat_template_kwargs)
        d["template_date"] = template_datetime(self.template_date).date().isoformat()
        return d

    def mix_entries(self) -> list[Any]:
        """``--mix`` parsed (``prep.mix.MixEntry`` per dataset), [] without a mix."""
        from .mix import parse_mix

        return parse_mix(self.mix) if self.mix else []

    def inputs(self) -> tuple[str, ...]:
        """The DATASET arguments, in order: DATASETS, or the datasets of --mix."""
        return self.datasets or tuple(e.dataset for e in self.mix_entries())


def parse_template_kwargs(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``--chat-template-kwargs`` items -> one dict: each item is a JSON object or ``NAME=VALUE[,NAME=VALUE...]``
    (VALUE parsed as JSON when it is JSON, e.g. ``false``, ``3``, ``"x"``, ``[1, 2]``; else the text as is).
    A later item overrides an earlier one."""
    out: dict[str, Any] = {}
    for item in items:
        text = item.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise PrepError(f"--chat-template-kwargs {item!r} is not a JSON object ({e.msg})") from e
            if not isinstance(value, dict):
                raise PrepError(f"--chat-template-kwargs {item!r}: expected a JSON object")
            pairs = list(value.items())
        else:  # split at commas that start a new NAME=
            pairs = []
            for part in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text):
                name, sep, raw = part.partition("=")
                if not sep:
                    raise PrepError(f"--chat-template-kwargs {part!r}: expected NAME=VALUE, e.g. enable_thinking=false")
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError:
                    value = raw
                pairs.append((name.strip(), value))
        for name, value in pairs:
            if not re.fullmatch(r"[A-Za-z_]\w*", name):
                raise PrepError(f"--chat-template-kwargs: {name!r} is not a template variable name")
            if name in _RESERVED_TEMPLATE_VARS:
                raise PrepError(
                    f"--chat-template-kwargs: {name!r} comes from the data (a row's messages, tools and documents "
                    "columns) and cannot be set here"
                )
            out[name] = value
    return out


def template_datetime(text: str) -> datetime.datetime:
    """``--template-date`` (YYYY-MM-DD) -> midnight of that day."""
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%d")
    except ValueError as e:
        raise PrepError(f"--template-date {text!r}: expected a date YYYY-MM-DD, e.g. 2026-01-31") from e


def parse_param_count(text: str) -> float:
    """``7e9``, ``1.5B``, ``500M`` -> a parameter count (finite and > 0)."""
    m = re.fullmatch(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([kKmMbBtT]?)\s*", text)
    n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()] if m else 0.0
    if not 0 < n < math.inf:
        raise PrepError(f"--model-params {text!r}: expected a number > 0 like 7e9, 1.5B or 500M")
    return n


@dataclass(kw_only=True, frozen=True)
class CostConfig:
    """The GPU cost estimate of ``prep stats`` (each field's help is its command-line help)."""

    model_params: str | None = option(None, help="Model size, e.g. 7e9, 1.5B, 500M (or use --model-config).")
    model_config: str | None = option(None, help="A Hugging Face config.json (or its folder) to count parameters.")
    gpu: GpuName = option("H100", help="GPU for the cost estimate (any letter case).", case_insensitive=True)
    mfu: float = option(0.4, help="Model FLOPs utilisation assumed, in (0, 1].")
    epochs: float = option(1.0, help="Passes over the shard set.")
    price_per_hour: float | None = option(None, help="GPU price per hour (default: the table's).")

    def __post_init__(self) -> None:
        if isinstance(self.gpu, str):  # h200 -> H200: the table's spelling
            object.__setattr__(self, "gpu", {k.lower(): k for k in GPUS}.get(self.gpu.lower(), self.gpu))
        check_fields(self, PrepError)
        if self.model_params is not None:
            parse_param_count(self.model_params)
        if not 0 < self.mfu <= 1:
            raise PrepError(f"--mfu {self.mfu}: expected a fraction in (0, 1]")
        if not 0 < self.epochs < math.inf:
            raise PrepError(f"--epochs {self.epochs}: expected a finite number > 0")
        if self.price_per_hour is not None and not 0 <= self.price_per_hour < math.inf:
            raise PrepError(f"--price-per-hour {self.price_per_hour}: expected a finite number >= 0")
