"""The trainer's one typed config: every ``train run`` option is a field here, and its doc is the click help.

One source: ``train.cli`` builds its options from these fields (:func:`click_options`), so the help text, the
default and the type cannot drift apart. The config is frozen; the library function ``train.loop.train`` takes
it whole. :class:`TrainError` is the one exception type the command line turns into a one-line message.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

__all__ = ["TrainConfig", "TrainError", "click_options", "config_from_cli"]


class TrainError(RuntimeError):
    """A known failure with a message that says what went wrong and what to do (printed as one line)."""


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A config field whose ``help`` is its doc and whose ``cli`` entries tune the click option."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Everything ``train run`` needs, as one frozen value (see each field's help)."""

    shards: str = _opt("", "Shard set made by `prep pack` (a folder with manifest.json).", positional=True)
    model: str | None = _opt(
        None,
        "Local Hugging Face folder (config.json + safetensors + tokenizer) or a hub id. "
        "Default: a tiny randomly initialised model sized to the shards' tokenizer (CPU demo).",
    )
    output: str | None = _opt(
        None, "Output folder: adapter/model, checkpoints/, metrics.jsonl. Default: runs/train-<time>."
    )
    mode: str = _opt("lora", "Fine-tuning mode.", switch=("lora", "qlora", "full"))
    lora_r: int = _opt(16, "LoRA rank r.")
    lora_alpha: int = _opt(16, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA input (0 = none).")
    target_modules: str | None = _opt(
        None, "Comma-separated module names to put LoRA on (default: all linear projections)."
    )
    tokens_per_micro_batch: int = _opt(
        0, "Token budget of one micro-batch, filled with whole packs (0 = the shards' max_len)."
    )
    grad_accum: int = _opt(1, "Micro-batches per optimizer step (per rank).")
    lr: float = _opt(2e-4, "Peak learning rate (after warm-up).")
    weight_decay: float = _opt(0.0, "AdamW weight decay (matrices only; norms and biases never decay).")
    warmup_steps: int = _opt(0, "Linear warm-up steps from 0 to --lr, then cosine decay.")
    min_lr_ratio: float = _opt(0.0, "Cosine floor as a fraction of --lr at the last step.")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this (0 = no clipping).")
    epochs: int = _opt(1, "Passes over the shard set (ignored when --max-steps > 0).")
    max_steps: int = _opt(0, "Optimizer steps to run (0 = run --epochs epochs).")
    seed: int = _opt(0, "Seed for the data order, the tiny model's init, LoRA init and dropout.")
    optimizer: str = _opt(
        "adamw",
        "adamw: torch AdamW (fused on CUDA); adamw8bit: bitsandbytes 8-bit AdamW.",
        choices=("adamw", "adamw8bit"),
    )
    checkpointing: str = _opt(
        "off",
        "Gradient checkpointing: off, on (recompute layers in backward), offload (also keep the checkpointed "
        "hidden states in pinned CPU memory).",
        choices=("off", "on", "offload"),
    )
    cuda_graphs: str = _opt(
        "auto",
        "Replay each micro-batch's forward+backward as one CUDA graph (removes the per-kernel host cost that bounds "
        "small steps): auto (on for a single CUDA process with --checkpointing off/on, LoRA dropout 0 and a patched "
        "architecture; falls back to eager with a warning if capture fails), on (fail instead), off.",
        choices=("auto", "on", "off"),
    )
    eval_shards: str | None = _opt(
        None, "Held-out shard set for eval_loss. Default: SHARDS/eval when `prep pack --eval-fraction` wrote it."
    )
    eval_every: int = _opt(0, "Evaluate every N steps (0 = only after the last step; -1 = never).")
    save_every: int = _opt(0, "Write a checkpoint every N steps (0 = none; the final output is always written).")
    resume: bool = _opt(False, "Continue exactly from the latest checkpoint in --output.", flag=True)
    force: bool = _opt(False, "Train even if the shards' tokenizer does not match the model's.", flag=True)
    dtype: str | None = _opt(
        None, "Compute dtype: bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU).", choices=("bf16", "fp16", "fp32")
    )
    device: str | None = _opt(None, "Device (default: cuda:LOCAL_RANK when CUDA is available, else cpu).")
    family: str = _opt(
        "llama", "Architecture of the random model built without --model (llama, qwen2, qwen3, mistral, gemma)."
    )
    model_overrides: str | None = _opt(
        None,
        "Config fields (a JSON object, or a .json file) for the random model built without --model, e.g. a real "
        "model's shape for a benchmark without downloading weights (a random base over 1B parameters is not saved).",
    )
    fsdp: bool = _opt(False, "Shard the model with FSDP2 (fully_shard) instead of DDP on several GPUs.", flag=True)
    log_every: int = _opt(1, "Refresh the progress bar (or print a line when not on a terminal) every N steps.")
    progress: bool = _opt(True, "Show a progress bar.", flag=True, negatable=True)

    def __post_init__(self) -> None:
        checks = [
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.lora_r >= 1, f"--lora-r must be >= 1, got {self.lora_r}"),
            (0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (
                self.tokens_per_micro_batch >= 0,
                f"--tokens-per-micro-batch must be >= 0, got {self.tokens_per_micro_batch}",
            ),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.epochs >= 1 or self.max_steps > 0, f"--epochs must be >= 1, got {self.epochs}"),
            (self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.mode in ("lora", "qlora", "full"), f"mode must be lora, qlora or full, got {self.mode!r}"),
            (not (self.resume and self.output is None), "--resume needs --output: the folder of the run to continue"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)

    @property
    def target_module_list(self) -> list[str] | None:
        """``--target-modules`` split on commas (None = the adapter code's default, all linear projections)."""
        if not self.target_modules:
            return None
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


def _click_type(annotation: Any, meta: dict[str, Any]) -> Any:
    if "choices" in meta:
        return click.Choice(meta["choices"])
    base = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return {int: int, float: float, str: str}.get(base[0], str)


def click_options(cls: type, exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding one click argument/option per dataclass field, help and default taken from the field."""
    hints = typing.get_type_hints(cls)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(dataclasses.fields(cls)):
            if f.name in exclude:
                continue
            meta = dict(f.metadata)
            flag = "--" + f.name.replace("_", "-")
            if meta.get("positional"):
                command = click.argument(f.name, type=click.Path())(command)
            elif "switch" in meta:
                # One option per value (--lora / --qlora / --full) writing the same field.
                for value in reversed(meta["switch"]):
                    default = {"default": True} if value == f.default else {}  # click: only the default's is set
                    command = click.option(
                        f"--{value}",
                        f.name,
                        flag_value=value,
                        help=f"{meta['help']} {value}{' (default)' if value == f.default else ''}.",
                        **default,
                    )(command)
            elif meta.get("flag"):
                decl = f"{flag}/--no-{flag[2:]}" if meta.get("negatable") else flag
                command = click.option(decl, f.name, is_flag=True, default=f.default, help=meta["help"])(command)
            else:
                command = click.option(
                    flag,
                    f.name,
                    type=_click_type(hints[f.name], meta),
                    default=f.default,
                    show_default=f.default is not None,
                    help=meta["help"],
                )(command)
        return command

    return decorate


def config_from_cli(cls: type, params: dict[str, Any]) -> Any:
    """Build ``cls`` from click's parsed parameters (names equal field names)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in names})
