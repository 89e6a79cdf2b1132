"""``--tokens-per-micro-batch auto``: the micro-batch token budget that ``train plan`` predicts fits this run.

The candidates are whole numbers of packs, max_len x 1, 2, 4, ... up to 256 packs or 1M tokens (a micro-batch holds
whole packs, and every pack fits in max_len). Each is predicted by :func:`padless.train.plan.estimate` for the
run's own setting: its mode, checkpointing, LoRA rank and targets, optimizer and dtype, the model's shapes from its
config on the meta device, and the shards' attention work. The choice is the fastest of them (plan's tokens/s)
whose predicted peak fits the memory available, and, under ``--checkpointing offload``, whose offloaded layer
inputs fit the host's available memory less the reserve that ``train run``'s host check keeps free
(``offload_budget.HOST_RESERVE``, as ``train plan`` counts it); plan's step time falls per token as the micro-batch
grows, so that is the largest that fits (a tie goes to the larger).

The memory available is ``--max-memory-gib``, else the CUDA card's total less plan's headroom; CPU memory is not
what plan predicts, so on CPU auto needs ``--max-memory-gib``. Under FSDP the prediction is that of one unsharded
process: on the safe side. A resumed run keeps the budget its checkpoint was written with, since the data order
depends on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, read_checkpoint_settings
from .config import TrainConfig, TrainError
from .memory_setting import low_memory_checkpointing
from .offload_budget import HOST_RESERVE, format_bytes, host_bytes_of, keeps_vocab_on_host
from .plan import Estimate, ModelInventory, Setting, estimate, plan_inputs, recommend, usable_bytes

__all__ = ["MAX_PACKS", "MAX_TOKENS", "AutoBudget", "Memory", "auto_budget", "available_memory", "candidates", "choose"]

MAX_PACKS = 256  # the largest candidate: this many packs, or MAX_TOKENS, whichever is smaller
MAX_TOKENS = 1 << 20
_GIB = 2**30


@dataclass(frozen=True)
class Memory:
    """Bytes the predicted peak may reach, and where the number comes from (for messages)."""

    bytes: int
    source: str


@dataclass(frozen=True)
class AutoBudget:
    """What auto chose: the token budget, the line the run prints, and the predicted peak (None when resumed)."""

    tokens: int
    note: str
    predicted_peak: int | None = None


def candidates(max_len: int) -> tuple[int, ...]:
    """max_len x 1, 2, 4, ... up to ``MAX_PACKS`` packs or ``MAX_TOKENS`` tokens (max_len itself always)."""
    out, packs = [max_len], 2
    while packs <= MAX_PACKS and packs * max_len <= MAX_TOKENS:
        out.append(packs * max_len)
        packs *= 2
    return tuple(out)


def available_memory(max_memory_gib: float | None, device: torch.device) -> Memory:
    """``--max-memory-gib``, else the CUDA card's total less plan's headroom; a TrainError on a device without."""
    if max_memory_gib is not None:
        return Memory(int(max_memory_gib * _GIB), f"--max-memory-gib {max_memory_gib:g}")
    if device.type != "cuda":
        raise TrainError(
            f"--tokens-per-micro-batch auto sizes the micro-batch by a GPU's memory, and device {device} has none to "
            "read: pass a number (e.g. --tokens-per-micro-batch 4096) or --max-memory-gib N"
        )
    total = torch.cuda.get_device_properties(device).total_memory
    usable = usable_bytes(total)
    return Memory(usable, f"{device}'s {total / _GIB:.1f} GiB less {(total - usable) / _GIB:g} GiB of headroom")


def choose(
    inv: ModelInventory,
    setting: Setting,
    memory: Memory,
    *,
    sum_sq_per_token: float,
    host_bytes: int | None = None,
    cuda_graphs: str = "auto",
) -> Estimate:
    """The estimate auto picks for ``setting`` (its ``tokens`` = the shards' max_len, the smallest candidate); a
    TrainError naming the predicted peak of one pack, the memory and the options when not even that fits. Under
    ``--memory low`` each candidate is planned with the checkpointing mode the run resolves for its size.
    ``host_bytes``: the host memory a candidate's pinned bytes may take (None: not checked)."""
    max_len = setting.tokens

    def at(tokens: int) -> Setting:
        checkpointing = setting.checkpointing
        if setting.memory == "low":
            checkpointing = low_memory_checkpointing(checkpointing, tokens, cuda_graphs)
        return dataclasses.replace(setting, tokens=tokens, checkpointing=checkpointing)

    estimates = [estimate(inv, at(t), sum_sq_per_token=sum_sq_per_token) for t in reversed(candidates(max_len))]
    best = recommend(estimates, memory.bytes, host_bytes)  # the first of equally fast ones: the larger
    if best is not None:
        return best
    one = estimates[-1]
    if one.load >= one.peak > memory.bytes:  # the load, not a step, is the peak: no step setting helps
        raise TrainError(
            f"--tokens-per-micro-batch auto: loading the model is predicted to peak at {one.load / _GIB:.2f} GiB "
            f"(every weight on the GPU before the step's settings apply), more than the {memory.bytes / _GIB:.2f} GiB "
            f"available ({memory.source}); try "
            + ("--qlora, " if setting.mode != "qlora" else "")
            + "a larger --max-memory-gib if the device has more to give"
        )
    if one.peak <= memory.bytes:  # the GPU would do; what it pins in host memory does not fit the host
        offloads = one.setting.checkpointing == "offload"  # --memory low keeps short packs' checkpoints on the GPU
        vocab = keeps_vocab_on_host(setting.memory, setting.mode)
        pinned = " and ".join([*(["the offloaded layer inputs"] if offloads else []),
                               *(["--memory low's vocabulary"] if vocab else [])])  # fmt: skip
        ways = [*(["--checkpointing on"] if offloads else []), *(["--memory fast"] if vocab else []),
                *(["a smaller --max-len at `prep pack`"] if offloads else [])]  # fmt: skip
        raise TrainError(
            f"--tokens-per-micro-batch auto: even one pack ({max_len} tokens) pins {format_bytes(one.host)} in host "
            f"memory ({pinned}), more than the {format_bytes(host_bytes or 0)} the host has for them; use "
            f"{', '.join(ways)}, or --host-mem-gib N where the host can give more than it has available now"
        )
    options = [
        "--checkpointing on or offload" if setting.checkpointing == "off" else "",
        "--checkpointing offload" if setting.checkpointing == "on" else "",
        "--qlora" if setting.mode != "qlora" else "",
        "a smaller --max-len at `prep pack`",
        "a larger --max-memory-gib if the device has more to give",
    ]
    raise TrainError(
        f"--tokens-per-micro-batch auto: even one pack ({max_len} tokens) is predicted to peak at "
        f"{one.peak / _GIB:.2f} GiB, more than the {memory.bytes / _GIB:.2f} GiB available ({memory.source}); try "
        + ", ".join(o for o in options if o)
    )


def _resumed_budget(cfg: TrainConfig, output: Path) -> AutoBudget | None:
    """The budget of the checkpoint ``--resume`` continues from, if there is one (and it holds every pack)."""
    if not cfg.resume or not output.is_dir():
        return None
    from padless.shards.reader import open_shards

    max_len = open_shards(cfg.shards).max_len
    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        return None
    tokens = read_checkpoint_settings(checkpoint).get("tokens_per_micro_batch")
    if not isinstance(tokens, int) or tokens < max_len:
        return None
    return AutoBudget(tokens, f"note: --tokens-per-micro-batch auto: {tokens} tokens, as in {checkpoint.name} of "
                              "the resumed run")  # fmt: skip


def auto_budget(
    cfg: TrainConfig,
    output: Path,
    device: torch.device,
    dtype_bytes: int,
    agree: Callable[[int], int] = lambda n: n,
) -> AutoBudget:
    """The token budget of ``cfg`` (``tokens_per_micro_batch == "auto"``) on ``device`` (see the module doc).

    ``agree`` maps this process's available bytes to the value every process uses (the least over ranks), so that
    all ranks choose the same budget."""
    resumed = _resumed_budget(cfg, output)
    if resumed is not None:
        return resumed
    memory = available_memory(cfg.max_memory_gib, device)
    memory = dataclasses.replace(memory, bytes=agree(memory.bytes))
    inv, max_len, sum_sq_per_token = plan_inputs(cfg)
    if cfg.mode != "full" and cfg.target_module_list:
        inv = dataclasses.replace(inv, lora_targets=tuple(cfg.target_module_list))
    setting = Setting.of_run(cfg, max_len, dtype_bytes)
    host = None
    if cfg.checkpointing == "offload" or cfg.memory == "low":
        available = host_bytes_of(cfg)  # what the host check before the first step allows them
        host = max(available - HOST_RESERVE, 0) if available is not None else None
    best = choose(inv, setting, memory, sum_sq_per_token=sum_sq_per_token, host_bytes=host, cuda_graphs=cfg.cuda_graphs)
    tokens = best.setting.tokens
    note = (
        f"note: --tokens-per-micro-batch auto: {tokens} tokens ({tokens // max_len} packs of {max_len}), predicted "
        f"peak {best.peak / _GIB:.2f} GiB of {memory.bytes / _GIB:.2f} GiB ({memory.source})"
    )
    return AutoBudget(tokens, note, best.peak)
