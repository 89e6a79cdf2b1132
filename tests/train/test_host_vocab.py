"""train.host_vocab: the frozen embedding and lm_head in host memory give the same loss and gradients.

On the CPU nothing moves, but the patched forward takes the host path (rows gathered by the gather op, the loss
streamed chunk by chunk), checked against every example run alone through stock Hugging Face. On a GPU the weights
move to pinned host memory and the run matches the GPU-resident one.
"""

from __future__ import annotations

import pytest
import torch

from padless.train.adapters import apply_adapters
from padless.train.config import TrainError
from padless.train.host_vocab import embed_from_host, keep_vocab_on_host
from padless.train.model_patch import get_patch, patch_model
from padless.train.packed_forward import packed_loss
from tests.train.test_packed_parity import LENGTHS, check_parity
from tests.train.tiny_models import grads_of, make_batch, randomize_lora, tiny_model, trainable


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("qwen3", {"tie_word_embeddings": True}), ("llama", {}), ("gemma2", {"final_logit_softcapping": 4.0})],
    ids=["tied", "untied", "softcap"],
)
def test_host_path_equals_one_by_one(family, overrides):
    model = apply_adapters(tiny_model(family, **overrides), mode="lora", r=4, alpha=8)
    randomize_lora(model)
    model.train()
    patch_model(model)
    assert keep_vocab_on_host(model) == 0  # a CPU model: nothing to move
    assert get_patch(model).vocab_on_host
    check_parity(model, make_batch(LENGTHS, seed=3), trainable(model), checkpointing="offload")


def test_trainable_vocabulary_stays_and_the_fallback_refuses():
    model = apply_adapters(tiny_model("qwen3"), mode="full")
    patch_model(model)
    assert keep_vocab_on_host(model) == 0 and not get_patch(model).vocab_on_host
    plain = tiny_model("llama")
    with pytest.raises(TrainError, match="--memory fast"):
        keep_vocab_on_host(plain)  # never patched: no packed path to use host weights


def test_rows_match_the_embedding_module_with_its_scale():
    embedding = torch.nn.Embedding(11, 4)
    ids = make_batch([3, 4], vocab_size=11).input_ids
    assert torch.equal(embed_from_host(embedding, ids), embedding(ids).detach())
    embedding.embed_scale = torch.tensor(3.0)  # a scaled-embedding subclass's attribute (Gemma)
    assert torch.equal(embed_from_host(embedding, ids), 3.0 * embedding.weight.detach()[ids])


def _allocated(nbytes: int) -> int:
    """What the CUDA caching allocator takes for a tensor of ``nbytes`` (blocks are multiples of 512 bytes)."""
    return -(-nbytes // 512) * 512


@pytest.mark.gpu
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpu_vocab_in_pinned_memory_matches_and_frees_the_gpu(tied):
    model = apply_adapters(tiny_model("qwen3", vocab_size=5003, tie_word_embeddings=tied), mode="lora", r=4, alpha=8)
    randomize_lora(model)
    model = model.to("cuda", torch.bfloat16).train()
    patch_model(model)
    batch = make_batch([300, 200, 411], vocab_size=5003, seed=4).to("cpu").pin_memory().to("cuda")
    params = trainable(model)
    loss, _ = packed_loss(model, batch, checkpointing="on")
    ref = grads_of(loss, params)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    moved = keep_vocab_on_host(model)
    vocab_bytes = 5003 * 32 * 2 * (1 if tied else 2)
    assert moved == vocab_bytes
    assert before - torch.cuda.memory_allocated() == _allocated(5003 * 32 * 2) * (1 if tied else 2)
    hf = model.get_base_model()
    assert hf.get_input_embeddings().weight.is_pinned() and hf.get_output_embeddings().weight.is_pinned()
    host_loss, _ = packed_loss(model, batch, checkpointing="offload")
    got = grads_of(host_loss, params)
    assert abs(host_loss.item() - loss.item()) <= 2e-3 * abs(loss.item())
    for name, g in got.items():
        err = (g.float() - ref[name].float()).norm() / ref[name].float().norm().clamp_min(1e-12)
        assert err < 2e-2, (name, err.item())
