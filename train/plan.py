"""``train plan``: predict a run's peak GPU memory and step time from the model's config alone, before renting a GPU.

The model is built on the meta device (no weights read), which gives every parameter's shape; from those:

- **weights**: frozen parameters in the run's dtype; under QLoRA every linear layer but the output head in NF4
  (half a byte per value, a byte of double-quantized scale per 64 values, fp32 per 256 scales, two code books);
- **trainable**, **gradients**, **optimizer**: LoRA adapters in fp32 (r x (in + out) per targeted linear layer) or,
  for full fine-tuning, every parameter in the run's dtype; a gradient per trainable value; AdamW's two moments
  (8-bit AdamW: one byte each);
- **step**: what a step adds on top. Per token, with checkpointing ``on`` each layer keeps its input (hidden size x
  dtype) and one layer at a time holds its full activations while it is recomputed and differentiated; ``off``
  keeps every layer's activations; ``offload`` keeps the layer inputs in host memory (a layer or two in flight).
  The output head adds one chunk of logits and the hidden state's gradient (under ``--memory low`` the streamed
  loss's chunks and sums instead); QLoRA adds the dequantized weight of the largest projection (each projection's
  NF4 weight is dequantized for its GEMM and freed);
- **load**: while the model loads, every weight is on the GPU (a vocabulary bound for host memory too) and QLoRA
  quantizes each projection from bf16 there. The peak is the larger of the load and the step.

The per-token activation counts of one layer (``_LAYER_*``) are fitted to measured peaks, not derived: what
padless's fused layer keeps for its backward, and its backward's transient gradients, on a GPU. QLoRA projections
run the same frozen-LoRA function as LoRA ones (``train.lora_linear``) and keep the same. Against the nine rows of
the H100 memory table in docs/bench/README.md (Qwen3-8B bf16 LoRA at 16K; Qwen3-4B QLoRA at 2K/8K/32K, default and
``--memory low``; Qwen3-14B QLoRA at 4K) the predictions are within 5% (-1.8% to +4.9%), and against the
long-context rows there (Qwen3-8B shapes at 128K tokens, offloaded) within 5.4%.
``tools/bench_memory.py`` prints the prediction beside every case it measures.

Step time is the step's matmul FLOPs (``metrics.step_flop_model``, as ``train run`` counts them: the parameters a
text token passes through, so a MoE's top-k experts and no vision tower) at the model FLOP utilisation padless
reaches for that mode on Hopper (``_MFU``), lower for small micro-batches, whose fixed per-step costs weigh more
(``_HALF_TOKENS``), plus its attention at the varlen kernels' own measured rates, forward and backward apart and
per example length (``attention_rates``): below the matmuls' rate, they are most of a long sequence's step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from padless.kernels.cross_entropy import DEFAULT_CHUNK_BYTES
from padless.kernels.indexing import INT32_MAX
from padless.kernels.streamed_cross_entropy import DEFAULT_VOCAB_CHUNK_BYTES, DEFAULT_WORK_BYTES

from .adapters import DEFAULT_TARGETS
from .families import family_for_model_type
from .memory_setting import LOW_MEMORY_MLP_TILE, low_memory_choices
from .metrics import PEAK_BF16_FLOPS, active_matmul_params, step_flop_model
from .offload_budget import (
    GIB,
    HOST_RESERVE,
    CheckpointShape,
    checkpoints_of,
    host_bytes_of,
    keeps_vocab_on_host,
    plan_offload,
    vocab_host_bytes,
    vocab_params_of,
)

__all__ = [
    "Estimate",
    "ModelInventory",
    "Plan",
    "Setting",
    "as_row",
    "attention_rates",
    "estimate",
    "inventory",
    "model_config",
    "plan",
    "plan_inputs",
    "recommend",
    "shard_statistics",
    "usable_bytes",
]

# One decoder layer's activations per token, in values of the run's dtype, as multiples of the attention width
# Q (heads x head_dim, the width of q and of o_proj's input) and the MLP's intermediate size I.
_LAYER_SAVED_Q = 3.0  # checkpointing off: what each layer keeps for its backward (normed inputs, q, k, v, output)
_LAYER_SAVED_I = 3.0  # gate, up, activation
# One layer recomputed and differentiated (checkpointing on/offload): its saved activations and the transient
# gradients together. QLoRA projections run the same frozen-LoRA function as LoRA (the NF4 weight dequantized per
# GEMM and freed), so they keep the same.
_LAYER_WORK_Q = {"lora": 8.5, "full": 8.5, "qlora": 8.5}
_LAYER_WORK_I = 3.93
_OFFLOAD_LAYERS_IN_FLIGHT = 2  # offload: the layer being recomputed and the next one's prefetched input
_MFU = {"lora": 0.55, "qlora": 0.30, "full": 0.45}  # model FLOP utilisation per mode at large micro-batches
_HALF_TOKENS = 400  # a micro-batch of this many tokens reaches half of it (fixed per-step costs)
_PEAK_FLOPS = PEAK_BF16_FLOPS["H100"]  # Hopper, where _MFU was measured
# Useful FLOP/s of the attention kernels, forward and backward, on one sequence of each length (H100, head dim 128,
# 32 query and 8 key/value heads; docs/bench/README.md's attention table): a causal forward is 2 L^2 heads head_dim
# FLOPs, its backward 2.5 times that. Both lengths run the int32 offsets (the 512K sequence's q holds exactly 2**31
# elements); longer examples get the 512K rates. A pack whose q has more elements indexes with int64: its forward
# runs at _LONG_INDEX_FORWARD of the rate (438 against 479 TFLOP/s, measured at 512K and taken for every example
# length), its backward at the same rate.
_ATTENTION_RATES = ((131072, 496e12, 405e12), (524288, 479e12, 381e12))
_LONG_INDEX_FORWARD = 438 / 479
_NF4_BYTES_PER_VALUE = 0.5 + 1 / 64 + 4 / 64 / 256
_NF4_BYTES_PER_TENSOR = 2048


@dataclass(frozen=True)
class ModelInventory:
    """What the accounting needs from a model: its linear layers and the sizes of everything else."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    head_dim: int
    vocab: int
    matmul_params: int  # parameters a text token's matmuls use (``metrics.active_matmul_params``)
    linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of every linear layer but the output head
    other_params: int  # embeddings, head, norms, biases: values kept in the run's dtype
    lora_targets: tuple[str, ...]
    vocab_params: tuple[int, ...] = ()  # values of the input embedding and of an untied output head (vocab_params_of)


@dataclass(frozen=True)
class Setting:
    mode: str  # lora | qlora | full
    tokens: int  # tokens per micro-batch
    checkpointing: str  # off | on | offload
    lora_r: int = 16
    optimizer: str = "adamw"  # adamw | adamw8bit
    dtype_bytes: int = 2
    memory: str = "fast"  # fast | low (frozen vocabulary in host memory, the loss streams it)
    mlp_tile: int = 0  # --mlp-tile-tokens (0: --memory low's tile under low, else untiled)
    keep_attention: bool = False  # --keep-attention: each checkpoint also keeps its attention output and lse
    checkpoint_gpu_bytes: int = 0  # --checkpoint-gpu-gib: offloaded runs keep this much of the checkpoints on GPU
    checkpoint_layers: int = 1  # --checkpoint-layers: layers per checkpoint (on/offload)

    def __post_init__(self) -> None:
        if self.memory == "low" and self.mlp_tile == 0:  # --memory low tiles an MLP the user left untiled
            object.__setattr__(self, "mlp_tile", LOW_MEMORY_MLP_TILE)

    @classmethod
    def of_run(cls, cfg: Any, tokens: int, dtype_bytes: int) -> Setting:
        """The setting a ``train run`` configuration (:class:`~train.config.TrainConfig`) trains at ``tokens`` per
        micro-batch in a ``dtype_bytes`` compute dtype."""
        return cls(
            cfg.mode,
            tokens,
            cfg.checkpointing,
            cfg.lora_r,
            cfg.optimizer,
            dtype_bytes,
            cfg.memory,
            cfg.mlp_tile_tokens,
            keep_attention=cfg.keep_attention,
            checkpoint_gpu_bytes=int(cfg.checkpoint_gpu_gib * GIB),
            checkpoint_layers=cfg.checkpoint_layers,
        )

    def run_options(self) -> list[str]:
        """The ``train run`` options that run this setting (defaults left out): what ``train plan`` recommends must
        be the setting it predicted, tiles, kept attention and GPU share included."""
        low = self.memory == "low"
        out = [f"--{self.mode}", "--tokens-per-micro-batch", str(self.tokens), "--checkpointing", self.checkpointing]
        out += ["--lora-r", str(self.lora_r)] if self.mode != "full" and self.lora_r != Setting.lora_r else []
        out += ["--checkpoint-gpu-gib", f"{self.checkpoint_gpu_bytes / GIB:g}"] if self.checkpoint_gpu_bytes else []
        out += ["--checkpoint-layers", str(self.checkpoint_layers)] if self.checkpoint_layers > 1 else []
        out += ["--keep-attention"] if self.keep_attention else []
        out += ["--memory", "low"] if low else []
        out += (
            ["--mlp-tile-tokens", str(self.mlp_tile)]
            if self.mlp_tile and not (low and self.mlp_tile == LOW_MEMORY_MLP_TILE)
            else []
        )
        out += ["--optimizer", self.optimizer] if self.optimizer != Setting.optimizer and not low else []
        return out + (["--dtype", "fp32"] if self.dtype_bytes == 4 else [])


@dataclass(frozen=True)
class Estimate:
    setting: Setting
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    step: int
    host: int  # pinned host bytes (offloaded layer inputs, a vocabulary kept in host memory)
    step_s: float
    # While the model loads: every weight on the GPU (a vocabulary bound for host memory too) and the largest
    # projection in bf16 before NF4 quantizes it.
    load: int = 0

    @property
    def peak(self) -> int:
        return max(self.weights + self.trainable + self.gradients + self.optimizer + self.step, self.load)

    @property
    def tokens_per_s(self) -> float:
        return self.setting.tokens / self.step_s


_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def _check_sizes(text: PretrainedConfig) -> None:
    """The plan's per-token sizes come from a Llama-shaped decoder config: one that names them otherwise (GPT-2's
    ``n_inner``) is a TrainError, not an AttributeError."""
    from .config import TrainError

    missing = [key for key in _SIZES if not isinstance(getattr(text, key, None), int)]
    if missing:
        raise TrainError(
            f"train plan sizes decoders by {', '.join(_SIZES)}, and the config of model_type "
            f"{getattr(text, 'model_type', None)!r} gives no {', '.join(missing)}, so it cannot predict this model; "
            "with train run, give --tokens-per-micro-batch N instead of auto"
        )


def inventory(config: PretrainedConfig) -> ModelInventory:
    """The model of ``config`` built on the meta device: shapes only, nothing allocated. Weights count the whole
    model (a vision tower and every expert too); the per-token sizes are the decoder's (``config.get_text_config()``)
    and the FLOPs a text token's (a MoE's router, shared and top-k routed experts; no vision tower or projector)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    linears = tuple(
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head
    )
    linear_ids = {id(m.weight) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    seen: set[int] = set()
    other = 0
    for p in model.parameters():  # tied weights once
        if id(p) not in seen and id(p) not in linear_ids:
            seen.add(id(p))
            other += p.numel()
    known = family_for_model_type(getattr(config, "model_type", "")) is not None
    targets = DEFAULT_TARGETS if known else tuple(sorted({n.rsplit(".", 1)[-1] for n, _, _ in linears}))
    # The decoder's sizes: a multimodal config (Gemma 3) keeps them in its text_config.
    text = config.get_text_config()
    _check_sizes(text)
    heads = int(text.num_attention_heads)
    return ModelInventory(
        hidden=int(text.hidden_size),
        intermediate=int(text.intermediate_size),
        layers=int(text.num_hidden_layers),
        heads=heads,
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        vocab=int(text.vocab_size),
        matmul_params=active_matmul_params(model),
        linears=linears,
        other_params=other,
        lora_targets=tuple(targets),
        vocab_params=vocab_params_of(model),
    )


def _targeted(inv: ModelInventory) -> list[tuple[str, int, int]]:
    return [(n, i, o) for n, i, o in inv.linears if n.rsplit(".", 1)[-1] in inv.lora_targets]


def _checkpoint_shape(inv: ModelInventory, setting: Setting) -> CheckpointShape:
    """What one checkpoint of ``setting`` holds, counted in checkpoints (segments of ``--checkpoint-layers``)."""
    units = checkpoints_of(inv.layers, setting.checkpoint_layers)
    return CheckpointShape(units, inv.hidden, inv.heads, inv.head_dim, setting.dtype_bytes)


def _layer_work_values(inv: ModelInventory, mode: str, tokens: int, mlp_tile: int) -> float:
    """Values of one layer recomputed and differentiated: the MLP's share grows only up to its tile."""
    mlp_tokens = min(tokens, mlp_tile) if mlp_tile > 0 else tokens
    return tokens * _LAYER_WORK_Q[mode] * inv.heads * inv.head_dim + mlp_tokens * _LAYER_WORK_I * inv.intermediate


def estimate(inv: ModelInventory, setting: Setting, *, sum_sq_per_token: float = 0.0) -> Estimate:
    """Bytes per line and the step time of ``setting`` on ``inv``; ``sum_sq_per_token`` = Σ L² / tokens of the
    shards' packs (the attention's share of the FLOPs)."""
    b, T, mode = setting.dtype_bytes, setting.tokens, setting.mode
    linear_values = sum(i * o for _, i, o in inv.linears)
    if mode == "full":  # every parameter trains, in the run's dtype
        weights, trainable_values, value_bytes = 0, linear_values + inv.other_params, b
    else:  # fp32 adapters on a frozen base (NF4 projections under QLoRA)
        if mode == "qlora":
            weights = math.ceil(linear_values * _NF4_BYTES_PER_VALUE) + _NF4_BYTES_PER_TENSOR * len(inv.linears)
        else:
            weights = linear_values * b
        weights += inv.other_params * b
        trainable_values = sum(setting.lora_r * (i + o) for _, i, o in _targeted(inv))
        value_bytes = 4
    trainable = gradients = trainable_values * value_bytes
    optimizer = trainable_values * (2 if setting.optimizer == "adamw8bit" else 2 * value_bytes)

    # The step's peak: what lives from the forward into the backward (the layers' kept activations, the hidden
    # states' gradient from the loss), plus the larger of the loss's working set and one layer's backward.
    saved = _LAYER_SAVED_Q * inv.heads * inv.head_dim + _LAYER_SAVED_I * inv.intermediate
    layer = _layer_work_values(inv, mode, T, setting.mlp_tile) * b
    host = 0
    if setting.checkpointing == "off":  # every layer's activations, and the top layer's backward on top of them
        kept = inv.layers * T * saved * b
    else:  # each checkpoint: its layer's input (and with --keep-attention its attention output and lse)
        shape = _checkpoint_shape(inv, setting)
        units = shape.layers
        keep = setting.keep_attention
        checkpoint = sum(shape.tensor_bytes(T, keep))
        # a segment's backward holds the recomputed inputs of its layers above the first
        layer += (min(setting.checkpoint_layers, inv.layers) - 1) * T * inv.hidden * b
        if setting.checkpointing == "on":
            kept = units * checkpoint
        else:  # the top layers the GPU budget holds, or the offloaded ones in flight; the rest pinned on the host
            # The backward starts on the GPU-held top layers with the first offloaded layer's copy on its way; two
            # offloaded layers are in flight only once the backward is below the GPU-held ones, which are gone.
            split = plan_offload(shape, T, keep_attention=keep, gpu_budget_bytes=setting.checkpoint_gpu_bytes)
            in_flight = min(split.host_layers, _OFFLOAD_LAYERS_IN_FLIGHT)
            kept = max(split.gpu_layers + min(in_flight, 1), in_flight) * checkpoint
            host = split.host_bytes
    kept += T * inv.hidden * b
    largest = max((i * o for _, i, o in inv.linears), default=0) * b if mode == "qlora" else 0
    load = weights + largest
    layer += largest  # QLoRA: one projection's weight dequantized for its GEMM
    if keeps_vocab_on_host(setting.memory, mode):
        weights -= sum(inv.vocab_params) * b
        host += vocab_host_bytes(setting.memory, mode, inv.vocab_params, b)  # pinned blocks, as train run counts them
        # streamed loss: two weight chunks, one block's work, fp32 sums, target and counted rows
        head = 2 * DEFAULT_VOCAB_CHUNK_BYTES + DEFAULT_WORK_BYTES + T * inv.hidden * (4 + 2 * b)
    else:
        rows = min(T, max(1, DEFAULT_CHUNK_BYTES // (inv.vocab * b)))
        head = rows * inv.vocab * b
    activations = kept + max(head, layer)

    flops = step_flop_model(
        inv.matmul_params,
        inv.layers,
        inv.heads,
        inv.head_dim,
        full=mode == "full",
        checkpointing=setting.checkpointing,
        keep_attention=setting.keep_attention,
        checkpoint_layers=setting.checkpoint_layers,
    )
    attention_forward = flops.attention_forward_per_sq_len * sum_sq_per_token * T  # every layer's, once
    # sum_sq_per_token is the token-weighted mean example length: the length whose kernel rates the FLOPs run at.
    fwd_rate, bwd_rate = attention_rates(sum_sq_per_token)
    if T * inv.heads * inv.head_dim - 1 > INT32_MAX:
        fwd_rate *= _LONG_INDEX_FORWARD
    attention_s = attention_forward * (flops.attention_forwards / fwd_rate + 2.5 / bwd_rate)
    step_s = flops.per_token * T / (_MFU[mode] * T / (T + _HALF_TOKENS) * _PEAK_FLOPS) + attention_s
    return Estimate(setting, int(weights), int(trainable), int(gradients), int(optimizer),
                    int(activations), int(host), step_s, int(load))  # fmt: skip


def attention_rates(length: float) -> tuple[float, float]:
    """Useful forward and backward FLOP/s of the attention kernels on examples of ``length`` tokens: the measured
    rates, log-linear between the measured lengths and held beyond them."""
    (l0, f0, b0), (l1, f1, b1) = _ATTENTION_RATES
    x = min(max((math.log(max(length, 1.0)) - math.log(l0)) / (math.log(l1) - math.log(l0)), 0.0), 1.0)
    return f0 + x * (f1 - f0), b0 + x * (b1 - b0)


def recommend(estimates: list[Estimate], gpu_bytes: int, host_bytes: int | None = None) -> Estimate | None:
    """The fastest estimate (tokens/s) whose peak fits ``gpu_bytes`` (and offload fits ``host_bytes``)."""
    fits = [e for e in estimates if e.peak <= gpu_bytes and (host_bytes is None or e.host <= host_bytes)]
    return max(fits, key=lambda e: e.tokens_per_s, default=None)


def as_row(e: Estimate) -> dict[str, Any]:
    s = e.setting
    gib = 2**30
    return {"mode": s.mode, "tokens": s.tokens, "checkpointing": s.checkpointing,
            "checkpoint_layers": s.checkpoint_layers, "checkpoint_gpu_gib": s.checkpoint_gpu_bytes / gib,
            "weights_gib": e.weights / gib,
            "trainable_gib": (e.trainable + e.gradients + e.optimizer) / gib, "step_gib": e.step / gib,
            "peak_gib": e.peak / gib, "host_gib": e.host / gib, "step_s": e.step_s,
            "tokens_per_s": e.tokens_per_s}  # fmt: skip


# ------------------------------------------------------------------------------------------------ train plan
_HEADROOM_GIB = 1.0  # the CUDA context and the allocator's slack, beside the predicted peak of allocated memory
_MAX_AUTO_TOKENS = 65536


@dataclass(frozen=True)
class Plan:
    """Predictions for every asked setting, what fits, and the fastest that fits."""

    estimates: list[Estimate]
    gpu_bytes: int | None  # usable GPU memory (the card's minus the headroom), None = unknown
    host_bytes: int | None  # host memory for pinned checkpoints (available less train run's reserve), None = unknown
    recommended: Estimate | None

    def fits(self, e: Estimate) -> bool | None:
        if self.gpu_bytes is None:
            return None
        return e.peak <= self.gpu_bytes and (self.host_bytes is None or e.host <= self.host_bytes)


def usable_bytes(card_bytes: int) -> int:
    """What a GPU of ``card_bytes`` leaves for the predicted peak: its total less the headroom."""
    return int(card_bytes - _HEADROOM_GIB * 2**30)


def shard_statistics(shards: str) -> tuple[int, float]:
    """(max_len, Σ L² / tokens) of the shard set: the longest pack, and the attention's work per token."""
    import numpy as np

    from padless.shards.reader import open_shards

    ss = open_shards(shards)
    total_sq = total_tokens = 0
    for _, d in ss.iter_batches():
        values, offsets = d["cu_seqlens"].astype(np.int64), d["cu_seqlens.off"]
        lengths = np.diff(values)
        inside = np.ones(len(lengths), dtype=bool)
        inside[offsets[1:-1] - 1] = False  # the step from one pack's last boundary to the next pack's 0
        total_sq += int((lengths[inside] ** 2).sum())
        total_tokens += int(d["num_tokens"].sum())
    return int(ss.manifest["max_len"]), total_sq / max(total_tokens, 1)


def model_config(cfg: Any, vocab: int) -> PretrainedConfig:
    """The config of ``cfg.model`` (config.json only), or of the random model ``train run`` would build."""
    from transformers import AutoConfig

    from .config import TrainError
    from .modeling import check_causal_lm, tiny_config
    from .prepare import parse_model_overrides

    overrides = parse_model_overrides(cfg.model_overrides, cfg.model)
    if cfg.model is None:
        overrides = dict(overrides or {})
        return tiny_config(cfg.family, max(int(overrides.pop("vocab_size", vocab)), vocab), **overrides)
    try:
        config = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as error:
        raise TrainError(f"--model {cfg.model!r}: cannot read its config.json ({error})") from error
    check_causal_lm(config, cfg.model)
    return config


def plan_inputs(cfg: Any) -> tuple[ModelInventory, int, float]:
    """What every prediction for ``cfg`` (a ``PlanConfig`` or a ``TrainConfig``: its shards, model, family and
    model overrides) starts from: the model's inventory, and the shards' max_len and Σ L² / tokens."""
    from padless.shards.reader import open_shards

    vocab = int(open_shards(cfg.shards).manifest["tokenizer"]["vocab_size"])
    max_len, sum_sq_per_token = shard_statistics(cfg.shards)
    return inventory(model_config(cfg, vocab)), max_len, sum_sq_per_token


def _as_run(setting: Setting) -> Setting:
    """``setting`` as ``train run`` resolves it on a CUDA GPU (train.memory_setting). ``--checkpoint-gpu-gib`` splits
    offloaded checkpoints only, and ``train run`` refuses it with another mode: a setting that does not offload
    keeps no GPU share, so that the options it prints run."""
    if setting.memory == "low":
        checkpointing, optimizer, tile = low_memory_choices(
            setting.checkpointing, setting.optimizer, setting.mlp_tile, True, setting.tokens
        )
        setting = dataclasses.replace(setting, checkpointing=checkpointing, optimizer=optimizer, mlp_tile=tile)
    if setting.checkpointing != "offload" and setting.checkpoint_gpu_bytes:
        setting = dataclasses.replace(setting, checkpoint_gpu_bytes=0)
    return setting


def host_fit_split(inv: ModelInventory, setting: Setting, host_budget: int) -> Setting | None:
    """``setting`` (offload, all checkpoints to the host) with the smallest ``--checkpoint-gpu-gib`` whose host share
    fits ``host_budget`` bytes beside what else the setting keeps in host memory (``--memory low``'s vocabulary);
    None when it fits already, or when no GPU share makes it fit."""
    if setting.checkpointing != "offload" or setting.checkpoint_gpu_bytes:
        return None
    split = plan_offload(_checkpoint_shape(inv, setting), setting.tokens, keep_attention=setting.keep_attention)
    others = vocab_host_bytes(setting.memory, setting.mode, inv.vocab_params, setting.dtype_bytes)
    if split.host_bytes + others <= host_budget:
        return None
    gpu_gib = split.gpu_gib_for(host_budget - others)
    if not gpu_gib:
        return None
    return dataclasses.replace(setting, checkpoint_gpu_bytes=int(gpu_gib * GIB))


def plan(cfg: Any) -> Plan:
    """Predict every setting ``cfg`` (a :class:`~train.config.PlanConfig`) asks for. Where the host cannot hold
    an offloaded setting's checkpoints, the same setting with the GPU share that makes them fit follows it."""
    from .config import TrainError

    if cfg.gpu_mem_gib is not None and usable_bytes(int(cfg.gpu_mem_gib * 2**30)) <= 0:
        raise TrainError(
            f"--gpu-mem-gib {cfg.gpu_mem_gib:g} leaves nothing for training: {_HEADROOM_GIB:g} GiB of a card goes to "
            "the CUDA context and the allocator's slack; give the card's total memory in GiB, e.g. --gpu-mem-gib 24"
        )
    inv, max_len, sum_sq_per_token = plan_inputs(cfg)
    tokens = cfg.token_list
    if tokens is None:
        start = 1 << max(0, (max_len - 1).bit_length())
        tokens = tuple(t for t in (start << k for k in range(8)) if t <= max(_MAX_AUTO_TOKENS, start))
    too_small = [t for t in tokens if t < max_len]
    if too_small:
        raise TrainError(
            f"--tokens {','.join(map(str, too_small))}: below the shards' longest pack ({max_len} tokens); a "
            "micro-batch holds whole packs"
        )
    dtype_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[cfg.dtype]
    estimates = [
        estimate(inv, setting, sum_sq_per_token=sum_sq_per_token)
        for setting in dict.fromkeys(
            _as_run(
                Setting(
                    mode,
                    t,
                    ckpt,
                    cfg.lora_r,
                    cfg.optimizer,
                    dtype_bytes,
                    cfg.memory,
                    cfg.mlp_tile_tokens,
                    keep_attention=cfg.keep_attention and ckpt != "off",
                    checkpoint_gpu_bytes=int(cfg.checkpoint_gpu_gib * 2**30),
                    # --memory low checkpoints a run whose --checkpointing is off (see _as_run)
                    checkpoint_layers=cfg.checkpoint_layers if ckpt != "off" or cfg.memory == "low" else 1,
                )
            )
            for mode in cfg.mode_list
            for ckpt in cfg.checkpointing_list
            for t in tokens
        )
    ]
    gpu = cfg.gpu_mem_gib * 2**30 if cfg.gpu_mem_gib is not None else None
    if gpu is None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0).total_memory
    usable = usable_bytes(gpu) if gpu is not None else None
    available = host_bytes_of(cfg)
    # What train run's check before the first step allows the pinned checkpoints (train.offload_budget).
    host = max(available - HOST_RESERVE, 0) if available is not None else None
    if host is not None:
        with_splits = []
        for e in estimates:
            with_splits.append(e)
            split = host_fit_split(inv, e.setting, host)
            if split is not None:
                with_splits.append(estimate(inv, split, sum_sq_per_token=sum_sq_per_token))
        estimates = with_splits
    recommended = recommend(estimates, usable, host) if usable is not None else None
    return Plan(estimates, usable, host, recommended)
