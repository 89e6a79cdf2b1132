"""The packed forward and loss: one varlen token stream through the model's own weights, logits never built.

For a patched family (``train.families``) every decoder layer runs
norm -> q/k/v projections -> (T, H, D) views -> q/k norms (Qwen3) -> RoPE on the packed position_ids ->
varlen attention over ``cu_seqlens`` -> o_proj -> residual -> norm -> fused SwiGLU/GeGLU MLP -> residual,
then the final norm and the fused linear cross-entropy against ``lm_head.weight``. No attention mask, no KV cache,
no padding; the projections go through ``train.lora_linear.project``: a plain peft LoRA Linear takes a fused
low-rank path in the activations' dtype, anything else (bitsandbytes' 4-bit layers included) is called as a
module. Each op resolves to a Triton kernel or its reference through ``train.ops``. With ``mlp_tile_tokens`` the
MLP (and a sandwich norm after it) runs a tile of tokens at a time (``train.tiled_mlp``).

An unpatched architecture goes through transformers' own forward with packed position_ids and an explicit
block-diagonal causal mask (``train.model_patch`` explains why and warns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from padless.train import ops
from padless.train.activation_checkpoint import HostOffload, check_mode, offload_saved_tensors, run_layer
from padless.train.batch import IGNORE_INDEX, MicroBatch
from padless.train.config import TrainError
from padless.train.host_vocab import embed_from_host
from padless.train.kept_attention import KeptAttention
from padless.train.lora_linear import project
from padless.train.model_patch import LayerPlan, PatchHandle, get_patch, patch_model, unwrap_model
from padless.train.offload_budget import CheckpointShape, layers_on_gpu
from padless.train.tiled_mlp import tiled_mlp

__all__ = ["PackedLossModule", "block_causal_mask", "packed_loss"]


def _norm(module: nn.Module, x: torch.Tensor, offset: float) -> torch.Tensor:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = module.eps
    return ops.rms_norm(x, module.weight, float(eps), offset)


def _mlp(mlp: nn.Module, h: torch.Tensor, activation: str) -> torch.Tensor:
    gate = project(mlp.gate_proj, h)
    up = project(mlp.up_proj, h)
    # gate and up are this function's own: their backward may overwrite them with their gradients.
    if activation == "swiglu":
        act = ops.swiglu(gate, up, overwrite_inputs=True)
    elif activation == "geglu_tanh":
        act = ops.geglu(gate, up, "tanh", overwrite_inputs=True)
    elif activation == "geglu_none":
        act = ops.geglu(gate, up, "none", overwrite_inputs=True)
    else:
        act = mlp.act_fn(gate) * up
    return project(mlp.down_proj, act)


def _decoder_layer(
    layer: nn.Module,
    plan: LayerPlan,
    handle: PatchHandle,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    batch: MicroBatch,
    attention: KeptAttention | None = None,
    mlp_tile_tokens: int = 0,
    preserve_rng_state: bool = True,
) -> torch.Tensor:
    family = handle.family
    offset = family.norm_offset
    attn = layer.self_attn
    n_tokens = x.shape[0]
    h = _norm(layer.input_layernorm, x, offset)
    q = project(attn.q_proj, h).view(n_tokens, -1, plan.head_dim)
    k = project(attn.k_proj, h).view(n_tokens, -1, plan.head_dim)
    v = project(attn.v_proj, h).view(n_tokens, -1, plan.head_dim)
    if family.qk_norm:
        q = _norm(attn.q_norm, q, offset)
        k = _norm(attn.k_norm, k, offset)
    q, k = ops.rope(q, k, cos, sin, batch.position_ids)
    o = (attention or ops.varlen_attention)(
        q, k, v, batch.cu_seqlens, batch.max_seqlen, plan.scale, True, plan.window, plan.softcap, batch.mean_seqlen
    )
    o = project(attn.o_proj, o.reshape(n_tokens, -1))
    if family.sandwich_norm:
        o = _norm(layer.post_attention_layernorm, o, offset)
    x = x + o
    h = _norm(layer.pre_feedforward_layernorm if family.sandwich_norm else layer.post_attention_layernorm, x, offset)

    def feed_forward(rows: torch.Tensor) -> torch.Tensor:
        # Row-wise through the sandwich norm, so that a tiled MLP is the layer's last op that saves a tensor
        # (checkpointing's recompute then stops before it: train.tiled_mlp).
        y = _mlp(layer.mlp, rows, handle.activation)
        return _norm(layer.post_feedforward_layernorm, y, offset) if family.sandwich_norm else y

    if 0 < mlp_tile_tokens < n_tokens:
        # preserve_rng_state=False (no dropout) also keeps the generator untouched inside a CUDA graph capture
        return x + tiled_mlp(feed_forward, h, mlp_tile_tokens, preserve_rng_state=preserve_rng_state)
    return x + feed_forward(h)


def _segment(calls: list, preserve_rng_state: bool):
    """Several layers under one checkpoint: each layer is checkpointed on its own inside it, so the segment's
    recompute keeps only the inputs of its layers (up to the last one's) and each layer recomputes its activations
    when its backward comes; the checkpoint's early stop ends the segment's recompute at its last layer's input."""

    def run(hidden: torch.Tensor) -> torch.Tensor:
        for call in calls:
            hidden = run_layer(call, hidden, "on", preserve_rng_state)
        return hidden

    return run


def _packed_path(
    handle: PatchHandle,
    batch: MicroBatch,
    checkpointing: str,
    preserve_rng_state: bool = True,
    checkpoint_gpu_bytes: int = 0,
    keep_attention: bool = False,
    mlp_tile_tokens: int = 0,
    checkpoint_layers: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    hf = handle.model
    decoder = hf.get_decoder()
    if handle.vocab_on_host:
        x = embed_from_host(decoder.embed_tokens, batch.input_ids)  # (T, E)
    else:
        x = decoder.embed_tokens(batch.input_ids)  # (T, E)
    if handle.embed_scale is not None:
        x = x * handle.embed_scale_tensor(x.dtype, x.device)
    cos, sin = handle.rope_cache(batch.max_seqlen, x.device)
    offload = HostOffload() if checkpointing == "offload" else None  # one per forward: the backward prefetches
    # Checkpoints: one per segment of ``checkpoint_layers`` layers (the input of its first layer). The top segments
    # whose checkpoints fit the GPU budget keep them there (checkpointing "on" for them): the backward walks top
    # down, so it starts on them while the first offloaded segment's copy comes back.
    n_layers, on_gpu = len(decoder.layers), 0
    starts = range(0, n_layers, checkpoint_layers)
    if offload is not None and checkpoint_gpu_bytes:
        shape = CheckpointShape.of(hf.config, x.dtype, checkpoint_layers)
        on_gpu = layers_on_gpu(checkpoint_gpu_bytes, shape, x.shape[0], keep_attention)
    keep = keep_attention and checkpointing != "off" and torch.is_grad_enabled()
    for number, start in enumerate(starts):
        mode = "on" if offload is not None and number >= len(starts) - on_gpu else checkpointing
        calls = []
        for layer, plan in zip(decoder.layers[start : start + checkpoint_layers], handle.layers[start:]):
            attention = KeptAttention(offload if mode == "offload" else None) if keep else None

            def step(
                hidden: torch.Tensor,
                layer: nn.Module = layer,
                plan: LayerPlan = plan,
                attention: KeptAttention | None = attention,
            ) -> torch.Tensor:
                return _decoder_layer(
                    layer, plan, handle, hidden, cos, sin, batch, attention, mlp_tile_tokens, preserve_rng_state
                )

            def call(hidden: torch.Tensor, layer: nn.Module = layer, step=step) -> torch.Tensor:
                # Through nn.Module.__call__ so the layer's hooks fire (the patched instance forward runs ``step``);
                # not through HF's own checkpointing wrapper: ``run_layer`` owns checkpointing here.
                return nn.Module.__call__(layer, hidden, padless_step=step)

            calls.append(call)
        if len(calls) == 1:
            x = run_layer(calls[0], x, mode, preserve_rng_state, offload)
        else:
            x = run_layer(_segment(calls, preserve_rng_state), x, mode, preserve_rng_state, offload)
    if offload is not None and x.requires_grad:
        # The backward reaches the decoder's top here: start bringing back the last offloaded layer's tensors.
        x.register_hook(lambda grad: offload.prefetch_last())
    x = _norm(decoder.norm, x, handle.family.norm_offset)
    weight = hf.get_output_embeddings().weight
    # Prompt tokens (ignored labels) need no lm_head: a host-known bound of the counted tokens (no sync) lets the
    # loss skip them. A static (CUDA-graph) batch carries its shape's bound, the same for every replayed batch;
    # eagerly the batch's own trainable count; a capture of a batch without one computes every token.
    bound = batch.counted_bound
    if bound is None and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        bound = batch.num_trainable
    if handle.vocab_on_host:
        return ops.streamed_linear_cross_entropy(x, weight, batch.labels, IGNORE_INDEX, handle.final_softcap, bound)
    return ops.fused_linear_cross_entropy(x, weight, batch.labels, IGNORE_INDEX, handle.final_softcap, bound)


def block_causal_mask(
    cu_seqlens: torch.Tensor, n_tokens: int, dtype: torch.dtype, window: int | None = None
) -> torch.Tensor:
    """(1, 1, T, T) additive mask: 0 where token i may see token j (same example, j <= i, within window), else min.

    Built on ``cu_seqlens``' device without a host sync.
    """
    device = cu_seqlens.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    example = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=n_tokens)
    idx = torch.arange(n_tokens, device=device)
    allowed = (example[:, None] == example[None, :]) & (idx[None, :] <= idx[:, None])
    if window is not None:
        allowed &= idx[None, :] > idx[:, None] - window
    mask = torch.zeros(n_tokens, n_tokens, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _fallback_mask(hf: nn.Module, batch: MicroBatch, dtype: torch.dtype) -> torch.Tensor | dict:
    config = hf.config
    n_tokens = batch.input_ids.shape[0]
    full = block_causal_mask(batch.cu_seqlens, n_tokens, dtype)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return full
    sliding = block_causal_mask(batch.cu_seqlens, n_tokens, dtype, int(window))
    if layer_types is None:
        return sliding
    # Models with per-layer attention types take a dict of masks keyed by layer type.
    return {"full_attention": full, "sliding_attention": sliding}


def _fallback_path(handle: PatchHandle, batch: MicroBatch, checkpointing: str) -> tuple[torch.Tensor, torch.Tensor]:
    hf = handle.model
    dtype = hf.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:
        dtype = torch.bfloat16
    mask = _fallback_mask(hf, batch, dtype)
    # transformers >= 5.2x renamed the property; read whichever exists without tripping a deprecation warning.
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(hf), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    was_checkpointing = bool(getattr(hf, flag, False))
    use_checkpoint = checkpointing != "off" and torch.is_grad_enabled()
    if use_checkpoint and not was_checkpointing:
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        kwargs = {
            "input_ids": batch.input_ids[None],
            "position_ids": batch.position_ids[None],
            "attention_mask": mask,
            "use_cache": False,
        }
        if checkpointing == "offload" and use_checkpoint:
            with offload_saved_tensors():
                logits = hf(**kwargs).logits[0]
        else:
            logits = hf(**kwargs).logits[0]
    finally:
        if use_checkpoint and not was_checkpointing:
            if hasattr(hf, "activation_checkpointing_disable"):
                hf.activation_checkpointing_disable()
            else:
                hf.gradient_checkpointing_disable()
    # The logits are materialised here (this path is about correctness, not memory).
    targets = batch.labels.new_full(batch.labels.shape, IGNORE_INDEX)
    targets[:-1] = batch.labels[1:]
    loss_sum = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


def packed_loss(
    model: nn.Module,
    batch: MicroBatch,
    *,
    checkpointing: str = "off",
    preserve_rng_state: bool = True,
    checkpoint_gpu_bytes: int = 0,
    keep_attention: bool = False,
    mlp_tile_tokens: int = 0,
    checkpoint_layers: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses fp32 0-dim, number of counted tokens int64 0-dim) of a packed micro-batch.

    ``model``: a Hugging Face causal LM or a peft ``PeftModel`` around one, on the batch's device. It is patched on
    first use (:func:`train.model_patch.patch_model`; an unpatched family warns once and takes the fallback).
    ``checkpointing``: ``"off"`` | ``"on"`` (per-layer recompute) | ``"offload"`` (recompute, inputs in pinned CPU
    memory). Divide by the step's total trainable tokens, not per micro-batch, for a split-invariant gradient.
    ``preserve_rng_state=False``: checkpointing does not save/restore the RNG (no dropout; CUDA graph capture).
    ``checkpoint_gpu_bytes`` (``offload``): GPU bytes for the checkpoints of the top layers, which then stay on the
    GPU (``train.offload_budget``). ``keep_attention`` (``on``/``offload``): each layer's attention output and
    log-sum-exp are kept with its checkpoint, and the recompute runs no attention forward (``train.kept_attention``).
    ``mlp_tile_tokens`` > 0: a stream of more tokens runs each layer's MLP that many tokens at a time
    (:func:`train.tiled_mlp.tiled_mlp`; the MLP's parameter gradients reach ``.grad`` only, so use
    ``loss.backward()``); 0 runs it whole. On the Triton kernels the MLP's backward writes its gate/up gradients
    over the saved gate and up, so with checkpointing ``off`` a second backward through one graph
    (``retain_graph=True``) raises autograd's in-place error; ``on``/``offload`` recompute them for each backward.
    ``checkpoint_layers`` > 1 (``on``/``offload``, not with ``keep_attention``): one checkpoint per that many layers,
    each layer checkpointed again inside it (see ``_segment``).
    """
    check_mode(checkpointing)
    if mlp_tile_tokens < 0:
        raise ValueError(f"mlp_tile_tokens must be >= 0 (0 = untiled), got {mlp_tile_tokens}.")
    handle = get_patch(model) or patch_model(model)
    if handle.model is not unwrap_model(model):
        raise RuntimeError("the patch handle belongs to another model instance; call patch_model(model) again.")
    if batch.input_ids.dim() != 1:
        raise ValueError(
            f"batch.input_ids must be a flat (T,) packed stream; got shape {tuple(batch.input_ids.shape)}."
        )
    if checkpoint_gpu_bytes < 0:
        raise ValueError(f"checkpoint_gpu_bytes={checkpoint_gpu_bytes}: expected >= 0 (0 = all to the host).")
    if checkpoint_layers < 1 or (checkpoint_layers > 1 and (checkpointing == "off" or keep_attention)):
        raise ValueError(
            f"checkpoint_layers={checkpoint_layers}: expected 1, or more with checkpointing 'on'/'offload' and "
            f"without keep_attention (got checkpointing={checkpointing!r}, keep_attention={keep_attention})."
        )
    if handle.fallback:
        if keep_attention or checkpoint_gpu_bytes or checkpoint_layers > 1:
            raise TrainError(
                f"--keep-attention, --checkpoint-gpu-gib and --checkpoint-layers work on padless's packed path; "
                f"model_type {handle.model.config.model_type!r} trains through transformers' own layers. Leave them out"
            )
        if mlp_tile_tokens:
            raise TrainError(
                f"--mlp-tile-tokens {mlp_tile_tokens}: model_type {handle.model.config.model_type!r} takes the "
                "unpatched fallback path, whose MLP is transformers' own; use --mlp-tile-tokens 0"
            )
        return _fallback_path(handle, batch, checkpointing)
    return _packed_path(
        handle, batch, checkpointing, preserve_rng_state, checkpoint_gpu_bytes, keep_attention, mlp_tile_tokens,
        checkpoint_layers,
    )  # fmt: skip


class PackedLossModule(nn.Module):
    """``packed_loss`` as a module, so that a wrapper that needs the forward to go through it (DDP) can hold it.

    ``DistributedDataParallel(PackedLossModule(model))(batch)`` returns ``(loss_sum, n_counted)`` with DDP's
    gradient synchronisation prepared by its own forward. ``self.model`` is the (peft-wrapped) causal LM.
    """

    def __init__(self, model: nn.Module, checkpointing: str = "off", mlp_tile_tokens: int = 0) -> None:
        super().__init__()
        self.model = model
        self.checkpointing = check_mode(checkpointing)
        self.mlp_tile_tokens = mlp_tile_tokens

    def forward(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_loss(self.model, batch, checkpointing=self.checkpointing, mlp_tile_tokens=self.mlp_tile_tokens)
