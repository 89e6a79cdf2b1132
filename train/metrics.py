"""What a step cost: FLOPs per step, MFU against a small table of GPU peaks, peak memory, and ``metrics.jsonl``.

FLOPs (the usual 6N accounting, made exact for what we run): N = parameters a text token's matmuls use
(``active_matmul_params``): the decoder's and the output head's parameters minus the input embedding, which is a
lookup (a tied head counts once). A mixture-of-experts layer runs its router, its shared experts and only
``num_experts_per_tok`` of its routed experts per token, so the routed experts (the parameters under a module named
``experts``) count k/E of their parameters, and a config naming experts that are not there counts them in full, with
a warning; a multimodal model's vision or audio tower and projector never run on the text packs padless trains on,
so they count nothing. (Memory still counts every parameter: ``train.plan`` and ``train.memory_breakdown``.)

Per token: forward 2N; backward 2N for the activation gradients, plus 2N for the weight gradients only when every
weight trains (``--full``; LoRA's own weight gradients are negligible); plus another forward 2N when gradient
checkpointing recomputes it. Attention adds, per layer and per example of length L, 2·L²·H·D in the forward (QKᵀ and
PV, halved by the causal mask), twice that in the backward, once more when recomputed (not with --keep-attention,
whose recompute reuses the forward's output): the packs' sum of squared lengths gives it exactly, from the host.
With ``--checkpoint-layers k`` the first k - 1 layers of each segment are forwarded once more again (the segment's
recompute rebuilds the inputs of the layers above them).
"""

from __future__ import annotations

import json
import os
import resource
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .offload_budget import checkpoints_of

__all__ = [
    "PEAK_BF16_FLOPS",
    "FlopModel",
    "MetricsLog",
    "active_matmul_params",
    "flop_model",
    "peak_flops",
    "peak_memory_gib",
    "step_flop_model",
    "sum_squared_lengths",
]

# Dense bf16 peak (no sparsity) per GPU, matched by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` from the table, or None (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes 4-bit weights store two values per byte; their quant_state knows the logical shape.
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(np.prod(shape)) if shape is not None else p.numel()


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of one training step: ``per_token * tokens + per_sq_len * sum(L²)``."""

    matmul_params: int
    per_token: float
    per_sq_len: float
    # Attention forwards per layer in a step (the forward, and the recompute's unless its output is kept); the
    # backward is the rest of ``per_sq_len``. ``train plan`` times the two at the kernels' own rates.
    attention_forwards: float = 1.0

    @property
    def attention_forward_per_sq_len(self) -> float:
        """One attention forward over every layer, FLOPs per L² (``per_sq_len`` counts the backward as two)."""
        return self.per_sq_len / (self.attention_forwards + 2)

    def step_flops(self, tokens: int, sum_sq_len: int) -> float:
        return self.per_token * tokens + self.per_sq_len * sum_sq_len


def _routed_experts_share(text_config: Any) -> tuple[int, int]:
    """(k, E): the routed experts a token runs and how many there are per MoE layer; (1, 1) for a dense model.
    Qwen-MoE and OLMoE name E ``num_experts``, Mixtral, Llama 4 and GPT-OSS ``num_local_experts``, DeepSeek
    ``n_routed_experts``; all name k ``num_experts_per_tok``. DBRX keeps them in its ``ffn_config`` (an object, or a
    dict in older configs) as ``moe_num_experts`` and ``moe_top_k``."""
    k = getattr(text_config, "num_experts_per_tok", None)
    keys = ("num_experts", "num_local_experts", "n_routed_experts")
    experts = next((value for key in keys if (value := getattr(text_config, key, None))), None)
    ffn = getattr(text_config, "ffn_config", None)
    if not (k and experts) and ffn is not None:
        field = ffn.get if isinstance(ffn, dict) else lambda key: getattr(ffn, key, None)
        k, experts = field("moe_top_k"), field("moe_num_experts")
    return (int(k), int(experts)) if k and experts else (1, 1)


def _is_routed_expert(name: str) -> bool:
    # The routed experts live under a module named ``experts`` in every Hugging Face MoE (fused 3-D weights or one
    # module per expert); the router (``gate``) and shared experts (``shared_expert(s)``) run for every token.
    return "experts" in name.split(".")


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    state = getattr(p, "quant_state", None)  # a bitsandbytes 4-bit weight's logical shape
    return tuple(getattr(state, "shape", None) or p.shape)


def active_matmul_params(model: torch.nn.Module) -> int:
    """N of the module doc: the parameters of the decoder (``get_decoder()``: a multimodal model's language model)
    and the output head, less the input embedding and LoRA's own weights, with each MoE layer's routed experts
    counted at k/E (every routed-expert tensor holds E experts' weights, leading dimension or module list).

    A config that names routed experts whose weights are not under a module named ``experts`` (none there, or a
    tensor of E experts elsewhere: JetMoe's ``mlp.input_linear``) gets one warning: those count in full."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    decoder = model if decoder is None else decoder  # no decoder to name: every parameter is the text model's
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    k, experts = _routed_experts_share(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg)
    seen: set[int] = set()
    if embed is not None and (head is None or head.weight is not embed.weight):
        seen.add(id(embed.weight))  # a lookup; tied to the head, the head's matmul still happens
    n = 0
    routed, stray = False, []
    named = [*decoder.named_parameters(), *(head.named_parameters() if head is not None else ())]
    for name, p in named:
        if id(p) in seen or "lora_" in name:
            continue
        seen.add(id(p))
        if _is_routed_expert(name):
            routed = True
            n += _numel(p) * k // experts
        else:
            shape = _shape(p)
            if experts > 1 and len(shape) >= 3 and shape[0] == experts:  # E experts' weights in one tensor
                stray.append(name)
            n += _numel(p)
    if experts > 1 and (not routed or stray):
        model_type = getattr(cfg, "model_type", None) or type(model).__name__
        more = f" ({len(stray) - 1} more tensors alike)" if len(stray) > 1 else ""
        where = f"{stray[0]}{more} holds {experts} experts' weights outside one" if stray else "its decoder has none"
        warnings.warn(
            f"model_type {model_type!r} routes each token to {k} of {experts} experts, but padless counts a routed "
            f"expert at k/E only under a module named 'experts', and {where}: step FLOPs (train plan's step time, "
            f"train run's MFU) count those experts in full, as if all {experts} ran for every token, so they come "
            "out too high",
            stacklevel=2,
        )
    return n


def flop_model(
    model: torch.nn.Module, *, full: bool, checkpointing: str, keep_attention: bool = False, checkpoint_layers: int = 1
) -> FlopModel:
    """Build the FLOP model from the (unwrapped) model's parameters and config (see the module doc); the attention's
    sizes are the decoder's (a multimodal config keeps them in its ``text_config``)."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    head_dim = getattr(text, "head_dim", None) or (int(getattr(text, "hidden_size", 0) or 0) // heads if heads else 0)
    return step_flop_model(
        active_matmul_params(model),
        layers,
        heads,
        head_dim,
        full=full,
        checkpointing=checkpointing,
        keep_attention=keep_attention,
        checkpoint_layers=checkpoint_layers,
    )


def step_flop_model(
    matmul_params: int,
    layers: int,
    heads: int,
    head_dim: int,
    *,
    full: bool,
    checkpointing: str,
    keep_attention: bool = False,
    checkpoint_layers: int = 1,
) -> FlopModel:
    """The FLOP model from the counts alone (``train plan`` has no loaded model): the passes of the module doc."""
    # Recompute: one more forward per layer; segments of k layers (--checkpoint-layers) forward their first k - 1
    # layers once more again, to rebuild the inputs of the layers above them.
    recompute = 0.0
    if checkpointing != "off":
        count = max(layers, 1)
        recompute = 1.0 + (count - checkpoints_of(count, checkpoint_layers)) / count
    passes = 1 + 1 + (1 if full else 0) + recompute
    # --keep-attention: the recompute reuses the forward's attention output (no third attention forward)
    attn_passes = 1 + 2 + (0 if checkpointing == "off" else recompute - (1 if keep_attention else 0))
    return FlopModel(
        matmul_params=matmul_params,
        per_token=2.0 * matmul_params * passes,
        per_sq_len=2.0 * layers * heads * head_dim * attn_passes,
        attention_forwards=attn_passes - 2,
    )


def sum_squared_lengths(cu_seqlens: np.ndarray | torch.Tensor) -> int:
    """Σ L² over the examples of a micro-batch, from its host-side ``cu_seqlens`` (no device sync)."""
    lengths = np.diff(np.asarray(cu_seqlens, dtype=np.int64))
    return int((lengths * lengths).sum())


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory in GiB (CUDA), or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl line as its record; None for a blank line or one that is not a whole JSON object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed per line, so a crash loses nothing) and hands
    each record to every callable in ``sinks`` (the ``--report-to`` trackers)."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, keep_until_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.sinks: list[Callable[[dict[str, Any]], None]] = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and self.path.exists():
            # A resumed run: drop lines the interrupted run wrote after the checkpoint it resumes from, and a last
            # line that a kill cut short (not a whole JSON object).
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                if (record := _record(line)) is not None and record.get("step", 0) <= keep_until_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif keep_until_step is None and self.path.exists():
            self.path.unlink()

    def last_value(self, key: str) -> Any:
        """``key`` of the newest record in the file that has it (a resumed run's kept lines count), or None."""
        if not self.enabled or not self.path.exists():
            return None
        for line in reversed(self.path.read_text(encoding="utf-8").splitlines()):
            if line.strip() and (value := json.loads(line).get(key)) is not None:
                return value
        return None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        for sink in self.sinks:
            sink(record)
