"""The table of model families that padless runs on its packed varlen path, one row per family.

Why a table: every supported family is a Llama-shaped decoder (embed -> [norm -> attention -> residual -> norm ->
gated MLP -> residual] x L -> norm -> lm_head); they differ only in a handful of switches (Gemma's (1 + w) norms and
embedding scale, Qwen3's per-head q/k norms, Gemma 2's sandwich norms and soft-capping, where a sliding window comes
from). One generic packed forward (``train.packed_forward``) reads these switches, instead of one copied patch
function per architecture. A ``model_type`` that is not in the table trains through transformers' own modules
with an explicit block-diagonal mask (``train.model_patch``), never silently contaminated.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

__all__ = ["FAMILIES", "SUPPORTED_FAMILIES", "FamilyName", "FamilySpec", "family_for_model_type"]

# The families of the table below (``--family`` of a random model takes the same names).
FamilyName = Literal["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"]


@dataclass(frozen=True)
class FamilySpec:
    """What distinguishes one decoder family on the packed path (every field is a switch of the generic forward)."""

    name: str
    model_types: tuple[str, ...]
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + w): Gemma's (1 + w) norms use 1.0
    embed_scale: bool = False  # hidden = embed(ids) * sqrt(E) (Gemma), unless the embedding module scales itself
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sandwich_norm: bool = False  # extra post-attention / pre- and post-MLP norms (Gemma 2)
    window_from_config: bool = False  # sliding window = config.sliding_window on every layer (Mistral)
    attn_softcap_key: str | None = None  # config key of the attention logit soft-cap (Gemma 2)
    final_softcap_key: str | None = None  # config key of the final logit soft-cap (Gemma 2)


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(name="llama", model_types=("llama",)),
        FamilySpec(name="mistral", model_types=("mistral",), window_from_config=True),
        FamilySpec(name="qwen2", model_types=("qwen2",)),
        FamilySpec(name="qwen3", model_types=("qwen3",), qk_norm=True),
        FamilySpec(name="gemma", model_types=("gemma",), norm_offset=1.0, embed_scale=True),
        FamilySpec(
            name="gemma2",
            model_types=("gemma2",),
            norm_offset=1.0,
            embed_scale=True,
            sandwich_norm=True,
            attn_softcap_key="attn_logit_softcapping",
            final_softcap_key="final_logit_softcapping",
        ),
    )
}

SUPPORTED_FAMILIES: tuple[str, ...] = typing.get_args(FamilyName)
assert tuple(FAMILIES) == SUPPORTED_FAMILIES, "FamilyName and the FAMILIES table name the same families"


def family_for_model_type(model_type: str) -> FamilySpec | None:
    """The family row for a Hugging Face ``config.model_type``, or None when padless does not patch it."""
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    return None
