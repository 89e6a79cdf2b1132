"""The long-context path as a whole: checkpoints offloaded to the host with the top layer's kept on the device
(``--checkpoint-gpu-gib``), each layer's attention output kept with its checkpoint (``--keep-attention``) and the
MLP in token tiles (``--mlp-tile-tokens``), all at once, give the loss and every LoRA gradient of the plain
unchunked computation: on the CPU with a tiny model at a few thousand tokens and small tiles, on a GPU at one
131,072-token sequence."""

from __future__ import annotations

import pytest
import torch

from padless.train.adapters import apply_adapters
from padless.train.modeling import load_model
from padless.train.offload_budget import CheckpointShape, layers_on_gpu
from padless.train.packed_forward import packed_loss

from .tiny_models import make_batch, randomize_lora, tiny_model


def _backward(model, batch, **options) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every trainable ``.grad`` after ``loss.backward()`` (the tiled MLP's weights get theirs there)."""
    model.zero_grad(set_to_none=True)
    total, _ = packed_loss(model, batch, **options)
    total.backward()
    return total.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def _top_layer_budget(model, tokens: int, dtype: torch.dtype) -> int:
    """``checkpoint_gpu_bytes`` that keeps exactly the top layer's checkpoint (input, attention output, lse)."""
    shape = CheckpointShape.of(model.config, dtype)
    one = sum(shape.tensor_bytes(tokens, True))
    assert layers_on_gpu(one, shape, tokens, True) == 1
    return one


def _long_options(model, batch, dtype: torch.dtype, tile: int) -> dict:
    budget = _top_layer_budget(model, batch.num_tokens, dtype)
    return dict(checkpointing="offload", keep_attention=True, checkpoint_gpu_bytes=budget, mlp_tile_tokens=tile)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def test_long_path_equals_the_unchunked_computation_on_cpu() -> None:
    model = apply_adapters(tiny_model("qwen3", num_hidden_layers=3), mode="lora", r=4, alpha=8)
    randomize_lora(model)
    model.train()
    batch = make_batch([2500, 699, 1], seed=21)  # one long example, a shorter one, a one-token example
    want_loss, want = _backward(model, batch)
    loss, got = _backward(model, batch, **_long_options(model, batch, torch.float32, tile=256))
    assert torch.allclose(loss, want_loss, rtol=1e-5), (float(loss), float(want_loss))
    assert got.keys() == want.keys() and any(".mlp." in k for k in got) and any(".self_attn." in k for k in got)
    for name in want:
        assert _relative_error(got[name], want[name]) < 1e-4, name  # fp32 sums in another order


@pytest.mark.slow
def test_long_path_on_the_triton_kernels_equals_the_plain_path(monkeypatch) -> None:
    """The same on the Triton kernels (Triton's interpreter on a CPU): flash attention with its kept output, the
    in-place gated activation, RoPE and RMSNorm inside tiles and recomputes; a few hundred tokens."""
    monkeypatch.setenv("PADLESS_KERNELS", "triton")
    model = apply_adapters(tiny_model("qwen3", num_hidden_layers=2), mode="lora", r=4, alpha=8)
    randomize_lora(model)
    model.train()
    batch = make_batch([150, 90, 1], seed=22)
    want_loss, want = _backward(model, batch)
    loss, got = _backward(model, batch, **_long_options(model, batch, torch.float32, tile=64))
    assert torch.allclose(loss, want_loss, rtol=1e-5), (float(loss), float(want_loss))
    assert got.keys() == want.keys()
    for name in want:
        assert _relative_error(got[name], want[name]) < 1e-4, name


@pytest.mark.gpu
def test_gpu_long_path_at_128k_tokens_equals_the_plain_path() -> None:
    """One 131,072-token example through the Triton kernels in bf16: the long path's loss and LoRA gradients match
    the plain path's (no checkpointing, no tiles) up to bf16 rounding of the differently sized MLP GEMMs."""
    tokens, vocab = 131072, 1024
    config = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 64, "num_hidden_layers": 3, "max_position_embeddings": tokens}  # fmt: skip
    base = load_model(None, vocab_size=vocab, family="qwen3", dtype=torch.bfloat16, device="cuda",
                      config_overrides=config)  # fmt: skip
    model = apply_adapters(base, mode="lora", r=8, alpha=16)
    randomize_lora(model, std=0.05)
    model.train()
    batch = make_batch([tokens], vocab_size=vocab, seed=5, device="cuda")
    want_loss, want = _backward(model, batch)
    loss, got = _backward(model, batch, **_long_options(model, batch, torch.bfloat16, tile=8192))
    assert torch.isfinite(want_loss) and abs(float(loss - want_loss)) <= 2e-3 * abs(float(want_loss))
    assert got.keys() == want.keys() and any(".mlp." in k for k in got)
    for name in want:
        assert _relative_error(got[name], want[name]) < 2e-2, (name, _relative_error(got[name], want[name]))
