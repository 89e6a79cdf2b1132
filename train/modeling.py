"""Build or load the causal LM that padless trains: a local Hugging Face folder, a hub id, or a tiny random model.

``load_model(None, vocab_size=V)`` builds a tiny randomly initialised decoder of a supported family sized to the
shards' tokenizer, so the README's main job runs end to end on a CPU in about a minute. A folder must hold
``config.json`` and weights (safetensors or ``pytorch_model*.bin``); anything else is a :class:`TrainError`
naming it, as is a tiny-model override transformers rejects.
``quantize_4bit=True`` loads the base in NF4 through bitsandbytes for QLoRA (on a GPU, or on the CPU where the
installed bitsandbytes has its CPU backend: slow, for tests and checks). A random model for QLoRA is written to a
temporary folder first (:mod:`train.random_weights`) and loaded like a user's, so it never exists whole in bf16.

The KV cache is always off (``config.use_cache = False``): padless never decodes, and a cache is one of the ways
transformers stops noticing packed position_ids (see ``train.model_patch``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import huggingface_hub.errors
import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .config import TrainError
from .families import SUPPORTED_FAMILIES
from .random_weights import write_random_model

__all__ = ["TINY_FAMILIES", "check_causal_lm", "load_model", "tiny_config"]

TINY_FAMILIES: tuple[str, ...] = SUPPORTED_FAMILIES

# Small enough for a CPU demo, big enough for the loss to fall visibly. With a 150k vocab the tied embedding /
# lm_head dominates every CPU step (~3 x T x 128 x 150k flops per micro-batch). The golden-loss test
# (tests/train/golden) pins these numbers: changing them means regenerating it.
_TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "use_cache": False,
    "attention_dropout": 0.0,
}

# What building a config or model raises for bad field values: TypeError / ValueError, and (transformers >= 5)
# huggingface_hub's strict-dataclass validation errors.
_CONFIG_ERRORS: tuple[type[Exception], ...] = (
    TypeError,
    ValueError,
    *[e for e in (getattr(huggingface_hub.errors, "StrictDataclassError", None),) if e is not None],
)

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors.index.json")


def tiny_config(family: str, vocab_size: int, **overrides: Any) -> PretrainedConfig:
    """A tiny config of ``family`` (llama, mistral, qwen2, qwen3, gemma, gemma2) for ``vocab_size`` tokens."""
    if family not in TINY_FAMILIES:
        raise TrainError(f"--family {family!r} has no tiny config; expected one of {', '.join(TINY_FAMILIES)}")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise TrainError(f"vocab_size={vocab_size!r}: expected an int >= 2 (the shards' tokenizer vocab size)")
    kwargs: dict[str, Any] = dict(_TINY_DEFAULTS)
    if family == "mistral":
        kwargs["sliding_window"] = None  # full attention unless asked: HF's default 4096 never bites a tiny demo
    if family in ("gemma", "gemma2"):
        kwargs["hidden_act"] = "gelu_pytorch_tanh"
        kwargs["hidden_activation"] = "gelu_pytorch_tanh"
    if family == "gemma2":
        kwargs["query_pre_attn_scalar"] = kwargs["head_dim"]
        kwargs["sliding_window"] = 4096
    kwargs.update(overrides)
    kwargs["vocab_size"] = vocab_size
    # Keep head_dim consistent when a test shrinks hidden_size / heads without naming head_dim.
    if "head_dim" not in overrides and ("hidden_size" in overrides or "num_attention_heads" in overrides):
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        if family == "gemma2" and "query_pre_attn_scalar" not in overrides:
            kwargs["query_pre_attn_scalar"] = kwargs["head_dim"]
    return AutoConfig.for_model(family, **kwargs)


def check_causal_lm(config: PretrainedConfig, model: str) -> None:
    """Refuse a model whose ``model_type`` transformers builds no causal LM for (an encoder-decoder such as T5, a
    vision or speech encoder): ``AutoModelForCausalLM`` would raise a ValueError listing some 200 config classes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TrainError(
            f"--model {model!r} is a {model_type!r} model, and transformers has no causal language model "
            "(AutoModelForCausalLM) of that type; padless fine-tunes decoder language models such as llama, "
            "mistral, qwen3 or gemma"
        )


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS)


def _bnb_config(dtype: torch.dtype) -> transformers.BitsAndBytesConfig:
    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    )


def _check_4bit_support(device: torch.device) -> None:
    """Fail early when the installed bitsandbytes cannot store NF4 weights on ``device`` (CUDA always can; the CPU
    needs a bitsandbytes with its CPU backend)."""
    if device.type == "cuda":
        return
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_functional.quantize_4bit(torch.ones(64, dtype=torch.bfloat16, device=device), quant_type="nf4")
    except Exception as error:  # ImportError, or whatever a backend without this device raises
        raise TrainError(
            f"--qlora (a 4-bit base) on device {str(device)!r}: the installed bitsandbytes cannot quantize to NF4 "
            f"there ({type(error).__name__}: {error}). Run on a GPU, or drop --qlora"
        ) from error


def _from_pretrained(
    source: str, *, dtype: torch.dtype, device: torch.device, quantize_4bit: bool, overrides: dict
) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": dtype, **overrides}
    if device.type == "cuda":
        # Straight onto the GPU (no CPU copy of the whole model); bitsandbytes needs it to quantize while loading.
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    if quantize_4bit:
        kwargs["quantization_config"] = _bnb_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device.type != "cuda":
        model = model.to(device)
    return model


def load_model(
    model: str | None,
    *,
    vocab_size: int | None = None,
    family: str = "llama",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantize_4bit: bool = False,
    seed: int = 0,
    config_overrides: dict | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a local folder or hub id, or build a tiny random one (``model=None``).

    ``model=None`` needs ``vocab_size`` and builds :func:`tiny_config` (``family``, ``config_overrides``) with
    weights drawn from ``seed`` (on ``device``, in ``dtype``). For a folder or hub id, ``vocab_size``, ``family`` and
    ``seed`` are not used (checking the shards' tokenizer against the model is the caller's job) and
    ``config_overrides`` go to ``from_pretrained`` (e.g. ``{"attn_implementation": "eager"}``).
    ``quantize_4bit`` loads the base in NF4 (QLoRA). The model comes back
    in eval mode on ``device``, with ``config.use_cache = False``; the caller switches to train mode.
    """
    device = torch.device(device)
    overrides = dict(config_overrides or {})
    if quantize_4bit:
        _check_4bit_support(device)
    if model is None:
        if vocab_size is None:
            raise ValueError("load_model(None) builds a tiny random model and needs vocab_size (the shards' vocab).")
        wanted = overrides.pop("vocab_size", vocab_size)
        if not isinstance(wanted, int) or wanted < vocab_size:
            raise TrainError(
                f"--model-overrides vocab_size={wanted!r} is smaller than the shards' tokenizer vocabulary "
                f"({vocab_size}): some token ids would have no embedding; use >= {vocab_size} or leave it out"
            )
        scratch = tempfile.TemporaryDirectory(prefix="padless-random-") if quantize_4bit else None
        try:
            config = tiny_config(family, wanted, **overrides)
            if scratch is not None:
                # Through a folder, as a user's model comes: NF4 tensor by tensor, never the whole model in bf16.
                write_random_model(config, scratch.name, seed=seed, dtype=torch.bfloat16, device=device)
            else:
                # Directly on the target device in the target dtype: a big random model (an 8B-shaped benchmark)
                # would take minutes to initialise on the CPU. The seed then depends on the device.
                rng_devices = [device.index or 0] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=rng_devices), torch.device(device):
                    torch.manual_seed(seed)
                    result = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except _CONFIG_ERRORS as error:
            if scratch is not None:
                scratch.cleanup()
            if not overrides:
                raise
            raise TrainError(
                f"--model-overrides {overrides}: transformers cannot build a {family} model from them ({error})"
            ) from error
        if scratch is not None:
            with scratch:
                result = _from_pretrained(scratch.name, dtype=dtype, device=device, quantize_4bit=True, overrides={})
    else:
        path = Path(os.path.expanduser(str(model)))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise TrainError(
                    f"model folder {str(path)!r} has no config.json; expected a Hugging Face model folder "
                    "(config.json + *.safetensors). Point --model at the folder that save_pretrained wrote."
                )
            if not _has_weights(path):
                raise TrainError(
                    f"model folder {str(path)!r} has a config.json but no weights (*.safetensors or "
                    "pytorch_model*.bin). Download the weights into it, or omit --model to train a tiny random model."
                )
            source = str(path)
        elif path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
            raise TrainError(f"--model {str(model)!r} is not a model folder (no such directory)")
        else:
            source = str(model)
        try:
            check_causal_lm(AutoConfig.from_pretrained(source), str(model))
            result = _from_pretrained(
                source, dtype=dtype, device=device, quantize_4bit=quantize_4bit, overrides=overrides
            )
        except OSError as error:
            if not path.is_dir():
                raise TrainError(
                    f"cannot load model {str(model)!r}: it is not a local folder and the Hugging Face hub did not "
                    f"provide it ({error}). Offline? Download it first (huggingface-cli download {model} "
                    "--local-dir DIR) and pass --model DIR"
                ) from error
            raise TrainError(f"cannot load the model folder {str(path)!r}: {error}") from error
        except SafetensorError as error:  # a weights file cut short or not safetensors at all
            raise TrainError(
                f"cannot load the model folder {str(path)!r}: a *.safetensors file in it is damaged ({error}); "
                "download the weights again"
            ) from error
    result.config.use_cache = False
    if getattr(result, "generation_config", None) is not None:
        result.generation_config.use_cache = False
    result.eval()
    return result
