"""``train chat RUN --prompt ...``: one reply from a trained output folder, a quick check after training.

RUN is what ``train run`` or ``train merge`` wrote: a peft adapter folder (loaded with
``AutoPeftModelForCausalLM``, whose config names the base) or a full model folder (``AutoModelForCausalLM``), with
its tokenizer beside it (``AutoTokenizer``). Nothing of padless's training path is used: the folder is loaded as
any inference tool would load it. The prompt goes through the tokenizer's chat template as one user turn when
the tokenizer has one, else it is plain text to continue. Decoding is greedy unless ``temperature`` > 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from padless.shards.cli_config import one_line

from .config import TrainError
from .output import has_tokenizer

__all__ = ["chat", "load_output"]


def load_output(run: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """(model in eval mode on ``device``, tokenizer) from an output folder alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Path(run)
    adapter = (run / "adapter_config.json").is_file()
    if not adapter and not (run / "config.json").is_file():
        raise TrainError(
            f"{str(run)!r} holds neither adapter_config.json nor config.json; expected the --output folder of "
            "`train run` or the --out folder of `train merge`"
        )
    if not has_tokenizer(run):
        raise TrainError(
            f"{str(run)!r} holds no tokenizer (tokenizer.json); copy the tokenizer files the shards were made with "
            "into it"
        )
    try:
        if adapter:
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(str(run))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(run))
        tokenizer = AutoTokenizer.from_pretrained(str(run))
    except (OSError, ValueError) as error:  # transformers / peft: a base or file it cannot find or read
        raise TrainError(
            f"cannot load {str(run)!r} ({one_line(error)}); an adapter's base model must still be where "
            "adapter_config.json's base_model_name_or_path says"
        ) from error
    return model.to(device).eval(), tokenizer


def chat(
    run: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    device: str | None = None,
    seed: int = 0,
) -> str:
    """The model's reply to ``prompt`` (the new tokens only, decoded without special tokens)."""
    if max_new_tokens < 1:
        raise TrainError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise TrainError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_output(run, device)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids, device=device),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=True,
            **sampling,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
