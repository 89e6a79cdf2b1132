"""Frozen vocabulary matrices (input embedding, lm_head) kept in pinned host memory for ``--memory low``.

A LoRA or QLoRA run never updates the embedding or the lm_head, and uses them in two cheap ways: the embedding
is a row lookup (T rows a step) and the lm_head is read once by the loss. So they need not hold GPU memory:
Qwen3-4B's tied embedding is 0.72 GiB in bf16 against 1.75 GiB for all its NF4 layers, Qwen3-8B's untied pair
2.3 GiB. :func:`keep_vocab_on_host` moves them to pinned host memory, one tensor each (torch's caching host
allocator rounds each up to a power of two: Qwen3-8B's pair pins 4 GiB, ``offload_budget.vocab_host_bytes``); the
packed forward then reads the embedding rows with a kernel straight out of that memory
(:func:`padless.kernels.embedding_gather.gather_rows`), and the loss streams the lm_head through
:func:`padless.kernels.streamed_cross_entropy.streamed_linear_cross_entropy`. Neither
syncs with the host, so a low-memory step can still run as a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import TrainError
from .model_patch import get_patch, unwrap_model

__all__ = ["embed_from_host", "keep_vocab_on_host"]


def _move_to_host(param: nn.Parameter, pinned: bool) -> int:
    if param.device.type == "cpu":
        return 0
    host = torch.empty(param.shape, dtype=param.dtype, pin_memory=pinned)
    host.copy_(param.detach())
    param.data = host
    return host.numel() * host.element_size()


def keep_vocab_on_host(model: nn.Module) -> int:
    """Move the frozen input embedding and lm_head weights of a patched ``model`` to pinned host memory (a tied
    pair once) and mark its patch so the packed forward uses them from there; returns the bytes moved.

    On a CPU model nothing moves, but the forward still takes the host path (the embedding gather and the streamed
    loss, through their references unless ``PADLESS_KERNELS=triton``), so CPU tests run the same model code. A
    trainable embedding or lm_head (full fine-tuning) stays where it is, and so does the other when they are tied.
    The unpatched fallback (transformers' own forward) cannot use host weights: a TrainError.
    """
    handle = get_patch(model)
    if handle is None or handle.fallback:
        raise TrainError(
            "--memory low keeps the embedding and lm_head in host memory, which only the patched packed path can "
            "use; this architecture takes transformers' own forward. Use --memory fast"
        )
    hf = unwrap_model(model)
    module = hf.get_input_embeddings()
    if not isinstance(module, nn.Embedding):
        raise TrainError(
            f"--memory low gathers embedding rows itself and knows nn.Embedding (and its scaled subclasses), not "
            f"{type(module).__name__}; use --memory fast"
        )
    embedding, head = module.weight, hf.get_output_embeddings().weight
    if embedding.requires_grad or head.requires_grad:
        return 0
    pinned = torch.cuda.is_available() and embedding.device.type == "cuda"
    moved = _move_to_host(embedding, pinned)
    if head is not embedding:
        moved += _move_to_host(head, pinned)
    handle.vocab_on_host = True
    return moved


def embed_from_host(embedding: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """``embedding(input_ids)`` on the ids' device for an embedding whose weight is in host memory (on a GPU a
    kernel reads the rows out of pinned memory), scaled as a scaled-embedding subclass (Gemma's ``embed_scale``)
    scales them."""
    weight = embedding.weight
    rows = ops.gather_rows(weight, input_ids)
    scale = getattr(embedding, "embed_scale", None)
    if scale is not None:
        rows = rows * (scale.to(rows.device, rows.dtype) if isinstance(scale, torch.Tensor) else scale)
    return rows
