"""``train chat RUN --prompt ...``: one reply from a trained output folder, a quick check after training.

RUN is what ``train run`` or ``train merge`` wrote: a peft adapter folder (loaded with
``AutoPeftModelForCausalLM``, whose config names the base) or a full model folder (``AutoModelForCausalLM``), with
its tokenizer beside it (``AutoTokenizer``). Nothing of padless's training path is used: the folder is loaded as
any inference tool would load it. The prompt goes through the tokenizer's chat template as one user turn (after an
optional system prompt, with optional tool schemas) when the tokenizer has one, else it is plain text to continue.
Decoding is greedy unless ``temperature`` > 0.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from padless.shards.cli_config import one_line

from .config import TrainError
from .output import has_tokenizer

__all__ = ["chat", "load_output", "prompt_ids", "read_tools"]


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


def prompt_ids(
    tokenizer: Any, prompt: str, *, system: str | None = None, tools: list[dict[str, Any]] | None = None
) -> torch.Tensor:
    """The prompt as token ids (1, n): one user turn (after ``system``, with ``tools``) through the chat template,
    or plain text to continue when the tokenizer has none. A template that leaves out the system prompt or a tool
    is an error: the model would not see what was asked for; so is plain text that gives no token (an empty prompt)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        if system is not None or tools:
            raise TrainError("--system and --tools need a chat template; this tokenizer has none")
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:  # generate() cannot start from no token at all
            raise TrainError(
                f"--prompt {prompt!r} gives no token: this tokenizer has no chat template and adds no token of its "
                "own, so the model has nothing to continue; give --prompt some text"
            )
        return ids
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)
    if system is not None and system not in text:
        raise TrainError("the chat template leaves out the system prompt (--system); it renders no system turn")
    for tool in tools or []:
        name = (tool.get("function") or tool).get("name")
        if name and name not in text:
            raise TrainError(f"the chat template leaves out the tool {name!r} (--tools); it renders no tools")
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def read_tools(path: str | os.PathLike) -> list[dict[str, Any]]:
    """``--tools FILE``: a JSON list of tool schemas (or one schema), as transformers' chat templates take them."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainError(f"--tools {str(path)!r}: cannot read a JSON file ({one_line(error)})") from error
    tools = [value] if isinstance(value, dict) else value
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise TrainError(f"--tools {str(path)!r}: expected a JSON list of tool schemas (objects)")
    return tools


def chat(
    run: str | os.PathLike,
    prompt: str,
    *,
    system: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    device: str | None = None,
    seed: int = 0,
) -> str:
    """The model's reply to ``prompt`` (the new tokens only, decoded without special tokens)."""
    if max_new_tokens < 1:
        raise TrainError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:  # also NaN, which would otherwise decode greedily without a word
        raise TrainError(f"--temperature must be >= 0 (0 = greedy) and finite, got {temperature}")
    from .prepare import parse_device

    device = str(parse_device(device)) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_output(run, device)
    ids = prompt_ids(tokenizer, prompt, system=system, tools=tools)
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
