"""What gets trained: LoRA (peft), QLoRA (LoRA on a 4-bit NF4 base) or every parameter (full fine-tuning).

LoRA targets all linear projections of the attention and MLP by default (q, k, v, o, gate, up, down); for an
architecture with other module names (the fallback families) peft's ``"all-linear"`` picks them (lm_head
excluded). Adapter weights stay fp32 (peft's ``autocast_adapter_dtype``) on a bf16 or 4-bit base. Bad settings
(an unknown ``--target-modules`` name, QLoRA without a 4-bit base) raise :class:`~train.config.TrainError`.
"""

from __future__ import annotations

import warnings

from torch import nn

from .config import MODES, Mode, TrainError
from .families import family_for_model_type

__all__ = ["DEFAULT_TARGETS", "MODES", "apply_adapters", "check_targets", "trainable_parameter_count"]
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_4bit(model: nn.Module) -> bool:
    return (
        bool(getattr(model, "is_loaded_in_4bit", False))
        or getattr(getattr(model, "hf_quantizer", None), "quantization_config", None) is not None
    )


def apply_adapters(
    model: nn.Module,
    *,
    mode: Mode = "lora",
    r: int = 16,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> nn.Module:
    """Make ``model`` trainable per ``mode``; LoRA/QLoRA return a peft ``PeftModel``, full returns ``model``."""
    if mode not in MODES:
        raise TrainError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    quantized = _is_4bit(model)
    if mode == "full":
        if quantized:
            raise TrainError("--full cannot train a 4-bit quantized base; load it without quantize_4bit")
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if mode == "qlora" and not quantized:
        raise TrainError("--qlora needs a base loaded in 4 bits: load_model(..., quantize_4bit=True)")
    if r < 1:
        raise TrainError(f"--lora-r {r}: expected >= 1")
    if not 0.0 <= dropout < 1.0:
        raise TrainError(f"--lora-dropout {dropout}: expected a value in [0, 1)")
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        known = family_for_model_type(getattr(model.config, "model_type", "")) is not None
        targets: list[str] | str = list(DEFAULT_TARGETS) if known else "all-linear"
    else:
        targets = list(target_modules)
        check_targets(model, targets)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing`` property while it wraps the model; the
        # warning is about peft's code, not the user's run.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def check_targets(model: nn.Module, targets: list[str] | None) -> None:
    """Every ``--target-modules`` name must pick at least one linear layer, and on a patched family never the output
    layer (the fused cross-entropy scores against a plain ``lm_head.weight``).

    peft matches a name against a module's full name or its dotted suffix; checking here gives the user the
    model's own layer names instead of peft's error. ``None`` (the default targets) always passes."""
    if targets is None:
        return
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    patched = family_for_model_type(getattr(model.config, "model_type", "")) is not None
    head = model.get_output_embeddings() if patched and hasattr(model, "get_output_embeddings") else None
    heads = {name for name, module in model.named_modules() if head is not None and module is head}
    available = sorted({name.rsplit(".", 1)[-1] for name in linear} - {h.rsplit(".", 1)[-1] for h in heads})
    for target in targets:
        picked = [name for name in linear if name == target or name.endswith("." + target)]
        if not picked:
            raise TrainError(
                f"--target-modules {target!r} names no linear layer of this model; its linear layers are "
                f"{', '.join(available)}"
            )
        if set(picked) & heads:
            raise TrainError(
                f"--target-modules {target!r} picks the output layer (lm_head), which the fused cross-entropy "
                f"scores against as a plain weight; choose among {', '.join(available)}"
            )


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
