"""Packed parity: a packed micro-batch through padless's path equals every example run alone through stock HF.

Per-example losses are read from the packed stream by scoring one example at a time (the forward stays packed);
gradients of the whole pack are compared with the sum of the examples' one-by-one gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from padless.train.adapters import apply_adapters
from padless.train.model_patch import patch_model
from padless.train.packed_forward import PackedLossModule, packed_loss
from tests.train.tiny_models import (
    example_only_labels,
    grads_of,
    hf_example_loss,
    make_batch,
    randomize_lora,
    tiny_model,
    trainable,
)

LENGTHS = [7, 12, 5]  # ragged; longer than the sliding windows below

CASES = {
    "llama": ("llama", {}),
    "mistral-window3": ("mistral", {"sliding_window": 3}),
    "qwen2-window4": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "gemma2-softcap-window": ("gemma2", {"sliding_window": 4, "attn_logit_softcapping": 5.0}),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp_min(1e-3)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale + 1e-7, f"{what}: max abs diff {err:.3e}, reference scale {scale:.3e}"


def check_parity(model, batch, params, checkpointing="off"):
    patch_model(model)
    total, n = packed_loss(model, batch, checkpointing=checkpointing)
    assert int(n) == batch.num_trainable
    packed_grads = grads_of(total, params)
    ref_total = 0.0
    ref_grads = {k: torch.zeros_like(v) for k, v in params.items()}
    for s in range(batch.num_examples):
        with torch.no_grad():
            packed_s, _ = packed_loss(model, example_only_labels(batch, s))
        alone = hf_example_loss(model, batch, s)
        assert_close(packed_s.detach(), alone.detach(), f"example {s} loss")
        for k, g in grads_of(alone, params).items():
            ref_grads[k] += g
        ref_total = ref_total + alone.detach()
    assert_close(total.detach(), ref_total, "pack loss")
    for k in params:
        assert_close(packed_grads[k], ref_grads[k], f"grad {k}")
    return total.detach(), packed_grads


@pytest.mark.parametrize("case", list(CASES))
def test_lora_packed_equals_one_by_one(case):
    family, overrides = CASES[case]
    model = apply_adapters(tiny_model(family, **overrides), mode="lora", r=4, alpha=8)
    randomize_lora(model)
    model.train()
    params = trainable(model)
    assert params and all("lora_" in k for k in params)
    check_parity(model, make_batch(LENGTHS, seed=3), params)


def test_full_finetune_packed_equals_one_by_one():
    model = apply_adapters(tiny_model("qwen3"), mode="full")
    model.train()
    params = trainable(model)
    assert len(params) == len(list(model.parameters()))
    check_parity(model, make_batch(LENGTHS, seed=4), params)


def test_packed_loss_module_wraps_packed_loss():
    model = tiny_model("llama")
    batch = make_batch(LENGTHS, seed=9)
    direct, n = packed_loss(model, batch)
    wrapped, m = PackedLossModule(model, checkpointing="on")(batch)
    assert torch.equal(direct, wrapped) and int(n) == int(m)


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3"])
def test_patched_equals_unpatched_on_unpacked_data(family):
    """One example, batch 1: padless's loss/grad equal the stock HF forward's own loss (mean) and grads."""
    model = apply_adapters(tiny_model(family), mode="lora", r=4)
    randomize_lora(model)
    params = trainable(model)
    batch = make_batch([23], seed=5)
    out = model(input_ids=batch.input_ids[None], labels=batch.labels[None], use_cache=False)
    hf_grads = grads_of(out.loss, params)
    handle = patch_model(model)
    total, n = packed_loss(model, batch)
    mean = total / n
    assert_close(mean.detach(), out.loss.detach(), "loss")
    for k, g in grads_of(mean, params).items():
        assert_close(g, hf_grads[k], f"grad {k}")
    handle.unpatch()


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_checkpointing_matches_off(mode):
    model = apply_adapters(tiny_model("qwen3"), mode="lora", r=4, dropout=0.1)
    randomize_lora(model)
    model.train()  # LoRA dropout on: the recompute must replay the same RNG
    params = trainable(model)
    batch = make_batch(LENGTHS, seed=6)
    torch.manual_seed(11)
    off, _ = packed_loss(model, batch, checkpointing="off")
    off_grads = grads_of(off, params)
    torch.manual_seed(11)
    ckpt, _ = packed_loss(model, batch, checkpointing=mode)
    ckpt_grads = grads_of(ckpt, params)
    assert torch.equal(off.detach(), ckpt.detach())
    for k in params:
        assert_close(ckpt_grads[k], off_grads[k], f"grad {k}", rtol=1e-6)


@pytest.mark.parametrize(
    ("mode", "layers_per_checkpoint", "tile", "gpu_checkpoints"),
    [("on", 2, 0, 0), ("on", 3, 7, 0), ("offload", 2, 0, 0), ("offload", 2, 7, 1), ("offload", 5, 0, 0)],
)
def test_checkpoint_segments_match_off(mode, layers_per_checkpoint, tile, gpu_checkpoints):
    """Five layers in segments of 2 (2 + 2 + 1), 3 (3 + 2) or 5, nested per-layer checkpoints inside: the same loss
    and gradients as no checkpointing, with LoRA dropout replayed, a tiled MLP and a GPU share of the checkpoints."""
    model = apply_adapters(tiny_model("qwen3", num_hidden_layers=5), mode="lora", r=4, dropout=0.1)
    randomize_lora(model)
    model.train()
    params = trainable(model)
    batch = make_batch(LENGTHS, seed=16)
    torch.manual_seed(12)
    off, _ = packed_loss(model, batch, checkpointing="off", mlp_tile_tokens=tile)
    off_grads = grads_of(off, params)
    checkpoint_bytes = batch.input_ids.shape[0] * model.config.hidden_size * 4  # one fp32 segment input
    torch.manual_seed(12)
    segmented, _ = packed_loss(model, batch, checkpointing=mode, mlp_tile_tokens=tile,
                               checkpoint_layers=layers_per_checkpoint,
                               checkpoint_gpu_bytes=gpu_checkpoints * checkpoint_bytes)  # fmt: skip
    segmented_grads = grads_of(segmented, params)
    assert torch.equal(off.detach(), segmented.detach())
    for k in params:
        assert_close(segmented_grads[k], off_grads[k], f"grad {k}", rtol=1e-6)


def test_a_segment_forwards_its_lower_layers_once_more():
    """Segments of 2 over 5 layers: layers 0 and 2 run in the forward, the segment's recompute and their own
    recompute (3 times); 1, 3 and the lone layer 4 in the forward and their own recompute (2 times)."""
    model = apply_adapters(tiny_model("llama", num_hidden_layers=5), mode="full")
    calls = [0] * 5

    def count(index):
        def hook(module, args):
            calls[index] += 1

        return hook

    # pre-hooks: a recompute that has rebuilt what it needs stops inside the layer, before any forward hook
    hooks = [layer.register_forward_pre_hook(count(i)) for i, layer in enumerate(model.model.layers)]
    _backward(model, make_batch(LENGTHS, seed=17), checkpointing="on", checkpoint_layers=2)
    for hook in hooks:
        hook.remove()
    assert calls == [3, 2, 3, 2, 2]


@pytest.mark.parametrize(
    ("layers_per_checkpoint", "gpu_checkpoints", "packed_layers"),
    [(1, 0, [0, 1, 2, 3, 4]), (2, 0, [0, 2, 4]), (2, 1, [0, 2]), (3, 1, [0]), (5, 0, [0])],
)
def test_offload_packs_the_input_of_each_offloaded_segment(
    monkeypatch, layers_per_checkpoint, gpu_checkpoints, packed_layers
):
    """What the forward leaves for the backward under offload: the input of each segment's first layer, on the host,
    the top segments' kept on the GPU; the backward packs nothing more and brings each one back once."""
    from padless.train.activation_checkpoint import HostOffload

    packed, unpacked, real_pack, real_unpack = [], [], HostOffload._pack, HostOffload._unpack
    monkeypatch.setattr(HostOffload, "_pack", lambda self, t: packed.append(t.data_ptr()) or real_pack(self, t))
    monkeypatch.setattr(HostOffload, "_unpack", lambda self, i: unpacked.append(i) or real_unpack(self, i))
    model = apply_adapters(tiny_model("qwen3", num_hidden_layers=5), mode="full")
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].data_ptr()))
             for layer in model.model.layers]  # fmt: skip
    batch = make_batch(LENGTHS, seed=18)
    checkpoint_bytes = batch.input_ids.shape[0] * model.config.hidden_size * 4
    loss, _ = packed_loss(model, batch, checkpointing="offload", checkpoint_layers=layers_per_checkpoint,
                          checkpoint_gpu_bytes=gpu_checkpoints * checkpoint_bytes)  # fmt: skip
    forward_inputs = inputs[:5]
    assert packed == [forward_inputs[i] for i in packed_layers]
    loss.backward()
    for hook in hooks:
        hook.remove()
    assert len(packed) == len(packed_layers) and sorted(unpacked) == list(range(len(packed_layers)))


def test_bad_checkpoint_layers_are_refused():
    model, batch = tiny_model("llama"), make_batch([4])
    for kwargs in ({"checkpoint_layers": 0}, {"checkpoint_layers": 2},
                   {"checkpoint_layers": 2, "checkpointing": "on", "keep_attention": True}):  # fmt: skip
        with pytest.raises(ValueError, match=r"checkpoint_layers=\d+: expected 1, or more with checkpointing"):
            packed_loss(model, batch, **kwargs)


TILED_SETUPS = {
    "qwen3-lora": ("qwen3", {"mode": "lora", "r": 4}),
    "llama-lora-mlp-only": ("llama", {"mode": "lora", "r": 4, "target_modules": ["gate_proj", "up_proj", "down_proj"]}),
    "gemma2-full": ("gemma2", {"mode": "full"}),  # the sandwich norm runs inside the tiles
}


def _backward(model, batch, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every trainable ``.grad`` after ``loss.backward()`` (the tiled MLP's weights get theirs there)."""
    model.zero_grad(set_to_none=True)
    total, _ = packed_loss(model, batch, **kwargs)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tile", [7, 100])  # 24 tokens: three tiles of 7 and one of 3; one tile bigger than T
@pytest.mark.parametrize("mode", ["off", "on", "offload"])
@pytest.mark.parametrize("setup", list(TILED_SETUPS))
def test_tiled_mlp_matches_untiled(setup, mode, tile):
    family, adapters = TILED_SETUPS[setup]
    model = apply_adapters(tiny_model(family), **adapters)
    randomize_lora(model)
    model.train()
    batch = make_batch(LENGTHS, seed=12)
    loss, grads = _backward(model, batch)
    tiled_loss, tiled_grads = _backward(model, batch, checkpointing=mode, mlp_tile_tokens=tile)
    assert grads.keys() == tiled_grads.keys() and any(".mlp." in k for k in grads)
    assert_close(tiled_loss, loss, "loss")
    for k in grads:
        assert_close(tiled_grads[k], grads[k], f"grad {k}")


@pytest.mark.parametrize("tile", [0, 7])
def test_tiled_mlp_runs_once_forward_and_per_tile_backward_with_checkpointing(tile):
    """Checkpointing on: the recompute of a layer stops before its tiled MLP, so each gate projection sees the 24
    tokens once in the forward and once more, tile by tile, in the backward. Untiled, the recompute runs the gate
    and up projections (not the down projection: it stops at the last saved tensor, the activation's inputs)."""
    model = apply_adapters(tiny_model("llama"), mode="full")
    rows = {"gate_proj": [], "down_proj": []}

    def count(name):
        return lambda module, args, out: rows[name].append(args[0].shape[0])

    hooks = [getattr(layer.mlp, n).register_forward_hook(count(n)) for layer in model.model.layers for n in rows]
    _backward(model, make_batch(LENGTHS, seed=13), checkpointing="on", mlp_tile_tokens=tile)
    for hook in hooks:
        hook.remove()
    layers = len(model.model.layers)
    if tile == 0:
        assert rows == {"gate_proj": [24] * 2 * layers, "down_proj": [24] * layers}
    else:
        assert rows == {name: [7, 7, 7, 3] * 2 * layers for name in rows}


def test_tiled_mlp_replays_lora_dropout_with_every_checkpointing_mode():
    model = apply_adapters(tiny_model("qwen3"), mode="lora", r=4, dropout=0.1)
    randomize_lora(model)
    model.train()
    batch = make_batch(LENGTHS, seed=14)
    results = {}
    for mode in ("off", "on", "offload"):
        torch.manual_seed(5)
        results[mode] = _backward(model, batch, checkpointing=mode, mlp_tile_tokens=7)
    for mode in ("on", "offload"):
        assert torch.equal(results[mode][0], results["off"][0])
        for k, g in results["off"][1].items():
            assert_close(results[mode][1][k], g, f"{mode} grad {k}", rtol=1e-6)


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_preserve_rng_state_reaches_the_tiled_mlp(monkeypatch, checkpointing):
    """A CUDA-graph step passes preserve_rng_state=False: the tiled MLP must then leave the generator alone."""
    from padless.train import packed_forward

    real, seen = packed_forward.tiled_mlp, []

    def spy(fn, h, tile, *, preserve_rng_state=True):
        seen.append(preserve_rng_state)
        return real(fn, h, tile, preserve_rng_state=preserve_rng_state)

    monkeypatch.setattr(packed_forward, "tiled_mlp", spy)
    model = apply_adapters(tiny_model("qwen3"), mode="lora", r=4)
    for preserve in (False, True):
        seen.clear()
        _backward(model, make_batch(LENGTHS, seed=15), checkpointing=checkpointing, mlp_tile_tokens=7,
                  preserve_rng_state=preserve)  # fmt: skip
        assert seen and all(s is preserve for s in seen), (preserve, seen)


def test_negative_mlp_tile_tokens_is_refused():
    with pytest.raises(ValueError, match=r"mlp_tile_tokens must be >= 0 \(0 = untiled\), got -1"):
        packed_loss(tiny_model("llama"), make_batch([4]), mlp_tile_tokens=-1)


def test_checkpointing_mode_is_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="checkpointing='sometimes'"):
        packed_loss(model, make_batch([4]), checkpointing="sometimes")


def test_loss_count_is_trainable_tokens():
    model = tiny_model("llama")
    batch = make_batch(LENGTHS, seed=7, prompt=3)
    total, n = packed_loss(model, batch)
    assert total.dtype == torch.float32 and n.dtype == torch.int64
    assert int(n) == batch.num_trainable
    # independent check of the sum: stock HF logits on the whole stream with a block-diagonal mask
    logits = torch.cat(
        [
            model(input_ids=batch.input_ids[None, a:b]).logits[0]
            for a, b in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())
        ]
    )
    targets = torch.full_like(batch.labels, -100)
    targets[:-1] = batch.labels[1:]
    assert_close(total.detach(), F.cross_entropy(logits, targets, reduction="sum").detach(), "sum")


@pytest.mark.slow
def test_triton_path_matches_reference_path_under_interpreter(monkeypatch):
    """The whole packed path on the Triton kernels (TRITON_INTERPRET on CPU): in-place RoPE on views, q/k norms,
    checkpointed recompute and the fused CE wire up exactly as the reference ops do (fp32, tiny Qwen3)."""
    model = apply_adapters(tiny_model("qwen3", num_hidden_layers=1), mode="lora", r=4)
    randomize_lora(model)
    params = trainable(model)
    batch = make_batch([5, 9, 3], seed=10)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("PADLESS_KERNELS", backend)
        total, _ = packed_loss(model, batch, checkpointing="on")
        results[backend] = (total.detach(), grads_of(total, params))
    assert_close(results["triton"][0], results["reference"][0], "loss")
    for k in params:
        assert_close(results["triton"][1][k], results["reference"][1][k], f"grad {k}", rtol=1e-4)


@pytest.mark.gpu
def test_gpu_bf16_triton_path_matches_reference_path(monkeypatch):
    """Qwen3-shaped model, bf16, packed data: the Triton kernels' loss and LoRA grads track the reference ops."""
    device = "cuda"
    torch.manual_seed(0)
    model = tiny_model(
        "qwen3",
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_hidden_layers=3,
    ).to(device=device, dtype=torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    model = apply_adapters(model, mode="lora", r=16)
    randomize_lora(model, std=0.02)
    params = trainable(model)
    batch = make_batch([300, 517, 64, 1, 140], vocab_size=4096, seed=8, device=device)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("PADLESS_KERNELS", backend)
        total, n = packed_loss(model, batch, checkpointing="on")
        results[backend] = (total.detach().float(), grads_of(total / n, params))
    ref_loss, ref_grads = results["reference"]
    tri_loss, tri_grads = results["triton"]
    assert torch.isfinite(tri_loss)
    assert (tri_loss - ref_loss).abs() <= 2e-2 * ref_loss.abs()
    for k in params:
        a, b = tri_grads[k].float(), ref_grads[k].float()
        rel = (a - b).norm() / b.norm().clamp_min(1e-12)
        assert rel < 5e-2, f"grad {k}: relative L2 difference {rel:.3e}"


@pytest.mark.gpu
def test_gpu_checkpoint_segments_match_per_layer_checkpoints():
    """bf16 on the Triton kernels: segments of 2 over 5 layers, offloaded with one segment kept on the GPU, give the
    per-layer checkpoints' loss and LoRA gradients (same kernels; only fp32 atomics may reorder sums)."""
    device = "cuda"
    model = tiny_model(
        "qwen3", vocab_size=4096, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, num_hidden_layers=5,
    ).to(device=device, dtype=torch.bfloat16)  # fmt: skip
    model = apply_adapters(model, mode="lora", r=16)
    randomize_lora(model, std=0.02)
    params = trainable(model)
    batch = make_batch([300, 517, 64, 1, 140], vocab_size=4096, seed=9, device=device)
    per_layer, _ = packed_loss(model, batch, checkpointing="on", mlp_tile_tokens=256)
    per_layer_grads = grads_of(per_layer, params)
    one_segment = batch.input_ids.shape[0] * 512 * 2
    segmented, _ = packed_loss(model, batch, checkpointing="offload", mlp_tile_tokens=256, checkpoint_layers=2,
                               checkpoint_gpu_bytes=one_segment)  # fmt: skip
    segmented_grads = grads_of(segmented, params)
    assert torch.equal(segmented.detach(), per_layer.detach())  # the forward is the same kernels on the same inputs
    for k in params:
        a, b = segmented_grads[k].float(), per_layer_grads[k].float()
        assert (a - b).norm() <= 1e-2 * b.norm().clamp_min(1e-12), k
