"""The FLOP count of ``train plan`` and ``train run`` is what a text token runs through: a mixture-of-experts layer's
router, shared expert and top-k routed experts, and no vision tower; the memory lines still hold every parameter."""

from __future__ import annotations

import dataclasses
import re
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from padless.train.adapters import apply_adapters
from padless.train.metrics import _routed_experts_share, active_matmul_params, flop_model, step_flop_model
from padless.train.plan import Setting, estimate, inventory

# The decoder both models of a pair share: the same attention, norms and (untied) head.
DECODER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 512, "tie_word_embeddings": False}  # fmt: skip
EXPERTS, TOP_K, EXPERT_WIDTH = 8, 2, 32

# (MoE model_type, its config's MoE fields, the dense model_type of the same layer, shared expert width, router
# rows per layer: E scores, plus Qwen2-MoE's one-row gate of the shared expert).
QWEN_MOE = {"num_experts": EXPERTS, "moe_intermediate_size": EXPERT_WIDTH}
MOE_CASES = [
    ("qwen3_moe", {**QWEN_MOE, "intermediate_size": 96}, "qwen3", 0, EXPERTS),
    ("mixtral", {"num_local_experts": EXPERTS, "intermediate_size": EXPERT_WIDTH}, "mistral", 0, EXPERTS),
    ("qwen2_moe", {**QWEN_MOE, "shared_expert_intermediate_size": 48}, "qwen2", 48, EXPERTS + 1),
]


@pytest.mark.parametrize(("moe", "fields", "dense", "shared", "router_rows"), MOE_CASES)
def test_a_moe_is_timed_as_the_dense_model_k_experts_wide(
    moe: str, fields: dict[str, Any], dense: str, shared: int, router_rows: int
) -> None:
    """A token runs the router, the shared expert and k of the E routed experts: the plan's FLOPs and step time are
    those of the dense model whose MLP is k experts (and the shared expert) wide plus the router, while its weights
    hold all E experts."""
    moe_inv = inventory(AutoConfig.for_model(moe, **DECODER, **fields, num_experts_per_tok=TOP_K))
    dense_inv = inventory(AutoConfig.for_model(dense, **DECODER, intermediate_size=TOP_K * EXPERT_WIDTH + shared))
    hidden, layers = DECODER["hidden_size"], DECODER["num_hidden_layers"]
    router = layers * router_rows * hidden
    assert moe_inv.matmul_params == dense_inv.matmul_params + router
    setting = Setting("lora", 4096, "on")
    twin = dataclasses.replace(dense_inv, matmul_params=dense_inv.matmul_params + router)
    moe_plan, twin_plan = (estimate(inv, setting, sum_sq_per_token=1024) for inv in (moe_inv, twin))
    assert moe_plan.step_s == pytest.approx(twin_plan.step_s)
    # Memory: every expert's gate, up and down projections, in bf16.
    idle_experts = layers * 3 * hidden * (EXPERTS - TOP_K) * EXPERT_WIDTH
    assert moe_plan.weights - estimate(dense_inv, setting).weights == 2 * (idle_experts + router)


def test_train_run_counts_a_lora_moe_as_the_plan_does() -> None:
    """``train run``'s MFU (``flop_model`` of the LoRA-wrapped model) counts the same k of E experts as the plan,
    the dense twin's parameters plus the router's; the adapters peft puts on the experts and router are not counted."""
    moe, fields, dense, shared, router_rows = MOE_CASES[0]
    config = AutoConfig.for_model(moe, **DECODER, **fields, num_experts_per_tok=TOP_K)
    model = apply_adapters(AutoModelForCausalLM.from_config(config), mode="lora", r=4)
    assert any("experts" in name and "lora_" in name for name, _ in model.named_parameters())
    twin = inventory(AutoConfig.for_model(dense, **DECODER, intermediate_size=TOP_K * EXPERT_WIDTH + shared))
    router = DECODER["num_hidden_layers"] * router_rows * DECODER["hidden_size"]
    counted = flop_model(model, full=False, checkpointing="off").matmul_params
    assert counted == twin.matmul_params + router == inventory(config).matmul_params


def test_a_multimodal_model_is_timed_as_its_text_model() -> None:
    """Gemma 3 trains on text packs: the vision tower and projector never run, so the plan's FLOPs, step time and
    ``train run``'s FLOP model (its attention sized from ``text_config``) are the text model's; its weights are the
    whole model's."""
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    multimodal = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision)
    alone = AutoConfig.for_model("gemma3_text", **text)
    mm_inv, text_inv = inventory(multimodal), inventory(alone)
    assert mm_inv.matmul_params == text_inv.matmul_params
    setting = Setting("lora", 4096, "on")
    mm_plan, text_plan = (estimate(inv, setting, sum_sq_per_token=1024) for inv in (mm_inv, text_inv))
    assert mm_plan.step_s == pytest.approx(text_plan.step_s)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(multimodal)
    towers = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n)
    assert towers > 0 and mm_plan.weights - text_plan.weights == 2 * towers
    flops = flop_model(model, full=False, checkpointing="on")
    expected = step_flop_model(text_inv.matmul_params, 2, 4, 16, full=False, checkpointing="on")
    assert flops == expected and flops.per_sq_len > 0


def _meta_model(model_type: str, **fields: Any) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))


def _counted_quietly(model: torch.nn.Module) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recognised layout: no warning
        return active_matmul_params(model)


@pytest.mark.parametrize(("moe", "fields"), [(moe, fields) for moe, fields, *_ in MOE_CASES])
def test_a_recognised_moe_counts_without_a_warning(moe: str, fields: dict[str, Any]) -> None:
    _counted_quietly(_meta_model(moe, **DECODER, **fields, num_experts_per_tok=TOP_K))


def test_dbrx_names_its_experts_in_its_ffn_config() -> None:
    """DBRX keeps k and E in ``ffn_config`` (``moe_top_k``, ``moe_num_experts``): E experts of which k run count as
    k experts that all run, plus the router's E - k extra rows per layer."""
    dbrx = {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 512, "max_seq_len": 128,
            "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0}}  # fmt: skip

    def counted(experts: int) -> int:
        ffn = {"ffn_hidden_size": EXPERT_WIDTH, "moe_num_experts": experts, "moe_top_k": TOP_K}
        return _counted_quietly(_meta_model("dbrx", **dbrx, ffn_config=ffn))

    assert counted(EXPERTS) == counted(TOP_K) + dbrx["n_layers"] * (EXPERTS - TOP_K) * dbrx["d_model"]
    config = SimpleNamespace(ffn_config={"moe_top_k": TOP_K, "moe_num_experts": EXPERTS})  # older configs: a dict
    assert _routed_experts_share(config) == (TOP_K, EXPERTS)


# Configs that route tokens to k of E experts whose weights padless finds under no module named ``experts``:
# JetMoe's MLP holds them as 3-D ``input_linear``/``output_linear`` (its attention's are under ``experts``), Doge's
# as the rows of ``down_embed``/``up_embed``.
UNRECOGNISED_MOES = [
    ("jetmoe", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 16,
                "intermediate_size": 32, "vocab_size": 512, "num_local_experts": EXPERTS},
     r"and layers\.0\.mlp\.input_linear\.weight \(3 more tensors alike\) holds 8 experts' weights outside one"),
    ("doge", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "is_moe": True, "num_experts": 16},
     r"and its decoder has none"),
]  # fmt: skip


@pytest.mark.parametrize(("moe", "fields", "where"), UNRECOGNISED_MOES)
def test_experts_outside_a_module_named_experts_are_counted_in_full_with_a_warning(
    moe: str, fields: dict[str, Any], where: str
) -> None:
    """Rather than silently counting every expert as if it ran: one warning that names the model type."""
    model = _meta_model(moe, **fields, num_experts_per_tok=TOP_K)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        active_matmul_params(model)
    assert [w.category for w in caught] == [UserWarning]
    message = str(caught[0].message)
    assert message.startswith(f"model_type {moe!r} routes each token to {TOP_K} of ")
    assert re.search(where, message), message
    assert "step FLOPs (train plan's step time, train run's MFU) count those experts in full" in message
