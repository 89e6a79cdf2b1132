"""The fused LoRA projection equals peft's own LoRA Linear, values and gradients, and steps aside where it must."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from padless.train.lora_linear import project


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(24, 40, bias=False)
        self.o_proj = nn.Linear(40, 24, bias=True)


def _lora_block(seed: int, **lora: object) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False, **lora)
    return get_peft_model(_Block(), config)


def _grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("name", ["q_proj", "o_proj"])
def test_fused_path_equals_peft_forward_and_gradients(name: str) -> None:
    model = _lora_block(seed=3)
    module = getattr(model.base_model.model, name)
    x = torch.randn(2, 7, module.in_features, requires_grad=True)
    upstream = torch.randn(2, 7, module.out_features)
    expected = module(x)
    actual = project(module, x)
    assert type(actual.grad_fn).__name__ == "_FrozenLoraLinearBackward"  # the one-Function path was taken
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    grads_expected = _grads(module, (expected * upstream).sum())
    grads_actual = _grads(module, (actual * upstream).sum())
    for got, want in zip(grads_actual, grads_expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    x_grad_expected = torch.autograd.grad((module(x) * upstream).sum(), x)[0]
    x_grad_actual = torch.autograd.grad((project(module, x) * upstream).sum(), x)[0]
    torch.testing.assert_close(x_grad_actual, x_grad_expected, rtol=1e-5, atol=1e-6)


def test_bf16_activations_with_fp32_adapters_stay_close_and_give_fp32_grads() -> None:
    model = _lora_block(seed=5)
    module = model.base_model.model.q_proj
    module.base_layer.to(torch.bfloat16)
    x = torch.randn(9, 24, dtype=torch.bfloat16)
    expected = module(x)  # peft: adapters in fp32, result cast back to bf16
    actual = project(module, x)
    assert actual.dtype == torch.bfloat16
    rel = (actual.float() - expected.float()).norm() / expected.float().norm()
    assert rel < 1e-2, rel
    actual.float().sum().backward()
    assert module.lora_A["default"].weight.grad.dtype == torch.float32


def test_disabled_merged_and_dora_adapters_fall_back_to_the_module() -> None:
    model = _lora_block(seed=7)
    module = model.base_model.model.q_proj
    x = torch.randn(5, 24)
    with model.disable_adapter():
        torch.testing.assert_close(project(module, x), module.base_layer(x))
    module.merge()
    torch.testing.assert_close(project(module, x), module(x))
    dora = _lora_block(seed=7, use_dora=True).base_model.model.q_proj
    torch.testing.assert_close(project(dora, x), dora(x))


def test_a_lora_bias_is_added_as_peft_adds_it() -> None:
    module = _lora_block(seed=9, lora_bias=True).base_model.model.q_proj
    with torch.no_grad():
        module.lora_B["default"].bias.normal_()  # peft starts it at zero
    x = torch.randn(5, 24)
    torch.testing.assert_close(project(module, x), module(x))


def test_plain_linear_is_just_called() -> None:
    linear = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    torch.testing.assert_close(project(linear, x), linear(x))


@pytest.mark.parametrize("case", ["dropout", "trainable_base"])
def test_paths_outside_the_frozen_function_still_match_peft(case: str) -> None:
    model = _lora_block(seed=11, lora_dropout=0.5) if case == "dropout" else _lora_block(seed=11)
    module = model.base_model.model.o_proj
    if case == "trainable_base":
        module.base_layer.weight.requires_grad_(True)
    module.eval()  # dropout off in both calls, but the module keeps its Dropout (not Identity)
    x = torch.randn(6, module.in_features)
    upstream = torch.randn(6, module.out_features)
    expected, actual = module(x), project(module, x)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(module, (actual * upstream).sum()), _grads(module, (expected * upstream).sum())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_frozen_function_matches_peft_in_bf16_within_rounding() -> None:
    model = _lora_block(seed=13)
    module = model.base_model.model.o_proj  # with a (frozen) bias
    module.base_layer.to(torch.bfloat16)
    x = torch.randn(33, module.in_features, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(33, module.out_features, dtype=torch.bfloat16)
    ref = module(x)
    out = project(module, x)
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 1e-2, rel
    params = [x] + [p for p in module.parameters() if p.requires_grad]
    want = torch.autograd.grad((ref.float() * upstream.float()).sum(), params)
    got = torch.autograd.grad((out.float() * upstream.float()).sum(), params)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert ((g.float() - w.float()).norm() / w.float().norm()) < 2e-2


@pytest.mark.parametrize("shape", [(9,), (2, 5)])
def test_output_may_be_modified_in_place_like_rope_does(shape: tuple[int, ...]) -> None:
    model = _lora_block(seed=17)
    module = model.base_model.model.q_proj
    x = torch.randn(*shape, module.in_features, requires_grad=True)
    upstream = torch.randn(*shape, module.out_features)

    def run(fn):
        out = fn(x)
        heads = out.view(*shape, 4, module.out_features // 4)  # (T, H, D) as the packed path views q
        heads.mul_(2.0)  # an in-place op on that view, as the in-place RoPE kernel does
        return torch.autograd.grad((out * upstream).sum(), [x, *(p for p in module.parameters() if p.requires_grad)])

    for got, want in zip(run(lambda t: project(module, t)), run(module)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_qlora_projection_takes_the_frozen_function_and_matches_peft(device: str) -> None:
    # peft's 4-bit LoRA layer casts every input to fp32 for the adapters (an fp32 copy of each projection's input
    # kept for backward); the frozen Function dequantizes the NF4 weight for its GEMMs and keeps only x and x A^T.
    from padless.train.adapters import apply_adapters
    from padless.train.modeling import load_model

    overrides = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "num_hidden_layers": 1}
    model = load_model(
        None, vocab_size=64, family="qwen3", dtype=torch.bfloat16, device=device, quantize_4bit=True,
        config_overrides=overrides,
    )  # fmt: skip
    model = apply_adapters(model, mode="qlora", r=8)
    module = model.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        module.lora_B["default"].weight.normal_(0, 0.05)  # peft starts B at zero
    x = torch.randn(37, 256, dtype=torch.bfloat16, device=device, requires_grad=True)
    upstream = torch.randn(37, 128, dtype=torch.bfloat16, device=device)
    out, ref = project(module, x), module(x)
    assert "FrozenLoraLinear" in type(out.grad_fn).__name__
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    params = [x, module.lora_A["default"].weight, module.lora_B["default"].weight]
    got = torch.autograd.grad((out.float() * upstream.float()).sum(), params)
    want = torch.autograd.grad((ref.float() * upstream.float()).sum(), params)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and ((g.float() - w.float()).norm() / w.float().norm()) < 2e-2
