"""kernels.rope: in-place Triton RoPE against the plain-PyTorch reference and transformers' apply_rotary_pos_emb."""

from __future__ import annotations

import zlib

import pytest
import torch

from padless.kernels.indexing import needs_long_indexing
from padless.kernels.rope import rope_, rope_reference
from tests.kernels.compare import ATOL, DEVICE, DTYPES, assert_close_verbose, dtype_error_bound, interpreter_rtol

_rtol = interpreter_rtol


def _cache(max_pos: int, d: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, D/2) fp32 cos/sin caches, computed like HF's default rotary embedding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def _ragged_positions(t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting at 0 for every example of a random packing of t tokens; returns (positions, cu)."""
    n_cuts = int(torch.randint(0, max(1, t // 3), (1,), generator=gen))
    cuts = torch.randperm(t - 1, generator=gen)[:n_cuts] + 1 if t > 1 else torch.empty(0, dtype=torch.long)
    cu = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([t])])
    lengths = (cu[1:] - cu[:-1]).tolist()
    pos = torch.cat([torch.arange(n) for n in lengths])
    return pos, cu


def _check(dtype, t, h, hkv, d, gen, pos_dtype=torch.int64):
    cos, sin = (c.to(DEVICE) for c in _cache(4 * t + 7, d))
    pos, _ = _ragged_positions(t, gen)
    pos = pos + torch.randint(0, 3 * t, (1,), generator=gen)  # offsets so the cache rows vary beyond t
    pos = pos.to(pos_dtype).to(DEVICE)
    q0 = torch.randn(t, h, d, generator=gen).to(dtype).to(DEVICE)
    k0 = torch.randn(t, hkv, d, generator=gen).to(dtype).to(DEVICE)
    gq = torch.randn(t, h, d, generator=gen).to(dtype).to(DEVICE)
    gk = torch.randn(t, hkv, d, generator=gen).to(dtype).to(DEVICE)

    def run(fn, dt):
        qa = q0.to(dt).requires_grad_(True)
        ka = k0.to(dt).requires_grad_(True)
        cs, sn = (cos, sin) if dt != torch.float64 else (cos.double(), sin.double())
        # In-place ops need non-leaf inputs; ``* 1`` makes fresh non-view tensors.
        q_out, k_out = fn(qa * 1, ka * 1, cs, sn, pos)
        # Clones: rope_'s backward rotates the gradient buffers it is handed in place.
        grads = torch.autograd.grad((q_out, k_out), (qa, ka), (gq.to(dt).clone(), gk.to(dt).clone()))
        return q_out.detach(), k_out.detach(), *grads

    expected = run(rope_reference, torch.float64)
    same_dtype = run(rope_reference, dtype)
    actual = run(rope_, dtype)
    for name, a, r, e in zip(("q", "k", "dq", "dk"), actual, same_dtype, expected, strict=True):
        assert a.dtype == dtype, f"{name} dtype {a.dtype}"
        bound = dtype_error_bound(r, e, ATOL[dtype])
        assert_close_verbose(a, e, atol=bound, rtol=_rtol(dtype), name=f"{name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("h", "hkv", "d"), [(5, 3, 64), (4, 1, 80), (3, 3, 96), (7, 2, 128), (2, 1, 256)])
def test_rope_matches_reference_forward_and_grad(dtype, h, hkv, d):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}-{h}-{hkv}-{d}".encode()))
    _check(dtype, 13, h, hkv, d, gen)


def test_rope_int32_positions_and_single_token():
    gen = torch.Generator().manual_seed(1)
    _check(torch.float32, 1, 3, 1, 64, gen, pos_dtype=torch.int32)
    _check(torch.bfloat16, 29, 6, 2, 64, gen, pos_dtype=torch.int32)


def test_rope_long_indexing_forced(monkeypatch):
    monkeypatch.setenv("PADLESS_FORCE_LONG_INDEXING", "1")
    q = torch.randn(3, 2, 64)
    assert needs_long_indexing(q)
    gen = torch.Generator().manual_seed(2)
    _check(torch.float32, 17, 5, 3, 80, gen)
    _check(torch.bfloat16, 11, 4, 2, 128, gen)


def test_rope_matches_transformers_apply_rotary_pos_emb():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    t, h, hkv, d = 23, 4, 2, 64
    config = LlamaConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=hkv, head_dim=d)
    rotary = LlamaRotaryEmbedding(config).to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    pos, _ = _ragged_positions(t, gen)
    pos = pos.to(DEVICE)
    # Our (P, D/2) cache built from HF's own inv_freq (HF's cos is cat(freqs, freqs)).
    freqs = torch.arange(64, dtype=torch.float32, device=DEVICE)[:, None] * rotary.inv_freq[None, :].float()
    cos, sin = freqs.cos(), freqs.sin()
    for dtype in DTYPES:
        q = torch.randn(t, h, d, generator=gen).to(dtype).to(DEVICE)
        k = torch.randn(t, hkv, d, generator=gen).to(dtype).to(DEVICE)
        hf_cos, hf_sin = rotary(q, pos[None, :])  # (1, T, D) in q's dtype
        q_hf, k_hf = apply_rotary_pos_emb(q, k, hf_cos[0], hf_sin[0], unsqueeze_dim=1)  # q (T, H, D)
        # The reference is HF's arithmetic exactly (same casts); the kernel rounds once from fp32.
        q_ref, k_ref = rope_reference(q, k, cos, sin, pos)
        assert_close_verbose(q_ref, q_hf, atol=0.0, name=f"reference q vs HF {dtype}")
        assert_close_verbose(k_ref, k_hf, atol=0.0, name=f"reference k vs HF {dtype}")
        q_hf64, k_hf64 = apply_rotary_pos_emb(
            q.double(), k.double(), *(c[0].double() for c in rotary(q.float(), pos[None, :])), unsqueeze_dim=1
        )
        q_out, k_out = rope_(q.clone(), k.clone(), cos, sin, pos)
        bound_q, bound_k = (dtype_error_bound(a, b, ATOL[dtype]) for a, b in ((q_hf, q_hf64), (k_hf, k_hf64)))
        assert_close_verbose(q_out, q_hf64, atol=bound_q, rtol=_rtol(dtype), name=f"q vs HF {dtype}")
        assert_close_verbose(k_out, k_hf64, atol=bound_k, rtol=_rtol(dtype), name=f"k vs HF {dtype}")


def test_rope_in_place_without_grad_returns_the_same_tensors():
    gen = torch.Generator().manual_seed(4)
    cos, sin = (c.to(DEVICE) for c in _cache(32, 64))
    q, k = torch.randn(9, 3, 64, generator=gen).to(DEVICE), torch.randn(9, 1, 64, generator=gen).to(DEVICE)
    pos = _ragged_positions(9, gen)[0].to(DEVICE)
    expected_q, expected_k = rope_reference(q, k, cos, sin, pos)
    q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
    q_out, k_out = rope_(q, k, cos, sin, pos)
    assert q_out is q and k_out is k and q.data_ptr() == q_ptr and k.data_ptr() == k_ptr
    assert_close_verbose(q, expected_q, atol=1e-5, name="q")
    assert_close_verbose(k, expected_k, atol=1e-5, name="k")


def _fused_qkv_loss(fn, x, w, cos, sin, pos, h, hkv, d, gq, gk):
    """q and k as views of one fused projection output (the trainer's layout), then a loss that also reads y."""
    t = x.shape[0]
    y = x @ w.T  # (T, (H + 2 Hkv) D)
    q = y[:, : h * d].view(t, h, d)
    k = y[:, h * d : (h + hkv) * d].view(t, hkv, d)
    q, k = fn(q, k, cos, sin, pos)
    # y is read after the in-place rotation: autograd must see the rotated values (CopySlices on the base).
    return (q * gq).sum() + (k * gk).sum() + (y[:, (h + hkv) * d :] ** 2).sum() + 0.5 * (y**2).sum()


@pytest.mark.parametrize("layout", ["fused_qkv_views", "reshaped_views", "q_normed_k_view"])
def test_rope_autograd_on_views_of_a_linear_output(layout):
    gen = torch.Generator().manual_seed(5)
    t, h, hkv, d, e = 11, 3, 2, 64, 16
    cos, sin = (c.to(DEVICE) for c in _cache(40, d))
    pos = _ragged_positions(t, gen)[0].to(DEVICE)
    x = torch.randn(t, e, generator=gen).to(DEVICE).requires_grad_(True)
    gq, gk = torch.randn(t, h, d, generator=gen).to(DEVICE), torch.randn(t, hkv, d, generator=gen).to(DEVICE)
    if layout == "fused_qkv_views":
        w = torch.randn((h + 2 * hkv) * d, e, generator=gen).to(DEVICE).requires_grad_(True)

        def loss_of(fn):
            return _fused_qkv_loss(fn, x, w, cos, sin, pos, h, hkv, d, gq, gk)
    else:
        w = torch.randn(h * d, e, generator=gen).to(DEVICE).requires_grad_(True)
        wk = torch.randn(hkv * d, e, generator=gen).to(DEVICE)

        def loss_of(fn):
            q = (x @ w.T).view(t, h, d)  # the HF layout: q_proj(x).view(T, H, D)
            if layout == "q_normed_k_view":  # Qwen3-like q (a fresh non-view tensor), Llama-like k (a view)
                q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
            k = (x @ wk.T).view(t, hkv, d)
            q, k = fn(q, k, cos, sin, pos)
            return (q * gq).sum() + (k * gk).sum()

    expected = torch.autograd.grad(loss_of(rope_reference), (x, w))
    actual = torch.autograd.grad(loss_of(rope_), (x, w))
    for a, e_, name in zip(actual, expected, ("dx", "dw"), strict=True):
        assert_close_verbose(a, e_, atol=2e-4, rtol=1e-4, name=name)


def test_rope_backward_with_a_broadcast_gradient():
    # q.sum() hands backward a stride-0 (expanded) gradient, which must not be rotated in place.
    gen = torch.Generator().manual_seed(6)
    cos, sin = (c.to(DEVICE) for c in _cache(16, 64))
    pos = _ragged_positions(7, gen)[0].to(DEVICE)
    q0 = torch.randn(7, 2, 64, generator=gen).to(DEVICE).requires_grad_(True)
    k0 = torch.randn(7, 1, 64, generator=gen).to(DEVICE).requires_grad_(True)
    q, k = rope_(q0 * 1, k0 * 1, cos, sin, pos)
    dq, dk = torch.autograd.grad(q.sum() + k.sum(), (q0, k0))
    qr, kr = rope_reference(q0, k0, cos, sin, pos)
    dq_ref, dk_ref = torch.autograd.grad(qr.sum() + kr.sum(), (q0, k0))
    assert_close_verbose(dq, dq_ref, atol=1e-5, name="dq")
    assert_close_verbose(dk, dk_ref, atol=1e-5, name="dk")


def test_rope_rejects_bad_inputs():
    cos, sin = _cache(16, 64)
    pos = torch.arange(4)
    q, k = torch.randn(4, 2, 64), torch.randn(4, 1, 64)
    with pytest.raises(ValueError, match="last-dim stride 2"):
        rope_(torch.randn(4, 2, 128)[..., ::2], k, cos, sin, pos)
    with pytest.raises(ValueError, match="head dim D=63 is odd"):
        rope_(torch.randn(4, 2, 63), torch.randn(4, 1, 63), cos, sin, pos)
    with pytest.raises(ValueError, match=r"expected \(max_pos, D/2\) = \(P, 32\)"):
        rope_(q, k, torch.cat((cos, cos), -1), sin, pos)
    with pytest.raises(ValueError, match=r"position_ids has shape \(1, 4\)"):
        rope_(q, k, cos, sin, pos[None])
    with pytest.raises(ValueError, match="rope_ supports"):
        rope_(q.double(), k.double(), cos, sin, pos)
    with pytest.raises(ValueError, match="expected \\(4, Hkv, 64\\)"):
        rope_(q, torch.randn(5, 1, 64), cos, sin, torch.arange(4))
    with pytest.raises(ValueError, match="overlapping"):
        rope_(torch.randn(4, 1, 64).expand(4, 2, 64), k, cos, sin, pos)


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_gpu_qwen3_shapes(dtype):
    gen = torch.Generator().manual_seed(7)
    t, h, hkv, d = 4099, 32, 8, 128
    cos, sin = (c.cuda() for c in _cache(8192, d, theta=1e6))
    pos, _ = _ragged_positions(t, gen)
    pos = pos.cuda()
    q = torch.randn(t, h, d, generator=gen).to(dtype).cuda()
    k = torch.randn(t, hkv, d, generator=gen).to(dtype).cuda()
    q64, k64 = rope_reference(q.double(), k.double(), cos.double(), sin.double(), pos)
    qr, kr = rope_reference(q, k, cos, sin, pos)
    rope_(q, k, cos, sin, pos)
    assert_close_verbose(q, q64, atol=dtype_error_bound(qr, q64, ATOL[dtype]), name="q")
    assert_close_verbose(k, k64, atol=dtype_error_bound(kr, k64, ATOL[dtype]), name="k")


@pytest.mark.gpu
def test_rope_gpu_in_place_allocates_nothing():
    t, h, hkv, d = 16384, 32, 8, 128
    cos, sin = (c.cuda() for c in _cache(t, d))
    pos = torch.arange(t, device="cuda")
    q = torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16)
    cos32, sin32 = cos.float().contiguous(), sin.float().contiguous()
    rope_(q, k, cos32, sin32, pos)  # warm-up: compilation may allocate
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    rope_(q, k, cos32, sin32, pos)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == before, "rope_ forward allocated device memory"
    # Backward: the incoming gradients are rotated in place; the only new buffers are the leaves' gradients
    # that MulBackward (the ``* 1``) produces.
    q0 = torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k0 = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q_out, k_out = rope_(q0 * 1, k0 * 1, cos32, sin32, pos)
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    dq, dk = torch.autograd.grad((q_out, k_out), (q0, k0), (gq, gk))
    torch.cuda.synchronize()
    leaf_grads = dq.numel() * dq.element_size() + dk.numel() * dk.element_size()
    assert torch.cuda.max_memory_allocated() - before <= leaf_grads + 2**20, "rope_ backward allocated extra memory"


def test_rope_tokens_per_program_follow_t():
    """Tokens per program shrink until the grid has >= 8 programs per SM; the interpreter (no SM count) keeps
    the ~16K-element default."""
    from padless.kernels.rope import _default_block_t

    # Qwen3-8B (32 + 8 heads x 128) on 132 SMs: 4 tokens (1024 programs at 4K is < 8 x 132, so 2 there).
    assert [_default_block_t(t, 40, 128, 132) for t in (4096, 16384, 65536)] == [2, 4, 4]
    assert _default_block_t(100, 40, 128, 132) == 1
    assert _default_block_t(4096, 40, 128, None) == 4
    assert _default_block_t(13, 8, 64, None) == 16


@pytest.mark.parametrize("block_t", [1, 2, 4])
def test_rope_explicit_block_t_forward_and_backward(block_t):
    """Every BLOCK_T the default can pick rotates like the reference, forward and backward (transpose)."""
    from padless.kernels.rope import _launch_rope

    gen = torch.Generator().manual_seed(100 + block_t)
    t, h, hkv, d = 11, 3, 2, 64
    cos, sin = (c.to(DEVICE) for c in _cache(64, d))
    pos = torch.randint(0, 64, (t,), generator=gen).to(DEVICE)
    q = torch.randn(t, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(t, hkv, d, generator=gen, dtype=torch.float64)
    want_q, want_k = rope_reference(q, k, cos.double().cpu(), sin.double().cpu(), pos.cpu())
    q32, k32 = q.float().to(DEVICE), k.float().to(DEVICE)
    _launch_rope(q32, k32, cos, sin, pos, backward=False, block_t=block_t)
    assert_close_verbose(q32, want_q, atol=1e-5, name=f"q block_t={block_t}")
    assert_close_verbose(k32, want_k, atol=1e-5, name=f"k block_t={block_t}")
    _launch_rope(q32, k32, cos, sin, pos, backward=True, block_t=block_t)  # the inverse rotation
    assert_close_verbose(q32, q, atol=1e-5, name=f"q round trip block_t={block_t}")
    assert_close_verbose(k32, k, atol=1e-5, name=f"k round trip block_t={block_t}")
