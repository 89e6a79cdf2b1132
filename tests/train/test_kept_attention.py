"""``--keep-attention`` (``train.kept_attention``): with checkpointing on or offload, the loss and every LoRA gradient
of a ragged packed micro-batch equal the plain checkpointed computation, and the attention forward runs once per
layer per step instead of twice; on the kernels' references (fast) and on the Triton kernels (interpreter, bitwise)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from padless.kernels import attention as attention_mod
from padless.train.adapters import apply_adapters
from padless.train.config import TrainConfig, TrainError
from padless.train.kept_attention import KeptAttention
from padless.train.metrics import flop_model
from padless.train.packed_forward import packed_loss

from .tiny_models import grads_of, make_batch, randomize_lora, tiny_model, trainable

LENGTHS = [7, 12, 5, 1]  # ragged, several examples per pack, a one-token example
LAYERS = 3


def _model(family: str = "qwen3", **overrides) -> torch.nn.Module:
    overrides = {"num_hidden_layers": LAYERS, **overrides}
    model = apply_adapters(tiny_model(family, **overrides), mode="lora", r=4, alpha=8)
    randomize_lora(model)
    model.train()
    return model


def _count(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> dict[str, int]:
    """Count calls of ``padless.kernels.attention`` functions (the real functions still run)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(attention_mod, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(attention_mod, name, spy)
    return calls


def _loss_and_grads(model, batch, **options):
    total, _ = packed_loss(model, batch, **options)
    return total.detach(), grads_of(total, trainable(model))


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().clamp_min(1e-3)
    err = (got - want).abs().max()
    assert err <= 1e-5 * scale, f"{what}: max abs diff {err:.3e}, scale {scale:.3e}"


CASES = {
    "qwen3": ("qwen3", {}),
    "gemma2-softcap-window": ("gemma2", {"sliding_window": 4, "attn_logit_softcapping": 5.0}),
}


@pytest.mark.parametrize("checkpointing", ["on", "offload"])
@pytest.mark.parametrize("case", list(CASES))
def test_kept_attention_equals_plain_recompute_and_runs_attention_once(monkeypatch, case, checkpointing) -> None:
    family, overrides = CASES[case]
    model, batch = _model(family, **overrides), make_batch(LENGTHS, seed=3)
    calls = _count(monkeypatch, ("_reference_impl", "_reference_with_lse", "_reference_backward"))
    want_loss, want = _loss_and_grads(model, batch, checkpointing=checkpointing)
    assert calls == {"_reference_impl": 2 * LAYERS, "_reference_with_lse": 0, "_reference_backward": 0}
    calls.update(dict.fromkeys(calls, 0))
    loss, got = _loss_and_grads(model, batch, checkpointing=checkpointing, keep_attention=True)
    # one attention forward per layer (the recompute reuses it), one flash-style backward per layer
    assert calls == {"_reference_impl": 0, "_reference_with_lse": LAYERS, "_reference_backward": LAYERS}
    _assert_close(loss, want_loss, "loss")  # the reference's softmax vs exp(S - lse): last-bit differences
    assert got.keys() == want.keys() and all("lora_" in name for name in got)
    for name in want:
        _assert_close(got[name], want[name], name)


@pytest.mark.slow
@pytest.mark.parametrize("gpu_gib", [0.0, 1.0], ids=["all-offloaded", "all-on-gpu"])
def test_kept_attention_on_the_triton_kernels_is_bitwise_and_launches_one_forward_per_layer(
    monkeypatch, gpu_gib: float
) -> None:
    """The real kernels (on a GPU, or Triton's interpreter on CPU; the offload's copies and prefetch run on a GPU):
    the backward gets exactly the tensors it would have had."""
    monkeypatch.setenv("PADLESS_KERNELS", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2).to(device)
    batch = make_batch(LENGTHS, seed=4, device=device)
    calls = _count(monkeypatch, ("flash_fwd", "flash_bwd"))
    want_loss, want = _loss_and_grads(model, batch, checkpointing="on")
    assert calls == {"flash_fwd": 4, "flash_bwd": 2}
    calls.update(dict.fromkeys(calls, 0))
    options = {"checkpointing": "offload", "keep_attention": True, "checkpoint_gpu_bytes": int(gpu_gib * 2**30)}
    loss, got = _loss_and_grads(model, batch, **options)
    assert calls == {"flash_fwd": 2, "flash_bwd": 2}
    assert torch.equal(loss, want_loss)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_second_backward_through_a_retained_graph_recomputes_the_attention(monkeypatch) -> None:
    model, batch = _model(), make_batch(LENGTHS, seed=5)
    params = trainable(model)
    calls = _count(monkeypatch, ("_reference_impl", "_reference_with_lse"))
    total, _ = packed_loss(model, batch, checkpointing="on", keep_attention=True)
    first = torch.autograd.grad(total, list(params.values()), retain_graph=True)
    second = torch.autograd.grad(total, list(params.values()))
    assert calls == {"_reference_with_lse": 2 * LAYERS, "_reference_impl": 0}  # the second recompute's attention
    for a, b in zip(first, second, strict=True):
        _assert_close(b, a, "second backward")


def test_kept_attention_lets_go_of_the_pair_after_the_recompute() -> None:
    q, k, v = (torch.randn(6, h, 8, requires_grad=True) for h in (2, 1, 1))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    attend = KeptAttention()
    out = attend(q, k, v, cu, 4)
    assert attend.calls == 1 and attend._kept[0].data_ptr() == out.data_ptr()
    again = attend(q, k, v, cu, 4)
    assert attend._kept is None and again.data_ptr() == out.data_ptr()
    torch.testing.assert_close(attend(q, k, v, cu, 4), out)  # a third call computes it again


def test_eval_forward_keeps_nothing(monkeypatch) -> None:
    model, batch = _model(), make_batch(LENGTHS, seed=6)
    calls = _count(monkeypatch, ("_reference_impl", "_reference_with_lse"))
    with torch.no_grad():
        loss, _ = packed_loss(model, batch, checkpointing="offload", keep_attention=True)
    assert calls == {"_reference_impl": LAYERS, "_reference_with_lse": 0}
    assert torch.isfinite(loss)


def test_keep_attention_needs_checkpointing_and_the_packed_path() -> None:
    with pytest.raises(TrainError, match=r"^--keep-attention keeps the attention output .*needs --checkpointing on"):
        TrainConfig(shards="x", keep_attention=True)
    assert TrainConfig(shards="x", keep_attention=True, checkpointing="on").keep_attention
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    gpt2 = AutoModelForCausalLM.from_config(config)
    batch = make_batch([4, 3], vocab_size=50)
    fallback = r"work on padless's packed path; model_type 'gpt2'"
    with pytest.warns(UserWarning), pytest.raises(TrainError, match=fallback):
        packed_loss(gpt2, batch, checkpointing="on", keep_attention=True)


def test_flop_model_counts_no_recomputed_attention() -> None:
    model = tiny_model("llama")
    plain = flop_model(model, full=False, checkpointing="on")
    kept = flop_model(model, full=False, checkpointing="on", keep_attention=True)
    assert kept.per_token == plain.per_token and kept.per_sq_len * 4 == plain.per_sq_len * 3
