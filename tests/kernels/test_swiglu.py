"""kernels.swiglu: fused SwiGLU/GeGLU forward and backward against the plain-PyTorch references."""

from __future__ import annotations

import zlib

import pytest
import torch

from padless.kernels.indexing import INT32_MAX, needs_long_indexing
from padless.kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference
from tests.kernels.compare import ATOL, DEVICE, DTYPES, assert_close_verbose, dtype_error_bound, interpreter_rtol

_rtol = interpreter_rtol


ACTIVATIONS = {
    "swiglu": (swiglu, swiglu_reference),
    "geglu_tanh": (lambda g, u: geglu(g, u, "tanh"), lambda g, u: geglu_reference(g, u, "tanh")),
    "geglu_erf": (lambda g, u: geglu(g, u, "none"), lambda g, u: geglu_reference(g, u, "none")),
}


def _inputs(shape, dtype, layout, gen):
    """gate, up leaves (scaled so the activation's curved region and both tails are exercised) and dy."""
    if layout == "fused_halves":  # the (T, I) halves of one (T, 2I) gate_up projection output: strided rows
        base = (3 * torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)).to(dtype).to(DEVICE).requires_grad_()
        gate, up = base[..., : shape[-1]], base[..., shape[-1] :]
        leaves = (base,)
    else:
        gate = (3 * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE).requires_grad_(True)
        up = torch.randn(*shape, generator=gen).to(dtype).to(DEVICE).requires_grad_(True)
        leaves = (gate, up)
    dy = torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)
    return gate, up, leaves, dy


def _check(name, shape, dtype, layout, gen):
    fn, ref = ACTIVATIONS[name]
    _, _, leaves, dy = _inputs(shape, dtype, layout, gen)

    def run(f, dt):
        cast = [leaf.detach().to(dt).requires_grad_(True) for leaf in leaves]
        if layout == "fused_halves":
            g, u = cast[0][..., : shape[-1]], cast[0][..., shape[-1] :]
        else:
            g, u = cast
        out = f(g, u)
        return out.detach(), *torch.autograd.grad(out, cast, dy.to(dt))

    expected, same_dtype, actual = run(ref, torch.float64), run(ref, dtype), run(fn, dtype)
    for i, (a, r, e) in enumerate(zip(actual, same_dtype, expected, strict=True)):
        assert a.dtype == dtype
        bound = dtype_error_bound(r, e, ATOL[dtype])
        assert_close_verbose(a, e, atol=bound, rtol=_rtol(dtype), name=f"{name} output/grad {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize(("shape", "layout"), [((13, 97), "separate"), ((7, 61), "fused_halves")])
def test_gated_activation_matches_reference(name, dtype, shape, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{dtype}-{shape}-{layout}".encode()))
    _check(name, shape, dtype, layout, gen)


def test_gated_activation_3d_input_and_block_tails():
    gen = torch.Generator().manual_seed(11)
    _check("swiglu", (2, 5, 31), torch.float32, "separate", gen)
    _check("geglu_tanh", (3, 4099), torch.bfloat16, "separate", gen)  # 4099 = one full 4096 block + a tail


def test_gated_activation_long_indexing_forced(monkeypatch):
    monkeypatch.setenv("PADLESS_FORCE_LONG_INDEXING", "1")
    assert needs_long_indexing(torch.empty(2, 2))
    gen = torch.Generator().manual_seed(12)
    for name in ACTIVATIONS:
        _check(name, (5, 37), torch.bfloat16, "fused_halves", gen)


def test_gated_activation_extreme_inputs_stay_finite():
    # tanh via exp must saturate, not produce inf/inf = nan, for large |gate|.
    gate = torch.tensor([[-1e4, -80.0, -20.0, 0.0, 20.0, 80.0, 1e4]], device=DEVICE)
    up = torch.ones_like(gate)
    for name, (fn, ref) in ACTIVATIONS.items():
        assert_close_verbose(fn(gate, up), ref(gate, up), atol=1e-4, rtol=1e-6, name=name)


OVERWRITING = {
    "swiglu": lambda g, u: swiglu(g, u, overwrite_inputs=True),
    "geglu_tanh": lambda g, u: geglu(g, u, "tanh", overwrite_inputs=True),
    "geglu_erf": lambda g, u: geglu(g, u, "none", overwrite_inputs=True),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_overwriting_backward_returns_the_same_gradients_in_the_inputs_memory(name):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    gate_leaf, up_leaf, _, dy = _inputs((9, 67), torch.bfloat16, "separate", gen)
    fn = ACTIVATIONS[name][0]
    want = torch.autograd.grad(fn(gate_leaf, up_leaf), (gate_leaf, up_leaf), dy)
    gate, up = gate_leaf * 1, up_leaf * 1  # intermediates, as a model's projections make them
    gate_ptr, up_ptr = gate.data_ptr(), up.data_ptr()
    got = torch.autograd.grad(OVERWRITING[name](gate, up), (gate, up), dy, retain_graph=True)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert (got[0].data_ptr(), got[1].data_ptr()) == (gate_ptr, up_ptr)  # no new (T, I) tensors


def test_overwriting_backward_refuses_a_second_pass_over_the_graph():
    gen = torch.Generator().manual_seed(13)
    gate_leaf, up_leaf, _, dy = _inputs((4, 33), torch.float32, "separate", gen)
    out = swiglu(gate_leaf * 1, up_leaf * 1, overwrite_inputs=True)
    torch.autograd.grad(out, (gate_leaf, up_leaf), dy, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, (gate_leaf, up_leaf), dy)


@pytest.mark.parametrize("layout", ["fused_halves", "stacked"])
def test_overwriting_backward_leaves_memory_it_does_not_own(layout):
    """gate and up as two views of one fused output (strided halves, or the contiguous rows of a (2, T, I)
    stack), or leaves a caller passed in: their memory is not the kernel's to reuse."""
    gen = torch.Generator().manual_seed(14)
    base = torch.randn(2, 5, 37, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(5, 37, generator=gen).to(DEVICE)
    fused = base * 1
    if layout == "stacked":
        gate, up = fused[0], fused[1]
    else:
        flat = fused.transpose(0, 1).reshape(5, 74)
        gate, up = flat[:, :37], flat[:, 37:]
    before = fused.detach().clone()
    got = torch.autograd.grad(swiglu(gate, up, overwrite_inputs=True), base, dy, retain_graph=True)[0]
    want = torch.autograd.grad(swiglu(gate, up), base, dy)[0]
    assert torch.equal(got, want) and torch.equal(fused.detach(), before)
    leaf_gate, leaf_up = (x.detach().clone().requires_grad_() for x in (gate, up))
    leaf_values = leaf_gate.detach().clone()
    torch.autograd.grad(swiglu(leaf_gate, leaf_up, overwrite_inputs=True), (leaf_gate, leaf_up), dy)
    assert torch.equal(leaf_gate.detach(), leaf_values)


def test_gated_activation_rejects_bad_inputs():
    g = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"gate \(3, 8\) and up \(3, 7\) differ"):
        swiglu(g, torch.randn(3, 7))
    with pytest.raises(ValueError, match="approximate='erf'"):
        geglu(g, g, approximate="erf")
    with pytest.raises(ValueError, match="expected one dtype"):
        swiglu(g, g.double())
    with pytest.raises(ValueError, match="cast the activations first"):
        swiglu(g.double(), g.double())


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_memory")  # tens of GiB: one at a time under --dist loadgroup
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_gated_activation_gpu_qwen3_shapes(name):
    gen = torch.Generator(device="cuda").manual_seed(13)
    fn, ref = ACTIVATIONS[name]
    base = torch.randn(4097, 2 * 12288, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_(True)
    gate, up = base[:, :12288], base[:, 12288:]
    dy = torch.randn(4097, 12288, device="cuda", generator=gen, dtype=torch.bfloat16)
    out = fn(gate, up)
    (dbase,) = torch.autograd.grad(out, base, dy)
    b64 = base.detach().double().requires_grad_(True)
    out64 = ref(b64[:, :12288], b64[:, 12288:])
    (d64,) = torch.autograd.grad(out64, b64, dy.double())
    bsame = base.detach().clone().requires_grad_(True)
    outsame = ref(bsame[:, :12288], bsame[:, 12288:])
    (dsame,) = torch.autograd.grad(outsame, bsame, dy)
    assert_close_verbose(out, out64, atol=dtype_error_bound(outsame, out64, 1e-2), name="out")
    assert_close_verbose(dbase, d64, atol=dtype_error_bound(dsame, d64, 1e-2), name="dgate_up")


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_memory")  # tens of GiB: one at a time under --dist loadgroup
def test_swiglu_gpu_past_int32_elements():
    # 180K tokens x 12288 = 2.2e9 elements > 2**31 - 1: the int64-offset kernel must reach the last rows.
    t, i = 180_000, 12288
    assert t * i > INT32_MAX
    gate = torch.randn(t, i, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    up = torch.randn(t, i, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    assert needs_long_indexing(gate)
    out = swiglu(gate, up)
    dy = torch.randn_like(out)
    dgate, dup = torch.autograd.grad(out, (gate, up), dy)
    for rows in (slice(0, 64), slice(t // 2, t // 2 + 64), slice(t - 64, t)):  # first, middle, past 2**31
        g64, u64 = gate[rows].detach().double(), up[rows].detach().double()
        g64.requires_grad_(True)
        u64.requires_grad_(True)
        ref = swiglu_reference(g64, u64)
        rg, ru = torch.autograd.grad(ref, (g64, u64), dy[rows].double())
        assert_close_verbose(out[rows], ref, atol=3e-2, rtol=1e-2, name=f"out rows {rows}")
        assert_close_verbose(dgate[rows], rg, atol=3e-2, rtol=1e-2, name=f"dgate rows {rows}")
        assert_close_verbose(dup[rows], ru, atol=3e-2, rtol=1e-2, name=f"dup rows {rows}")
