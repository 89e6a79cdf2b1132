"""padless.kernels.rmsnorm: fused RMSNorm (Llama/Qwen3 and Gemma casts) against the reference and HF's norm modules."""

from __future__ import annotations

import zlib

import pytest
import torch

from padless.kernels.rmsnorm import rms_norm, rms_norm_reference
from tests.kernels.compare import ATOL, DEVICE, DTYPES, assert_close_verbose, dtype_error_bound, interpreter_rtol

_rtol = interpreter_rtol


def _check(shape, dtype, offset, gen, weight_dtype=None, weight_grad=True, eps=1e-6):
    weight_dtype = weight_dtype or dtype
    x0 = (torch.randn(*shape, generator=gen) * 2 + 0.5).to(dtype).to(DEVICE)
    w0 = (torch.randn(shape[-1], generator=gen) * 0.5 + (0.0 if offset else 1.0)).to(weight_dtype).to(DEVICE)
    out_dtype = dtype if offset else torch.promote_types(dtype, weight_dtype)
    dy = torch.randn(*shape, generator=gen).to(out_dtype).to(DEVICE)

    def run(fn, x_dt, w_dt):
        x = x0.to(x_dt).requires_grad_(True)
        w = w0.to(w_dt).requires_grad_(weight_grad)
        y = fn(x, w, eps, offset)
        inputs = (x, w) if weight_grad else (x,)
        return y.detach(), *torch.autograd.grad(y, inputs, dy.to(y.dtype))

    expected = run(rms_norm_reference, torch.float64, torch.float64)
    same_dtype = run(rms_norm_reference, dtype, weight_dtype)
    actual = run(rms_norm, dtype, weight_dtype)
    for name, a, r, e in zip(("y", "dx", "dw"), actual, same_dtype, expected, strict=False):
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype}, reference {r.dtype}"
        bound = dtype_error_bound(r, e, ATOL[dtype])
        label = f"{name} {dtype} offset={offset}"
        assert_close_verbose(a, e, atol=bound, rtol=_rtol(a.dtype), name=label)
    return actual


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(13, 97), (11, 5, 64), (3, 1031), (29, 131), (19, 1031), (200, 3, 32)])
def test_rms_norm_matches_reference(shape, offset, dtype):
    """Prime / ragged row counts, both casts, narrow per-head rows and wide ragged rows (1031 columns: the wide-row
    backward configuration); (19, 1031) and (200, 3, 32) give programs of the persistent backward several row
    blocks each, so the prefetch and the (BLOCK_R, E) weight-gradient tile cross iterations."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}-{offset}-{dtype}".encode()))
    _check(shape, dtype, offset, gen)


@pytest.mark.parametrize(
    ("shape", "dtype", "offset"), [((37, 3, 32), torch.bfloat16, 0.0), ((19, 1031), torch.float32, 1.0)]
)
def test_rms_norm_frozen_weight_several_blocks_per_program(shape, dtype, offset):
    """The dx-only backward (LoRA's frozen norm weights) against float64."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"frozen-{shape}".encode()))
    _check(shape, dtype, offset, gen, weight_grad=False)


def test_rms_norm_fp32_weight_with_bf16_activations_promotes_like_hf():
    gen = torch.Generator().manual_seed(21)
    y, *_ = _check((9, 48), torch.bfloat16, 0.0, gen, weight_dtype=torch.float32)
    assert y.dtype == torch.float32  # Llama: weight * normed.to(bf16) promotes to the fp32 weight's dtype
    y, *_ = _check((9, 48), torch.bfloat16, 1.0, gen, weight_dtype=torch.float32)
    assert y.dtype == torch.bfloat16  # Gemma: .type_as(x)


def test_rms_norm_frozen_weight_lora():
    gen = torch.Generator().manual_seed(22)
    _check((17, 40), torch.bfloat16, 0.0, gen, weight_grad=False)
    x = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE)
    y = rms_norm(x, w, 1e-6)
    y.sum().backward()
    assert w.grad is None and x.grad is not None


def test_rms_norm_weight_grad_is_deterministic():
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(67, 96, generator=gen).to(DEVICE).requires_grad_(True)
    w = torch.randn(96, generator=gen).to(DEVICE).requires_grad_(True)
    dy = torch.randn(67, 96, generator=gen).to(DEVICE)
    grads = [torch.autograd.grad(rms_norm(x, w, 1e-5), (x, w), dy) for _ in range(2)]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_rms_norm_long_indexing_forced(monkeypatch):
    monkeypatch.setenv("PADLESS_FORCE_LONG_INDEXING", "1")
    gen = torch.Generator().manual_seed(24)
    _check((13, 97), torch.bfloat16, 0.0, gen)
    _check((7, 3, 32), torch.float32, 1.0, gen)


def test_rms_norm_strided_rows():
    # x as a slice of a wider buffer (rows strided), e.g. the q part of a fused projection reshaped per head.
    gen = torch.Generator().manual_seed(25)
    base = torch.randn(11, 160, generator=gen).to(DEVICE).requires_grad_(True)
    w = torch.randn(96, generator=gen).to(DEVICE).requires_grad_(True)
    dy = torch.randn(11, 96, generator=gen).to(DEVICE)
    out = rms_norm(base[:, 32:128], w, 1e-6)
    expected = rms_norm_reference(base[:, 32:128], w, 1e-6)
    assert_close_verbose(out, expected, atol=1e-5, name="y")
    got = torch.autograd.grad(out, (base, w), dy)
    want = torch.autograd.grad(expected, (base, w), dy)
    for a, e, name in zip(got, want, ("dbase", "dw"), strict=True):
        assert_close_verbose(a, e, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("model", ["llama", "gemma", "qwen3_qk_norm"])
def test_rms_norm_matches_transformers_modules(model):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    gen = torch.Generator().manual_seed(zlib.crc32(model.encode()))
    shape, offset, module = {
        "llama": ((10, 72), 0.0, LlamaRMSNorm(72, eps=1e-5)),
        "gemma": ((10, 72), 1.0, GemmaRMSNorm(72, eps=1e-6)),
        "qwen3_qk_norm": ((10, 4, 64), 0.0, Qwen3RMSNorm(64, eps=1e-6)),
    }[model]
    eps = module.eps if hasattr(module, "eps") else module.variance_epsilon
    with torch.no_grad():
        module.weight.copy_(torch.randn(shape[-1], generator=gen) * 0.3 + (0.0 if offset else 1.0))
    module = module.to(DEVICE)
    for dtype in DTYPES:
        mod = module.to(dtype)
        x = (torch.randn(*shape, generator=gen) * 3).to(dtype).to(DEVICE)
        with torch.no_grad():
            hf = mod(x)
            ref = rms_norm_reference(x, mod.weight, eps, offset)
            hf64 = module.to(torch.float64)(x.double())
            mod = module.to(dtype)
            out = rms_norm(x, mod.weight, eps, offset)
        assert_close_verbose(ref, hf, atol=0.0, name=f"{model} reference vs HF {dtype}")
        bound = dtype_error_bound(hf, hf64, ATOL[dtype])
        assert_close_verbose(out, hf64, atol=bound, rtol=_rtol(dtype), name=f"{model} kernel vs HF {dtype}")


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\): expected \(8,\)"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="expected each one of"):
        rms_norm(x.double(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="E=70000 is too large"):
        rms_norm(torch.randn(1, 70000), torch.ones(70000), 1e-6)


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "offset"), [((4099, 4096), 0.0), ((1025, 8192), 1.0), ((2049, 32, 128), 0.0)])
def test_rms_norm_gpu_model_shapes(shape, offset, dtype):
    gen = torch.Generator(device="cuda").manual_seed(26)
    x = torch.randn(*shape, device="cuda", generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(shape[-1], device="cuda", generator=gen) * 0.3 + 1.0).to(dtype).requires_grad_(True)
    dy = torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    def run(fn, dt):
        xa, wa = x.detach().to(dt).requires_grad_(True), w.detach().to(dt).requires_grad_(True)
        y = fn(xa, wa, 1e-6, offset)
        return y.detach(), *torch.autograd.grad(y, (xa, wa), dy.to(dt))

    expected, same_dtype = run(rms_norm_reference, torch.float64), run(rms_norm_reference, dtype)
    actual = run(rms_norm, dtype)
    for name, a, r, e in zip(("y", "dx", "dw"), actual, same_dtype, expected, strict=True):
        assert_close_verbose(a, e, atol=dtype_error_bound(r, e, ATOL[dtype]), name=name)


@pytest.mark.parametrize(
    ("rows", "cols", "dtype", "sms"),
    [(4096, 4096, torch.bfloat16, 132), (65536 * 32, 128, torch.bfloat16, 132), (7, 4096, torch.float32, 132),
     (100, 64, torch.float16, 78), (3, 8192, torch.bfloat16, 132), (50, 1031, torch.float32, 2)],
)  # fmt: skip
def test_rms_norm_backward_config_is_one_wave_that_fits(rows, cols, dtype, sms):
    """The persistent grid never exceeds what the register cap lets fit on the SMs (one wave), never has idle
    programs, and the tiles cover E; the dw reduction tile stays within 8192 fp32 values."""
    from padless.kernels.rmsnorm import REGS_PER_SM, bwd_config

    cfg = bwd_config(rows, cols, sms)
    assert cfg == bwd_config(rows, cols, sms)  # pure
    threads = cfg.num_warps * 32
    assert cfg.block_e >= cols and cfg.block_e & (cfg.block_e - 1) == 0
    assert cfg.maxnreg % 8 == 0 and cfg.maxnreg <= 255
    fits_per_sm = min(REGS_PER_SM // (cfg.maxnreg * threads), 2048 // threads)
    assert 1 <= cfg.programs <= fits_per_sm * sms
    assert cfg.programs <= -(-rows // cfg.block_r)
    assert cfg.reduce_block_p * 16 <= 8192


def test_rms_norm_config_for_qwen3_shapes():
    from padless.kernels.rmsnorm import bwd_config

    hidden = bwd_config(4096, 4096, 132)
    head = bwd_config(4096 * 32, 128, 132)
    fields = ("block_r", "num_warps", "programs", "maxnreg")
    # E 4096: one row x 8 warps, 2 per SM; per-head: 16 x 128, 4 per SM (both fit 128 registers without spills).
    assert [getattr(hidden, f) for f in fields] == [1, 8, 264, 128]
    assert [getattr(head, f) for f in fields] == [16, 4, 528, 128]


@pytest.mark.parametrize(("programs", "cols", "block_p", "block_c"), [(300, 97, 64, 16), (5, 40, 8, 32), (1, 7, 1, 16)])
def test_dw_reduce_kernel_sums_partial_rows(programs, cols, block_p, block_c):
    from padless.kernels.rmsnorm import _dw_reduce_kernel

    gen = torch.Generator().manual_seed(programs * 1000 + cols)
    partial = torch.randn(programs, cols, generator=gen).to(DEVICE)
    out = torch.empty(cols, dtype=torch.bfloat16, device=DEVICE)
    _dw_reduce_kernel[(-(-cols // block_c),)](partial, out, programs, cols, BLOCK_P=block_p, BLOCK_C=block_c)
    want = partial.double().sum(0)
    assert_close_verbose(out, want, atol=1e-4 * programs, rtol=2.0**-8 + _rtol(torch.bfloat16), name="dw sum")


def test_rms_norm_frozen_weight_launches_no_dw_reduction(monkeypatch):
    import padless.kernels.rmsnorm as module

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the dw reduction was launched for a frozen weight")

    monkeypatch.setattr(module, "_dw_reduce_kernel", NoLaunch())
    x = torch.randn(37, 96, device=DEVICE, requires_grad=True)
    w = torch.randn(96, device=DEVICE)  # frozen (LoRA)
    grad = torch.randn(37, 96, device=DEVICE)
    (dx,) = torch.autograd.grad(rms_norm(x, w, 1e-6), (x,), grad)
    assert dx.shape == x.shape and torch.isfinite(dx).all()
    dx_none, dw_none = module._launch_bwd(dx, x.detach(), w, torch.ones(37, device=DEVICE), 0.0, False, False)
    assert dx_none is None and dw_none is None


@pytest.mark.gpu
def test_pdl_chain_in_cuda_graph_matches_plain_launches(monkeypatch):
    """A chain of norms (each reads the one before's output, forward and backward) launched with programmatic
    dependent launch and captured in a CUDA graph gives exactly the plain launches' values: each kernel waits for
    the previous one before reading, so an early launch never reads a half-written input."""
    import padless.kernels.rmsnorm as module

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    gen = torch.Generator(device="cuda").manual_seed(47)
    x = torch.randn(4096, 4096, device="cuda", generator=gen).to(torch.bfloat16)
    assert module._pdl_kwargs(x) == {"PDL": True, "launch_pdl": True}
    ws = [(torch.randn(4096, device="cuda", generator=gen) * 0.3 + 1.0).to(torch.bfloat16) for _ in range(4)]
    dy = torch.randn(4096, 4096, device="cuda", generator=gen).to(torch.bfloat16)

    def chain():
        xa = x.detach().requires_grad_(True)
        was = [w.detach().requires_grad_(True) for w in ws]
        y = xa
        for w in was:
            y = rms_norm(y, w, 1e-6)
        return (y.detach(), *torch.autograd.grad(y, (xa, *was), dy))

    with monkeypatch.context() as plain:
        plain.setattr(module, "_pdl_kwargs", lambda x: {})
        want = chain()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()  # compile + warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, e), f"output {i} of the PDL chain differs from the plain launches"
    eager = chain()
    for i, (a, e) in enumerate(zip(eager, want, strict=True)):
        assert torch.equal(a, e), f"eager PDL output {i} differs from the plain launches"
