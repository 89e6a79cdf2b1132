"""Patch ONE model instance for packed training: a per-instance plan for the varlen path, or a loud fallback.

What "patching" means here: :func:`patch_model` inspects the instance (family row, activation, per-layer sliding
window / soft-cap / scaling, the RoPE cos/sin cache built from the model's own rotary module) and attaches the
result to that instance as ``model._padless_patch``; each decoder layer of the instance gets an instance-level
``forward`` that runs padless's packed step when the packed path calls it (and the stock forward otherwise), so
hooks on the layers (FSDP2's per-layer all-gather) fire as usual. :func:`train.packed_forward.packed_loss` then
runs the instance's own weights (LoRA-wrapped Linear modules included) through our varlen kernels. Nothing at
module or class level is touched: another instance of the same class, or the same instance after
:meth:`PatchHandle.unpatch`, behaves exactly like stock transformers.

Why not reuse transformers' forward with packed position_ids: transformers only turns packed position_ids into a
block-diagonal mask when it builds the mask itself (no mask given, no cache); with ``use_cache=True`` and no
checkpointing it silently attends across examples. So an architecture that is not in ``train.families`` gets the
fallback: transformers' own modules with packed position_ids AND an explicit block-diagonal causal mask built from
cu_seqlens (correct, T x T memory), announced with a warning.
"""

from __future__ import annotations

import math
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainError
from .families import SUPPORTED_FAMILIES, FamilySpec, family_for_model_type

__all__ = ["FallbackWarning", "LayerPlan", "PatchHandle", "patch_model", "unwrap_model"]

_ATTR = "_padless_patch"
_MIN_ROPE_CACHE = 256


class FallbackWarning(UserWarning):
    """An architecture padless does not patch trains through transformers' modules with an explicit mask."""


@dataclass(frozen=True)
class LayerPlan:
    """Per-layer attention switches read once from the instance."""

    head_dim: int
    scale: float
    window: int | None
    softcap: float | None


@dataclass
class PatchHandle:
    """The plan attached to one patched model instance; :meth:`unpatch` detaches it."""

    model: nn.Module  # the Hugging Face causal LM (inside any peft wrapper)
    family: FamilySpec | None  # None: the fallback path
    activation: str = "module"  # "swiglu" | "geglu_tanh" | "geglu_none" | "module" (call mlp.act_fn)
    embed_scale: float | None = None  # multiply embeddings by this when the embedding module does not
    final_softcap: float | None = None
    layers: list[LayerPlan] = field(default_factory=list)
    # train.host_vocab: embedding rows read from host memory by a kernel, the loss streams the lm_head
    vocab_on_host: bool = False
    _rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _scales: dict[tuple[torch.dtype, torch.device], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def fallback(self) -> bool:
        return self.family is None

    @property
    def active(self) -> bool:
        return getattr(self.model, _ATTR, None) is self

    def unpatch(self) -> None:
        """Detach the plan and the layers' instance forwards: the instance is stock transformers again."""
        if self.active:
            delattr(self.model, _ATTR)
        if not self.fallback:
            for layer in self.model.get_decoder().layers:
                if getattr(layer.__dict__.get("forward"), "__func__", None) is _layer_forward:
                    del layer.__dict__["forward"]
        self._rope.clear()
        self._scales.clear()

    def embed_scale_tensor(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``embed_scale`` as a 0-dim tensor of ``dtype`` (rounded as Hugging Face rounds it), made once per
        device: a host-to-device copy per step would be a sync point and cannot be captured in a CUDA graph."""
        key = (dtype, device)
        if key not in self._scales:
            self._scales[key] = torch.tensor(self.embed_scale, dtype=dtype, device=device)
        return self._scales[key]

    def rope_cache(self, max_seqlen: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (P, D/2) cos/sin with P >= max_seqlen, from the model's own rotary module (every rope_scaling).

        Positions restart at every example, so ``max_seqlen`` (a host int) bounds them: no device sync.
        """
        cached = self._rope.get(device)
        if cached is not None and cached[0].shape[0] >= max_seqlen:
            return cached
        rotary = self.model.get_decoder().rotary_emb
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        size = max(_MIN_ROPE_CACHE, 1 << max(0, int(max_seqlen) - 1).bit_length())
        # Stay within max_position_embeddings unless a sequence needs more: dynamic rope types rescale their
        # inv_freq (a side effect on the module) once asked for positions past it.
        size = max(min(size, max(limit, 1)), int(max_seqlen))
        positions = torch.arange(size, device=device)[None]
        probe = torch.empty(0, dtype=torch.float32, device=device)
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            cos, sin = rotary(probe, positions)
        half = cos.shape[-1] // 2
        cached = (cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous())
        self._rope[device] = cached
        return cached


def _layer_forward(self: nn.Module, *args, padless_step=None, **kwargs):
    """Instance forward of a patched decoder layer: padless's packed step when given one, else the stock forward.

    The packed path calls ``nn.Module.__call__(layer, hidden, padless_step=step)``, so every hook on the layer
    (FSDP2's all-gather / reshard, profilers) fires around padless's computation exactly as around HF's.
    """
    if padless_step is not None:
        return padless_step(*args)
    return type(self).forward(self, *args, **kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside DDP and/or a peft ``PeftModel`` (or the model itself)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _activation_kind(act_fn: nn.Module) -> str:
    """Identify the MLP activation by probing it numerically (robust to transformers renaming its classes)."""
    x = torch.linspace(-8.0, 8.0, 257, dtype=torch.float32)
    with torch.no_grad():
        y = act_fn(x)
        candidates = {
            "swiglu": F.silu(x),
            "geglu_tanh": F.gelu(x, approximate="tanh"),
            "geglu_none": F.gelu(x),
        }
        for name, ref in candidates.items():
            if torch.allclose(y, ref, rtol=1e-6, atol=1e-6):
                return name
    return "module"


def _require(module: nn.Module, names: tuple[str, ...], where: str, model_type: str) -> None:
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise TrainError(
            f"model_type {model_type!r}: {where} has no {missing}; padless's packed path expects the Hugging Face "
            "Llama-shaped modules of this family. Is this a customised model? Report it with the model's class"
        )


def _layer_plans(hf: nn.Module, family: FamilySpec) -> list[LayerPlan]:
    config = hf.config
    layer_types = getattr(config, "layer_types", None)
    plans = []
    for index, layer in enumerate(hf.get_decoder().layers):
        attn = layer.self_attn
        if family.window_from_config:
            window = getattr(config, "sliding_window", None)
        elif hasattr(attn, "sliding_window"):
            window = attn.sliding_window
        elif layer_types is not None and layer_types[index] == "sliding_attention":
            window = getattr(config, "sliding_window", None)
        else:
            window = None
        softcap = getattr(config, family.attn_softcap_key, None) if family.attn_softcap_key else None
        head_dim = int(getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        scale = float(getattr(attn, "scaling", 1.0 / math.sqrt(head_dim)))
        plans.append(
            LayerPlan(
                head_dim=head_dim,
                scale=scale,
                window=int(window) if window else None,
                softcap=float(softcap) if softcap else None,
            )
        )
    return plans


def _check_lm_head(hf: nn.Module, model_type: str) -> None:
    head = hf.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TrainError(f"model_type {model_type!r}: no output embedding (lm_head) with a weight to score against")
    if hasattr(head, "base_layer") or getattr(head, "bias", None) is not None:
        raise TrainError(
            f"model_type {model_type!r}: the lm_head is adapter-wrapped or has a bias; the fused cross-entropy "
            "scores against a plain lm_head.weight. Leave lm_head out of --target-modules"
        )


def _plan_supported(hf: nn.Module, family: FamilySpec) -> PatchHandle:
    config = hf.config
    model_type = config.model_type
    decoder = hf.get_decoder()
    _require(decoder, ("embed_tokens", "layers", "norm", "rotary_emb"), "the decoder", model_type)
    for layer in decoder.layers:
        _require(layer, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"), "a layer", model_type)
        _require(layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj"), "an attention", model_type)
        _require(layer.mlp, ("gate_proj", "up_proj", "down_proj", "act_fn"), "an MLP", model_type)
        if family.qk_norm:
            _require(layer.self_attn, ("q_norm", "k_norm"), "an attention", model_type)
        if family.sandwich_norm:
            _require(layer, ("pre_feedforward_layernorm", "post_feedforward_layernorm"), "a layer", model_type)
    _check_lm_head(hf, model_type)
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0.0:
        warnings.warn(
            f"config.attention_dropout={config.attention_dropout} is ignored on padless's packed path (the varlen "
            "kernels have no attention dropout); set it to 0.0 to silence this.",
            stacklevel=3,
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type in ("dynamic", "longrope"):
        warnings.warn(
            f"rope_type={rope_type!r}: transformers picks this RoPE's frequencies from the longest sequence of each "
            "forward; padless builds one cos/sin cache per model (frequencies for max(max_seqlen, "
            "max_position_embeddings)), so examples shorter than the original context may be rotated differently.",
            stacklevel=3,
        )
    embed = decoder.embed_tokens
    embed = getattr(embed, "base_layer", embed)
    # transformers >= 5 scales inside the embedding module (``embed_scale``); 4.x scales in the model forward.
    embed_scale = float(config.hidden_size) ** 0.5 if family.embed_scale and not hasattr(embed, "embed_scale") else None
    final_softcap = getattr(config, family.final_softcap_key, None) if family.final_softcap_key else None
    return PatchHandle(
        model=hf,
        family=family,
        activation=_activation_kind(decoder.layers[0].mlp.act_fn),
        embed_scale=embed_scale,
        final_softcap=float(final_softcap) if final_softcap else None,
        layers=_layer_plans(hf, family),
    )


def patch_model(model: nn.Module) -> PatchHandle:
    """Attach padless's packed plan to this instance (idempotent); warn and use the fallback for other families.

    Works on a plain Hugging Face causal LM or a peft ``PeftModel`` around one. Returns the handle;
    ``handle.unpatch()`` reverts the instance to stock transformers.
    """
    hf = unwrap_model(model)
    existing = getattr(hf, _ATTR, None)
    if isinstance(existing, PatchHandle):
        return existing
    config = getattr(hf, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"patch_model expects a Hugging Face causal LM (or a PeftModel); got {type(model).__name__}.")
    config.use_cache = False  # never a KV cache while training (it also hides packed position_ids from HF)
    family = family_for_model_type(config.model_type)
    if family is not None:
        handle = _plan_supported(hf, family)
        for layer in hf.get_decoder().layers:
            layer.forward = types.MethodType(_layer_forward, layer)  # this instance only; unpatch() removes it
    else:
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in ("eager", "sdpa"):
            raise TrainError(
                f"model_type {config.model_type!r} is not patched by padless and trains through transformers with "
                f"an explicit block-diagonal mask, which attn_implementation={impl!r} cannot take. Load the model "
                "with attn_implementation='sdpa' (or 'eager')"
            )
        warnings.warn(
            f"padless does not patch model_type {config.model_type!r} (patched families: "
            f"{', '.join(SUPPORTED_FAMILIES)}): it trains through transformers' own modules with packed "
            "position_ids and an explicit block-diagonal causal mask built from cu_seqlens. Examples stay "
            "separate, but the mask costs T x T memory per micro-batch and no fused kernels run.",
            FallbackWarning,
            stacklevel=2,
        )
        handle = PatchHandle(model=hf, family=None)
    object.__setattr__(hf, _ATTR, handle)
    return handle


def get_patch(model: nn.Module) -> PatchHandle | None:
    """The active handle of this instance, if patched."""
    handle = getattr(unwrap_model(model), _ATTR, None)
    return handle if isinstance(handle, PatchHandle) else None
