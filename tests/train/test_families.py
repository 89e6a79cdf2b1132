"""The family table: required families present, model_type lookup, every row buildable as a tiny model."""

from __future__ import annotations

import pytest

from padless.train.families import FAMILIES, SUPPORTED_FAMILIES, family_for_model_type
from padless.train.modeling import TINY_FAMILIES, tiny_config


def test_required_families_are_supported():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma"} <= set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_has_a_tiny_config_that_maps_back(name):
    assert name in TINY_FAMILIES
    config = tiny_config(name, 64)
    assert family_for_model_type(config.model_type) is FAMILIES[name]


def test_unknown_model_type_is_not_patched():
    assert family_for_model_type("gpt_neox") is None
    assert family_for_model_type("") is None


def test_family_switches():
    assert FAMILIES["gemma"].norm_offset == 1.0 and FAMILIES["gemma"].embed_scale
    assert FAMILIES["qwen3"].qk_norm and not FAMILIES["qwen2"].qk_norm
    assert FAMILIES["llama"].norm_offset == 0.0 and not FAMILIES["llama"].embed_scale
    assert FAMILIES["gemma2"].sandwich_norm and FAMILIES["gemma2"].final_softcap_key == "final_logit_softcapping"
