"""The trainer's typed configs: every ``train run`` option is a field of :class:`TrainConfig` (``train plan``'s, of
:class:`PlanConfig`), and its doc is the click help.

One source: ``train.cli`` builds its options from these fields (``padless.shards.cli_config.click_options``), so
the help text, the default, the type and the allowed values cannot drift apart; an enum-like option is a
``Literal`` type, checked in ``__post_init__`` for library callers too. The config is frozen; the library function
``train.loop.train`` takes it whole. :class:`TrainError` is the exception type for bad input: the command line
prints its message as one line (exit status 2).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from padless.shards.cli_config import check_fields, option

from .families import FamilyName

__all__ = [
    "MODES",
    "RESUME_CHANGEABLE",
    "TRACKERS",
    "Checkpointing",
    "CudaGraphs",
    "Dtype",
    "Memory",
    "Mode",
    "Optimizer",
    "PlanConfig",
    "Tracker",
    "TrainConfig",
    "TrainError",
]


class TrainError(RuntimeError):
    """Bad input (an option, a file, a model, a checkpoint) with a message that says what is wrong and what to do."""


Mode = Literal["lora", "qlora", "full"]
Optimizer = Literal["adamw", "adamw8bit"]
Checkpointing = Literal["off", "on", "offload"]
CudaGraphs = Literal["auto", "on", "off"]
Dtype = Literal["bf16", "fp16", "fp32"]
Memory = Literal["fast", "low"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]
MODES: tuple[str, ...] = typing.get_args(Mode)
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)
# Settings a resumed run may change when --resume-changed names them (the optimizer's learning rate, weight decay
# and schedule are re-applied after loading; dtype only changes the compute precision).
RESUME_CHANGEABLE: tuple[str, ...] = (
    "lr",
    "max_steps",
    "epochs",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "max_grad_norm",
    "dtype",
)


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Everything ``train run`` needs, as one frozen value (see each field's help)."""

    shards: str = option(help="Shard set made by `prep pack` (a folder with manifest.json).", positional=True)
    model: str | None = option(
        None,
        help="Local Hugging Face folder (config.json + safetensors + tokenizer) or a hub id. "
        "Default: a tiny randomly initialised model sized to the shards' tokenizer (CPU demo).",
    )
    output: str | None = option(
        None,
        help="Output folder: adapter/model, checkpoints/, metrics.jsonl. Default: runs/train-<time>. It must be new, "
        "empty, or a padless run (see --resume, --overwrite); never the working directory or a folder holding an "
        "input.",
    )
    mode: Mode = option("lora", help="Fine-tuning mode:", switch=True)
    lora_r: int = option(16, help="LoRA rank r.")
    lora_alpha: int = option(16, help="LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = option(0.0, help="Dropout on the LoRA input (0 = none).")
    target_modules: str | None = option(
        None, help="Comma-separated module names to put LoRA on (default: all linear projections).", comma_list=True
    )
    tokens_per_micro_batch: int | Literal["auto"] = option(
        0,
        help="Token budget of one micro-batch, filled with whole packs (0 = the shards' max_len). Packs are never "
        "split, so it must be at least the longest pack. auto: the fastest number of packs (max_len x 1, 2, 4, ... "
        "up to 256 packs or 1M tokens) whose peak `train plan` predicts fits --max-memory-gib; a resumed run keeps "
        "its checkpoint's budget.",
    )
    max_memory_gib: float | None = option(
        None,
        help="GPU memory the predicted peak of --tokens-per-micro-batch auto may reach, GiB (default on CUDA: the "
        "card's total less 1 GiB of headroom). On CPU auto needs it and only sizes as for a GPU of that memory: the "
        "process's own memory is not what `train plan` predicts.",
    )
    grad_accum: int = option(1, help="Micro-batches per optimizer step (per rank).")
    lr: float = option(2e-4, help="Peak learning rate (after warm-up).")
    weight_decay: float = option(0.0, help="AdamW weight decay (matrices only; norms and biases never decay).")
    warmup_steps: int = option(0, help="Linear warm-up steps from 0 to --lr, then cosine decay.")
    min_lr_ratio: float = option(
        0.0,
        help="Cosine floor as a fraction of --lr, reached as the run ends: one step after the last, as transformers' "
        "cosine schedule decays, so no step trains at the floor itself.",
    )
    max_grad_norm: float = option(1.0, help="Clip the global gradient norm to this (0 = no clipping).")
    epochs: int = option(1, help="Passes over the shard set (ignored when --max-steps > 0).")
    max_steps: int = option(0, help="Optimizer steps to run (0 = run --epochs epochs).")
    seed: int = option(0, help="Seed for the data order, the tiny model's init, LoRA init and dropout.")
    optimizer: Optimizer = option(
        "adamw", help="adamw: torch AdamW (fused on CUDA); adamw8bit: bitsandbytes 8-bit AdamW (CUDA only)."
    )
    checkpointing: Checkpointing = option(
        "off",
        help="Gradient checkpointing: off, on (recompute layers in backward), offload (also keep the checkpointed "
        "hidden states in pinned CPU memory).",
    )
    checkpoint_gpu_gib: float = option(
        0.0,
        help="With --checkpointing offload: GPU memory in GiB for checkpoints kept on the GPU. The top layers (or "
        "segments, with --checkpoint-layers) whose checkpoints fit stay there, the ones below go to pinned host "
        "memory (0 = all to the host). The backward walks top down, so it starts without waiting for a copy, and the "
        "first copy back has those layers' time.",
    )
    checkpoint_layers: int = option(
        1,
        help="With --checkpointing on/offload: layers per checkpoint. 1 keeps every layer's input; N keeps the input "
        "of every N-th layer only (1/N of the checkpoint memory, on the GPU or the host), and the backward recomputes "
        "the layers of such a segment from it, each layer's own recompute nested inside: (N-1)/N more layer "
        "forwards. For very long sequences, whose checkpoints would not fit GPU and host together. Not with "
        "--keep-attention.",
    )
    host_mem_gib: float | None = option(
        None,
        help="Host memory the pinned checkpoints of --checkpointing offload (and --memory low's vocabulary) may "
        "take, GiB, checked before the first step (default: what the host has available now, MemAvailable within "
        "the container's limit). Give it where the host can give more than it reports now, e.g. a VM whose memory "
        "grows as it is used.",
    )
    keep_attention: bool = option(
        False,
        help="With --checkpointing on/offload: keep each layer's attention output and log-sum-exp with its "
        "checkpoint, so that the backward's recompute skips the attention forward (the dominant cost of long "
        "sequences). Costs tokens x heads x (head_dim x dtype bytes + 4) bytes more per layer, kept where the "
        "layer's checkpoint is (GPU or host).",
    )
    memory: Memory = option(
        "fast",
        help="fast: everything on the GPU, tuned for speed. low: the smallest GPU footprint on one GPU (the same "
        "forward and backward; only the AdamW state is 8-bit): "
        "the frozen embedding and lm_head stay in host memory (the loss streams the lm_head), every layer is "
        "checkpointed (--checkpointing off becomes on, and offload above 2048 tokens per micro-batch), AdamW state "
        "is 8-bit on CUDA (--optimizer adamw becomes adamw8bit) and the MLP runs in tiles of 4096 tokens (unless "
        "--mlp-tile-tokens is given); micro-batches whose layer inputs stay on the GPU still run as CUDA graphs "
        "(--full keeps its trainable embedding and lm_head on the GPU). `train plan --memory low` predicts it.",
    )
    mlp_tile_tokens: int = option(
        0,
        help="Run each decoder layer's MLP N tokens at a time, forward and backward, when a micro-batch holds more "
        "than N tokens (0 = whole micro-batch): the MLP's (tokens x intermediate size) tensors then scale with N, "
        "not with the micro-batch; for long sequences in little memory. One process only.",
    )
    cuda_graphs: CudaGraphs = option(
        "auto",
        help="Replay each micro-batch's forward+backward as one CUDA graph (removes the per-kernel host cost that "
        "bounds small steps): auto (on for a single CUDA process with --checkpointing off/on, --checkpoint-layers "
        "1, LoRA dropout 0 and a patched architecture; falls back to eager with a warning if capture fails), on "
        "(fail instead), off.",
    )
    eval_shards: str | None = option(
        None, help="Held-out shard set for eval_loss. Default: SHARDS/eval when `prep pack --eval-fraction` wrote it."
    )
    eval_every: int = option(0, help="Evaluate every N steps (0 = only after the last step; -1 = never).")
    save_every: int = option(0, help="Write a checkpoint every N steps (0 = none; the final output is always written).")
    keep_last: int = option(
        0,
        help="Keep only the newest N checkpoints: older checkpoints/step-* folders are deleted once a new one is "
        "complete (0 = keep all).",
    )
    resume: bool = option(
        False,
        help="Continue exactly from the latest checkpoint in --output (from step 0, with a note, when the run "
        "wrote none). The run's settings must be the same, except those named in --resume-changed.",
    )
    resume_changed: str | None = option(
        None,
        help="Comma-separated settings that may differ from the resumed run's: "
        + ", ".join(RESUME_CHANGEABLE)
        + ". The shards, model, mode, LoRA settings, token budget, grad-accum, world size, seed and optimizer "
        "never may.",
        comma_list=True,
    )
    overwrite: bool = option(
        False,
        help="Replace the run in --output: only a folder that a padless run wrote (padless-run.json) and that holds "
        "nothing else.",
    )
    force: bool = option(
        False,
        help="Train even if the shards' tokenizer is not the model's (token ids beyond the model's embedding are "
        "refused all the same).",
    )
    dtype: Dtype | None = option(None, help="Compute dtype (default: bf16 on GPU, fp32 on CPU).")
    device: str | None = option(None, help="Device (default: cuda:LOCAL_RANK when CUDA is available, else cpu).")
    family: FamilyName = option("llama", help="Architecture of the random model built without --model.")
    model_overrides: str | None = option(
        None,
        help="Config fields (a JSON object, or a .json file) for the random model built without --model, e.g. a "
        "real model's shape for a benchmark without downloading weights (a random base over 1B parameters is not "
        "saved).",
        json_object=True,
    )
    fsdp: bool = option(False, help="Shard the model with FSDP2 (fully_shard) instead of DDP on several GPUs.")
    report_to: str | None = option(
        None,
        help="Also log the metrics.jsonl scalars and the run config to these trackers (comma list, any of "
        + ", ".join(TRACKERS)
        + "; default none: metrics.jsonl only). tensorboard writes OUTPUT/tensorboard/; wandb writes OUTPUT/wandb/ "
        "(WANDB_MODE=offline keeps it local; WANDB_PROJECT, default padless); mlflow logs to MLFLOW_TRACKING_URI, "
        "default sqlite:///OUTPUT/mlflow.db (MLFLOW_EXPERIMENT_NAME, default padless). Needs "
        "`pip install 'padless[trackers]'`.",
        comma_list=True,
    )
    log_every: int = option(1, help="Refresh the progress bar (or print a line when not on a terminal) every N steps.")
    progress: bool = option(True, help="Show a progress bar.")

    def __post_init__(self) -> None:
        check_fields(self, TrainError)
        checks = [
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.lora_r >= 1, f"--lora-r must be >= 1, got {self.lora_r}"),
            (
                self.lora_alpha > 0,
                f"--lora-alpha must be > 0, got {self.lora_alpha}: the LoRA update is scaled by alpha / r, so 0 trains "
                "nothing and a negative value flips the update",
            ),
            (
                self.target_modules is None or bool(self.target_module_list),
                f"--target-modules {self.target_modules!r} names no module; give comma-separated names, e.g. "
                "q_proj,v_proj, or leave it out for all linear projections",
            ),
            (0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (
                self.tokens_per_micro_batch == "auto" or self.tokens_per_micro_batch >= 0,
                f"--tokens-per-micro-batch must be >= 0 or auto, got {self.tokens_per_micro_batch}",
            ),
            (
                self.max_memory_gib is None or 0 < self.max_memory_gib < math.inf,
                f"--max-memory-gib must be > 0 GiB and finite, got {self.max_memory_gib}",
            ),
            (
                self.host_mem_gib is None or 0 < self.host_mem_gib < float("inf"),
                f"--host-mem-gib must be > 0 GiB, got {self.host_mem_gib}",
            ),
            (
                self.max_memory_gib is None or self.tokens_per_micro_batch == "auto",
                f"--max-memory-gib only sizes --tokens-per-micro-batch auto, and the budget is "
                f"{self.tokens_per_micro_batch}; pass --tokens-per-micro-batch auto or drop --max-memory-gib",
            ),
            (0 < self.lr < math.inf, f"--lr must be > 0 and finite, got {self.lr}"),
            (0 <= self.weight_decay < math.inf, f"--weight-decay must be >= 0 and finite, got {self.weight_decay}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}"),
            (self.epochs >= 1 or self.max_steps > 0, f"--epochs must be >= 1, got {self.epochs}"),
            (self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.eval_every >= -1, f"--eval-every must be >= -1 (-1 = never), got {self.eval_every}"),
            (self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}"),
            (self.keep_last >= 0, f"--keep-last must be >= 0 (0 = keep all), got {self.keep_last}"),
            (
                self.keep_last == 0 or self.save_every > 0,
                f"--keep-last {self.keep_last} keeps the newest checkpoints, and this run writes none (--save-every "
                "0); pass --save-every N to write a checkpoint every N steps, or leave out --keep-last",
            ),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            # numpy's generators (the data order) take no negative seed, torch.manual_seed none past 2^64 - 1.
            (0 <= self.seed < 2**64, f"--seed must be in [0, 2^64 - 1], got {self.seed}"),
            (
                0 <= self.checkpoint_gpu_gib < math.inf,
                f"--checkpoint-gpu-gib must be >= 0 (0 = all checkpoints to the host) and finite, got "
                f"{self.checkpoint_gpu_gib}",
            ),
            (
                self.checkpoint_gpu_gib == 0 or self.checkpointing == "offload",
                f"--checkpoint-gpu-gib splits offloaded checkpoints between GPU and host; it needs --checkpointing "
                f"offload (got --checkpointing {self.checkpointing})",
            ),
            (self.checkpoint_layers >= 1, f"--checkpoint-layers must be >= 1, got {self.checkpoint_layers}"),
            (
                self.checkpoint_layers == 1 or self.checkpointing != "off" or self.memory == "low",
                "--checkpoint-layers groups layers under one checkpoint; it needs --checkpointing on or offload (or "
                "--memory low, which checkpoints every run)",
            ),
            (
                self.checkpoint_layers == 1 or not self.keep_attention,
                "--checkpoint-layers with --keep-attention: a kept attention output belongs to one layer's "
                "checkpoint; use --checkpoint-layers 1 to keep attention, or leave --keep-attention out",
            ),
            (
                self.checkpoint_layers == 1 or not self.fsdp,
                "--checkpoint-layers with --fsdp: a segment's recompute would gather its layers' shards once more; "
                "use --checkpoint-layers 1",
            ),
            (
                not self.keep_attention or self.checkpointing != "off",
                "--keep-attention keeps the attention output with each layer's checkpoint; it needs --checkpointing "
                "on or offload",
            ),
            (
                self.mlp_tile_tokens >= 0,
                f"--mlp-tile-tokens must be >= 0 (0 = untiled, N = tiles of N tokens), got {self.mlp_tile_tokens}",
            ),
            (
                not (self.mlp_tile_tokens and self.fsdp),
                "--mlp-tile-tokens with --fsdp: the tiled MLP's backward accumulates each weight's gradient once per "
                "tile, which FSDP2's gradient reduction does not expect; use --mlp-tile-tokens 0",
            ),
            (self.shards != "", "SHARDS is empty; expected the folder `prep pack` wrote"),
            (not (self.resume and self.output is None), "--resume needs --output: the folder of the run to continue"),
            (
                not (self.resume and self.overwrite),
                "--resume continues the run in --output and --overwrite replaces it; pass one of them",
            ),
            (
                self.resume or not self.resume_changed,
                "--resume-changed names settings a resumed run may change; it needs --resume",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)
        unknown = [name for name in self.resume_changed_set if name not in RESUME_CHANGEABLE]
        if unknown:
            raise TrainError(
                f"--resume-changed {','.join(unknown)}: not a setting a resumed run may change; allowed: "
                f"{', '.join(RESUME_CHANGEABLE)}"
            )

        unknown = [name for name in self.report_to_list if name not in TRACKERS]
        empty = self.report_to is not None and not self.report_to_list and self.report_to.strip().lower() != "none"
        if unknown or empty:
            what = f"unknown tracker {', '.join(map(repr, unknown))}" if unknown else "no tracker named"
            raise TrainError(
                f"--report-to {self.report_to!r}: {what}; expected a comma list of {', '.join(TRACKERS)}, or none"
            )

    @property
    def report_to_list(self) -> tuple[str, ...]:
        """``--report-to`` as tracker names, in the given order without repeats (``none`` = no tracker)."""
        names = [n.strip().lower() for n in (self.report_to or "").split(",") if n.strip()]
        return tuple(dict.fromkeys(n for n in names if n != "none"))

    @property
    def resume_changed_set(self) -> frozenset[str]:
        """``--resume-changed`` as setting names (``max-steps`` and ``max_steps`` both name ``max_steps``)."""
        if not self.resume_changed:
            return frozenset()
        return frozenset(n.strip().lstrip("-").replace("-", "_") for n in self.resume_changed.split(",") if n.strip())

    @property
    def target_module_list(self) -> list[str] | None:
        """``--target-modules`` split on commas (None = the adapter code's default, all linear projections)."""
        if not self.target_modules:
            return None
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


def _comma_list(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "nothing named"
        raise TrainError(f"{flag} {text!r}: {what}; expected a comma list of {', '.join(allowed)}")
    return names


@dataclass(kw_only=True, frozen=True)
class PlanConfig:
    """Everything ``train plan`` needs: the model, the shards, and which settings to predict."""

    shards: str = option(help="Shard set made by `prep pack` (its pack lengths set the attention's share).",
                         positional=True)  # fmt: skip
    model: str | None = option(
        None, help="Local Hugging Face folder or hub id: only its config.json is read (no weights)."
    )
    family: FamilyName = option("llama", help="Architecture of the random model (without --model).")
    model_overrides: str | None = option(
        None,
        help="Config fields (a JSON object, or a .json file) of the random model (without --model).",
        json_object=True,
    )
    gpu_mem_gib: float | None = option(
        None, help="GPU memory to plan for, GiB (default: this machine's GPU; none: nothing is marked as fitting)."
    )
    host_mem_gib: float | None = option(
        None, help="Host memory for offloaded checkpoints, GiB (default: what this machine has available)."
    )
    modes: str = option("lora,qlora,full", help="Comma list of modes to predict: lora, qlora, full.")
    tokens: str = option(
        "auto", help="Comma list of tokens per micro-batch (auto: powers of two from the shards' max_len to 64K)."
    )
    checkpointing: str = option("off,on,offload", help="Comma list of checkpointing modes: off, on, offload.")
    lora_r: int = option(16, help="LoRA rank r.")
    optimizer: Optimizer = option("adamw", help="adamw or adamw8bit (8-bit moments).")
    memory: Memory = option(
        "fast", help="fast, or low as `train run --memory low` (frozen embedding and lm_head in host memory)."
    )
    mlp_tile_tokens: int = option(0, help="As `train run --mlp-tile-tokens`: the MLP in tiles of N tokens (0 = whole).")
    keep_attention: bool = option(
        False, help="As `train run --keep-attention`: checkpoints also keep each layer's attention output."
    )
    checkpoint_gpu_gib: float = option(
        0.0, help="As `train run --checkpoint-gpu-gib`: offloaded checkpoints keep this many GiB on the GPU."
    )
    checkpoint_layers: int = option(
        1, help="As `train run --checkpoint-layers`: layers per checkpoint (checkpointed settings only)."
    )
    dtype: Dtype = option("bf16", help="Compute dtype of the base model.")
    json: bool = option(False, help="Print the predictions as JSON lines instead of a table.")

    def __post_init__(self) -> None:
        check_fields(self, TrainError)
        self.mode_list  # noqa: B018 (validates)
        self.checkpointing_list  # noqa: B018
        if self.lora_r < 1:
            raise TrainError(f"--lora-r must be >= 1, got {self.lora_r}")
        for flag, value in (("--gpu-mem-gib", self.gpu_mem_gib), ("--host-mem-gib", self.host_mem_gib)):
            if value is not None and not 0 < value < math.inf:
                raise TrainError(f"{flag} must be > 0 GiB and finite, got {value}")
        if self.mlp_tile_tokens < 0:
            raise TrainError(f"--mlp-tile-tokens must be >= 0 (0 = untiled), got {self.mlp_tile_tokens}")
        if not 0 <= self.checkpoint_gpu_gib < float("inf"):
            raise TrainError(f"--checkpoint-gpu-gib must be >= 0 GiB, got {self.checkpoint_gpu_gib}")
        if self.checkpoint_layers < 1:
            raise TrainError(f"--checkpoint-layers must be >= 1, got {self.checkpoint_layers}")
        if self.checkpoint_layers > 1 and self.keep_attention:
            raise TrainError(
                "--checkpoint-layers with --keep-attention: a kept attention output belongs to one layer's "
                "checkpoint; use --checkpoint-layers 1 to keep attention"
            )
        self.token_list  # noqa: B018

    @property
    def mode_list(self) -> tuple[str, ...]:
        return _comma_list(self.modes, MODES, "--modes")

    @property
    def checkpointing_list(self) -> tuple[str, ...]:
        return _comma_list(self.checkpointing, typing.get_args(Checkpointing), "--checkpointing")

    @property
    def token_list(self) -> tuple[int, ...] | None:
        """``--tokens`` as integers (None = auto)."""
        if self.tokens.strip().lower() == "auto":
            return None
        values = []
        for part in (p.strip() for p in self.tokens.split(",") if p.strip()):
            number = int(part[:-1]) * 1024 if part.lower().endswith("k") and part[:-1].isdigit() else None
            if number is None and part.isdigit():
                number = int(part)
            if not number:
                raise TrainError(f"--tokens {self.tokens!r}: {part!r} is not a token count (e.g. 4096 or 4k)")
            values.append(number)
        if not values:
            raise TrainError(f"--tokens {self.tokens!r}: expected auto or a comma list of token counts")
        return tuple(values)
