"""The host memory a run pins: the checkpoints of ``--checkpointing offload`` and ``--memory low``'s vocabulary.

A checkpointed layer keeps its input hidden states, T x hidden x dtype bytes, and with ``--keep-attention`` also
its attention output (T x H x head_dim x dtype bytes) and log-sum-exp (T x H x 4 bytes, fp32). With
``--checkpoint-gpu-gib`` the top layers whose checkpoints fit that budget stay on the GPU, the others go to pinned
host memory. On the host each saved tensor takes one buffer of the pinned pool (``PinnedPool``: rounded up to its
8 MiB granule), and torch's caching host allocator rounds every pinned block up to a power of two
(``CachingHostAllocator.h``, default ``pinned_max_round_threshold``): a 96K-token Qwen3-8B layer input of 768 MiB
pins 1 GiB. :func:`plan_offload` does this arithmetic for one micro-batch (also for a ``train plan``-style memory
account).

Beside the checkpoints, ``--memory low`` keeps a LoRA or QLoRA run's frozen input embedding and output head in
pinned host memory (``train.host_vocab``), one ``torch.empty(..., pin_memory=True)`` tensor each, which the same
allocator rounds up to a power of two: Qwen3-8B's untied pair of 1.16 GiB tensors pins 4 GiB.
:func:`vocab_host_bytes` counts it for ``train plan``, ``--tokens-per-micro-batch auto`` and the run alike.
:func:`check_run_host_memory` compares both with the host's available memory before the first step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig, TrainError

__all__ = [
    "GIB",
    "HOST_RESERVE",
    "CheckpointShape",
    "OffloadPlan",
    "available_host_bytes",
    "check_host_memory",
    "check_run_host_memory",
    "checkpoints_of",
    "format_bytes",
    "host_bytes_of",
    "keeps_vocab_on_host",
    "layers_on_gpu",
    "pinned_block_bytes",
    "plan_offload",
    "vocab_host_bytes",
    "vocab_params_of",
]

GIB = 2**30
MIB = 2**20
# Left free beside the pinned checkpoints for the rest of the process (Python, the CUDA driver's host memory, the
# prefetched batches) and the OS: past MemAvailable the kernel's OOM killer ends the run without a message.
HOST_RESERVE = 2 * GIB
LSE_BYTES = 4  # the log-sum-exp is fp32 whatever the compute dtype


@dataclass(frozen=True)
class CheckpointShape:
    """The model shapes that size one layer's checkpoint: ``layers`` checkpointed units (decoder layers, or segments
    of ``--checkpoint-layers`` layers), ``hidden`` size, ``heads`` query heads of ``head_dim``, and ``dtype_bytes``
    per element of the compute dtype."""

    layers: int
    hidden: int
    heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def of(cls, config: object, dtype: torch.dtype, checkpoint_layers: int = 1) -> CheckpointShape:
        """From a Hugging Face model config and the compute dtype; with ``checkpoint_layers`` (``--checkpoint-layers``)
        > 1 the units are segments of that many layers, one checkpoint each (``layers`` counts the segments).

        The sizes are the decoder's: a multimodal config (Gemma 3) keeps them in its ``text_config``, which
        ``get_text_config()`` returns (a plain config returns itself)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        units = checkpoints_of(int(text.num_hidden_layers), checkpoint_layers)
        return cls(units, hidden, heads, head_dim, torch.empty((), dtype=dtype).element_size())

    def tensor_bytes(self, tokens: int, keep_attention: bool) -> tuple[int, ...]:
        """Bytes of each tensor one layer's checkpoint keeps for ``tokens`` tokens (input; attention out, lse)."""
        layer_input = tokens * self.hidden * self.dtype_bytes
        if not keep_attention:
            return (layer_input,)
        return layer_input, tokens * self.heads * self.head_dim * self.dtype_bytes, tokens * self.heads * LSE_BYTES


def checkpoints_of(layers: int, checkpoint_layers: int) -> int:
    """How many checkpoints ``layers`` decoder layers keep in segments of ``checkpoint_layers`` (the last may be
    shorter)."""
    return -(-layers // max(checkpoint_layers, 1))


def pinned_block_bytes(nbytes: int, granule: int) -> int:
    """Host bytes one pinned-pool buffer of ``nbytes`` holds: the pool's granule, then torch's power of two."""
    pooled = -(-max(nbytes, 1) // granule) * granule
    return 1 << (pooled - 1).bit_length()


def layers_on_gpu(gpu_bytes: int, shape: CheckpointShape, tokens: int, keep_attention: bool) -> int:
    """How many (top) layers' checkpoints of ``tokens`` tokens fit in ``gpu_bytes``, at most every layer."""
    per_layer = sum(shape.tensor_bytes(tokens, keep_attention))
    return min(shape.layers, gpu_bytes // per_layer) if per_layer else shape.layers


@dataclass(frozen=True)
class OffloadPlan:
    """Where one micro-batch's checkpoints go: the top ``gpu_layers`` on the GPU (``gpu_bytes``), the
    ``host_layers`` below in pinned host memory (``host_bytes`` over all ``processes`` on the host, rounding
    included; ``host_layer_bytes`` per layer and process). ``layer_bytes``: one layer's checkpoint, unrounded."""

    tokens: int
    layer_bytes: int
    gpu_layers: int
    host_layers: int
    gpu_bytes: int
    host_layer_bytes: int
    host_bytes: int
    processes: int

    def gpu_gib_for(self, host_budget: int) -> float | None:
        """The smallest ``--checkpoint-gpu-gib`` (to 0.1 GiB) with which the host part fits ``host_budget`` bytes;
        None when even every layer on the GPU leaves too little (``host_budget`` < 0)."""
        if host_budget < 0:
            return None
        layers = self.gpu_layers + self.host_layers
        host_per_layer = self.host_layer_bytes * self.processes
        fit = host_budget // host_per_layer if host_per_layer else layers
        gpu_layers = max(layers - fit, 0)
        return -(-gpu_layers * self.layer_bytes * 10 // GIB) / 10


def plan_offload(
    shape: CheckpointShape,
    tokens: int,
    *,
    keep_attention: bool = False,
    gpu_budget_bytes: int = 0,
    granule: int = 8 * 2**20,
    processes: int = 1,
) -> OffloadPlan:
    """The split of a ``tokens``-token micro-batch's checkpoints under a GPU budget of ``gpu_budget_bytes``
    (``--checkpoint-gpu-gib``), with the host bytes of ``processes`` ranks on one host, each with its own pool of
    ``granule``-byte buffers."""
    if tokens < 0 or gpu_budget_bytes < 0 or processes < 1 or granule < 1:
        raise ValueError(
            f"tokens={tokens}, gpu_budget_bytes={gpu_budget_bytes}, processes={processes}, granule={granule}: "
            "expected tokens >= 0, a budget >= 0, processes >= 1 and granule >= 1."
        )
    sizes = shape.tensor_bytes(tokens, keep_attention)
    on_gpu = layers_on_gpu(gpu_budget_bytes, shape, tokens, keep_attention)
    host_layers = shape.layers - on_gpu
    host_layer = sum(pinned_block_bytes(n, granule) for n in sizes)
    return OffloadPlan(
        tokens=tokens,
        layer_bytes=sum(sizes),
        gpu_layers=on_gpu,
        host_layers=host_layers,
        gpu_bytes=on_gpu * sum(sizes),
        host_layer_bytes=host_layer,
        host_bytes=host_layers * host_layer * processes,
        processes=processes,
    )


def keeps_vocab_on_host(memory: str, mode: str) -> bool:
    """Whether ``--memory`` ``memory`` keeps a ``mode`` (lora | qlora | full) run's vocabulary in host memory: under
    low, unless full fine-tuning trains it (``train.host_vocab`` leaves a trainable embedding or head on the GPU)."""
    return memory == "low" and mode != "full"


def vocab_host_bytes(memory: str, mode: str, vocab_params: tuple[int, ...], dtype_bytes: int) -> int:
    """Host bytes a setting keeps beside its checkpoints: ``--memory low``'s frozen vocabulary when
    :func:`keeps_vocab_on_host`, else 0. ``vocab_params`` holds the values of each tensor it moves
    (:func:`vocab_params_of`), ``dtype_bytes`` each; every tensor is one pinned block, rounded up to a power of two
    (:func:`pinned_block_bytes` without a pool). One count for ``train plan``, ``--tokens-per-micro-batch auto`` and
    the run's check, so what plan says fits, runs."""
    if not keeps_vocab_on_host(memory, mode):
        return 0
    return sum(pinned_block_bytes(n * dtype_bytes, 1) for n in vocab_params)


def vocab_params_of(model: nn.Module) -> tuple[int, ...]:
    """Values of each tensor ``--memory low`` moves to host memory: the input embedding's weight, and the output
    head's when it has one of its own (a tied pair, or a model without a head, counts the embedding only). Shapes
    only, so a model on the meta device, on the GPU or with its vocabulary moved already counts the same."""
    embedding = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)  # None: no head (get_output_embeddings() None)
    return (embedding.numel(),) if head is None or head is embedding else (embedding.numel(), head.numel())


def format_bytes(nbytes: int, digits: int = 2) -> str:
    """``nbytes`` for a message, with ``digits`` decimals: in GiB, below 1 GiB in MiB and below 1 MiB in KiB, so that a
    small vocabulary or checkpoint reads "64.00 MiB" rather than "0.06 GiB" (or "0.00 GiB")."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (2**10, "KiB")):
        if nbytes >= unit:
            return f"{nbytes / unit:.{digits}f} {name}"
    return f"{nbytes} byte{'' if nbytes == 1 else 's'}"


def _meminfo_available(path: Path) -> int | None:
    for line in path.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def _cgroup_available(root: Path) -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), when it has a limit."""
    limit, current = root / "memory.max", root / "memory.current"
    if not (limit.exists() and current.exists()):
        return None
    text = limit.read_text().strip()
    if text == "max":
        return None
    return max(int(text) - int(current.read_text().strip()), 0)


def available_host_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Host memory this process can still take: the kernel's MemAvailable, lowered to the cgroup's remaining
    limit inside a container that has one; None where neither can be read (not Linux)."""
    values = []
    if meminfo.exists():
        values.append(_meminfo_available(meminfo))
    values.append(_cgroup_available(cgroup))
    known = [v for v in values if v is not None]
    return min(known) if known else None


def host_bytes_of(cfg: object) -> int | None:
    """The host memory a run may use: its ``host_mem_gib`` (``--host-mem-gib``) when given, else what the host has
    available now (:func:`available_host_bytes`)."""
    given = getattr(cfg, "host_mem_gib", None)
    return int(given * GIB) if given is not None else available_host_bytes()


def check_host_memory(
    plan: OffloadPlan | None,
    available: int | None,
    reserve: int = HOST_RESERVE,
    checkpoint_layers: int = 1,
    vocab_bytes: int = 0,
) -> None:
    """Raise :class:`TrainError` when ``plan``'s pinned host bytes (None: nothing offloaded) and ``vocab_bytes``
    (:func:`vocab_host_bytes`) together do not fit ``available`` less ``reserve``.

    The message names the numbers and the ways out: a smaller micro-batch, ``--checkpointing on``, more layers on
    the GPU (the ``--checkpoint-gpu-gib`` that would fit beside the vocabulary), twice the run's
    ``checkpoint_layers`` when that halves the host part enough, ``--memory fast`` when the checkpoints alone fit,
    or ``--qlora`` to free GPU memory for them. A vocabulary that does not fit by itself gets its own message.
    ``available`` None (unknown) or nothing to pin: no check.
    """
    budget = (available or 0) - reserve
    checkpoints = plan.host_bytes if plan is not None else 0
    if available is None or checkpoints + vocab_bytes <= max(budget, 0):  # nothing pinned: nothing to check
        return
    host = f"the host has {format_bytes(available, 1)} available ({reserve / GIB:g} GiB of it kept free)"
    more = "--host-mem-gib N where the host can give more than it has available now"
    vocab = format_bytes(vocab_bytes)
    if plan is None or not checkpoints or vocab_bytes > max(budget, 0):  # the vocabulary alone does not fit
        raise TrainError(
            f"--memory low keeps {vocab} of frozen vocabulary (embedding and lm_head) in pinned host memory, but "
            f"{host}. Use --memory fast to keep it on the GPU (or {more})"
        )
    ranks = f" x {plan.processes} processes" if plan.processes > 1 else ""
    unit = "layer" if checkpoint_layers == 1 else f"segment of {checkpoint_layers} layers"
    units = "layers" if checkpoint_layers == 1 else f"segments of {checkpoint_layers} layers"
    room = budget - vocab_bytes  # what the checkpoints may take beside the vocabulary
    gpu_gib = plan.gpu_gib_for(room)
    on_gpu = f", keep more checkpoints on the GPU with --checkpoint-gpu-gib {gpu_gib:g}" if gpu_gib else ""
    halved = -(-plan.host_layers // 2) * plan.host_layer_bytes * plan.processes
    fewer = f", a checkpoint per {2 * checkpoint_layers} layers (--checkpoint-layers {2 * checkpoint_layers})"
    beside = f", and --memory low {vocab} for the frozen vocabulary (embedding and lm_head)" if vocab_bytes else ""
    fast = ", --memory fast to keep the vocabulary on the GPU" if vocab_bytes and checkpoints <= budget else ""
    raise TrainError(
        f"--checkpointing offload needs {format_bytes(checkpoints, 1)} of pinned host memory for the checkpoints "
        f"of {plan.host_layers} {units} at {plan.tokens} tokens per micro-batch ({format_bytes(plan.host_layer_bytes)} "
        f"a {unit}{ranks}){beside}, but {host}. Use a smaller --tokens-per-micro-batch, --checkpointing on"
        f"{on_gpu}{fewer if halved <= room else ''}{fast}, or --qlora to free GPU memory for them (or {more})"
    )


def check_run_host_memory(
    cfg: TrainConfig,
    config: object,
    dtype: torch.dtype,
    budget: int,
    *,
    device: torch.device | str,
    vocab_params: tuple[int, ...],
) -> None:
    """A :class:`TrainError` before the first step if the host cannot hold what the run pins there: with
    ``--checkpointing offload`` the offloaded checkpoints of a full micro-batch of ``budget`` tokens (``config``: the
    Hugging Face model config; every process of this host, torchrun's ``LOCAL_WORLD_SIZE``, pins its own), and with
    ``--memory low`` on a CUDA ``device`` the vocabulary, ``vocab_params`` values in each tensor it moves
    (:func:`vocab_params_of`; counted from its shapes, so once whether or not it has moved yet), as ``train plan``
    counts them. On the CPU ``train.host_vocab`` moves nothing: the vocabulary stays where the model loaded it, and
    the run pins nothing for it."""
    if torch.device(device).type != "cuda":  # host_vocab pins only a vocabulary that is on a CUDA device
        vocab_params = ()
    vocab_bytes = vocab_host_bytes(cfg.memory, cfg.mode, vocab_params, torch.empty((), dtype=dtype).element_size())
    if cfg.checkpointing != "offload" and not vocab_bytes:
        return
    plan = None
    if cfg.checkpointing == "offload":
        plan = plan_offload(
            CheckpointShape.of(config, dtype, cfg.checkpoint_layers),
            budget,
            keep_attention=cfg.keep_attention,
            gpu_budget_bytes=int(cfg.checkpoint_gpu_gib * GIB),
            processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )
    check_host_memory(plan, host_bytes_of(cfg), checkpoint_layers=cfg.checkpoint_layers, vocab_bytes=vocab_bytes)
