"""Test builders for the model path: tiny fp32 models, random packed micro-batches, one-by-one HF references.

Shared by the model-path tests and importable by other train tests. Everything runs on CPU in fp32 with eager
attention, so the unpatched Hugging Face model is an independent reference for the packed path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from padless.train.batch import IGNORE_INDEX, MicroBatch
from padless.train.modeling import load_model

__all__ = [
    "VOCAB",
    "example_only_labels",
    "grads_of",
    "hf_example_loss",
    "make_batch",
    "randomize_lora",
    "tiny_model",
]

VOCAB = 97
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}


def tiny_model(family: str, *, seed: int = 0, vocab_size: int = VOCAB, **overrides) -> nn.Module:
    """A tiny fp32 CPU model of ``family`` (eager attention: the plainest HF reference)."""
    model = load_model(None, vocab_size=vocab_size, family=family, seed=seed, config_overrides={**SMALL, **overrides})
    model.config._attn_implementation = "eager"
    return model


def make_batch(
    lengths: Sequence[int], *, vocab_size: int = VOCAB, seed: int = 0, prompt: int = 2, device: str = "cpu"
) -> MicroBatch:
    """Random packed micro-batch; each example's first ``prompt`` tokens (at least the first) are not trained."""
    gen = torch.Generator().manual_seed(seed)
    total = int(sum(lengths))
    input_ids = torch.randint(0, vocab_size, (total,), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    labels = input_ids.clone()
    for s in range(len(lengths)):
        start = int(cu[s])
        labels[start : start + max(1, min(prompt, int(lengths[s]) - 1))] = IGNORE_INDEX
    batch = MicroBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        labels=labels,
        cu_seqlens=cu,
        max_seqlen=int(max(lengths)),
        num_tokens=total,
        num_trainable=int((labels != IGNORE_INDEX).sum()),
    )
    return batch.to(device)


def replace(batch: MicroBatch, **fields) -> MicroBatch:
    """A copy of ``batch`` with some fields replaced."""
    values = {name: getattr(batch, name) for name in MicroBatch.__dataclass_fields__}
    values.update(fields)
    return MicroBatch(**values)


def example_only_labels(batch: MicroBatch, s: int) -> MicroBatch:
    """The same packed stream, scoring only example ``s`` (the others' labels set to -100)."""
    a, b = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
    labels = torch.full_like(batch.labels, IGNORE_INDEX)
    labels[a:b] = batch.labels[a:b]
    return replace(batch, labels=labels)


def hf_example_loss(model: nn.Module, batch: MicroBatch, s: int) -> torch.Tensor:
    """Sum of next-token losses of example ``s`` run ALONE through the stock Hugging Face forward (batch 1)."""
    a, b = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
    logits = model(input_ids=batch.input_ids[None, a:b], use_cache=False).logits[0].float()
    return F.cross_entropy(logits[:-1], batch.labels[a + 1 : b], ignore_index=IGNORE_INDEX, reduction="sum")


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def grads_of(loss: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """d loss / d params (zeros where a parameter is unused), without touching .grad."""
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), grads, strict=True)}


def randomize_lora(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """peft starts lora_B at zero (no gradient reaches lora_A); give every adapter weight a random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
