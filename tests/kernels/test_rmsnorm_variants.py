"""kernels.rmsnorm_config variants: the switch, the grid / reduction configuration, and the one-launch backward's
ticket counter (reset after every launch, proven by CUDA-graph replay on the GPU)."""

from __future__ import annotations

import pytest
import torch

import padless.kernels.rmsnorm as module
from padless.kernels.rmsnorm import rms_norm, rms_norm_reference
from padless.kernels.rmsnorm_config import (
    VARIANTS,
    bwd_config,
    default_variant,
    get_variant,
    one_launch_reducers,
    set_default_variant,
)
from tests.kernels.compare import (
    ATOL,
    DEVICE,
    INTERPRETED,
    assert_close_verbose,
    dtype_error_bound,
    interpreter_rtol,
)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the separate dw reduction kernel was launched")


def _grads(x, w, dy, **kwargs):
    xa, wa = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    y = rms_norm(xa, wa, 1e-6, **kwargs)
    return (y.detach(), *torch.autograd.grad(y, (xa, wa), dy))


def _float64_grads(x, w, dy, offset=0.0):
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    y = rms_norm_reference(x64, w64, 1e-6, offset)
    return (y.detach(), *torch.autograd.grad(y, (x64, w64), dy.double()))


def test_set_default_variant_switches_rms_norm_and_validates(monkeypatch):
    monkeypatch.setattr(module, "_dw_reduce_kernel", _NoLaunch())  # the second launch is two_launch's alone
    x, w, dy = torch.randn(9, 40, device=DEVICE), torch.randn(40, device=DEVICE), torch.randn(9, 40, device=DEVICE)
    previous = set_default_variant("one_launch")
    try:
        _grads(x, w, dy)  # one launch: the reduction kernel is never touched
        assert set_default_variant("two_launch") == "one_launch" and default_variant() == "two_launch"
        with pytest.raises(AssertionError, match="separate dw reduction kernel was launched"):
            _grads(x, w, dy)
        _grads(x, w, dy, variant="one_launch")  # the keyword overrides the default for one call
    finally:
        set_default_variant(previous)
    with pytest.raises(ValueError, match=r"unknown RMSNorm variant 'fastest': expected one of \["):
        set_default_variant("fastest")
    with pytest.raises(ValueError, match="unknown RMSNorm variant 'nope'"):
        rms_norm(x, w, 1e-6, variant="nope")
    assert default_variant() == previous


def test_one_launch_leaves_the_counter_zero_and_repeats_bit_identically():
    """The last reducer zeroes the ticket counter, so the next launch (here: the second call) starts from 0."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(45, 200, generator=gen).to(DEVICE)  # 200 columns: 25 slabs of 8, a ragged 7th tile column
    w = torch.randn(200, generator=gen).to(DEVICE)
    dy = torch.randn(45, 200, generator=gen).to(DEVICE)
    module._COUNTERS.clear()
    first = _grads(x, w, dy, variant="one_launch")
    counters = list(module._COUNTERS.values())
    assert len(counters) == 1 and counters[0].tolist() == [0, 0]
    second = _grads(x, w, dy, variant="one_launch")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    want = _float64_grads(x, w, dy)
    assert_close_verbose(second[2], want[2], atol=1e-4, rtol=1e-4, name="dw one_launch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "block_r", "offset"), [((37, 96), 1, 0.0), ((37, 3, 32), 4, 1.0), ((2, 131), 1, 0.0)]
)
def test_persistent_forward_several_blocks_per_program(shape, block_r, offset, dtype):
    """The persistent forward with several (ragged) row blocks per program, so its prefetch crosses iterations."""
    gen = torch.Generator().manual_seed(sum(shape) * 10 + block_r)
    x = (torch.randn(*shape, generator=gen) * 2).to(dtype).to(DEVICE)
    w = (torch.randn(shape[-1], generator=gen) * 0.5 + 1.0).to(dtype).to(DEVICE)
    y, rstd = module._launch_fwd(x, w, 1e-6, offset, block_r=block_r, variant="one_launch_fwd_persistent")
    want = rms_norm_reference(x.double(), w.double(), 1e-6, offset)
    want_rstd = torch.rsqrt(x.double().pow(2).mean(-1) + 1e-6).reshape(-1)
    bound = dtype_error_bound(rms_norm_reference(x, w, 1e-6, offset), want, ATOL[dtype])
    assert_close_verbose(y, want, atol=bound, rtol=interpreter_rtol(dtype), name=f"y persistent {dtype}")
    assert_close_verbose(rstd, want_rstd, atol=1e-5, rtol=1e-5, name="rstd persistent")


@pytest.mark.parametrize(("rows", "cols", "sms"), [(4096, 4096, 132), (4096 * 32, 128, 132), (1000, 4096, 132),
                                                   (16384, 4096, 132), (77, 1031, 78), (3, 8192, 132)])  # fmt: skip
def test_balanced_grid_keeps_the_most_blocks_per_program(rows, cols, sms):
    """``balanced`` drops only programs that do not shorten the longest program; one wave either way."""
    plain = bwd_config(rows, cols, sms)
    balanced = bwd_config(rows, cols, sms, balanced=True, one_launch=True)
    blocks = -(-rows // plain.block_r)
    assert balanced.programs <= plain.programs
    assert -(-blocks // balanced.programs) == -(-blocks // plain.programs)
    assert balanced.reduce_block_c * balanced.reduce_block_p <= 32 * 32 * balanced.num_warps  # <= 32 values/thread
    reducers = one_launch_reducers(balanced.programs, cols, 256, sms, interpreted=False)
    slabs = -(-cols // balanced.reduce_block_c)
    assert 1 <= reducers <= min(balanced.programs, slabs, sms)
    assert one_launch_reducers(balanced.programs, cols, 256, sms, interpreted=True) == 1  # sequential programs


def test_balanced_grid_for_qwen3_shapes():
    hidden = bwd_config(4096, 4096, 132, balanced=True, one_launch=True)
    head = bwd_config(4096 * 32, 128, 132, balanced=True, one_launch=True)
    # T = 4K: 256 programs x 16 rows (not 264 x 15-16); per-head 512 x 16 tiles of 16 rows (not 528).
    assert (hidden.programs, hidden.reduce_block_c, hidden.reduce_block_p) == (256, 32, 256)
    assert (head.programs, head.reduce_block_c, head.reduce_block_p) == (512, 8, 512)
    assert one_launch_reducers(hidden.programs, 4096, VARIANTS["one_launch"].reducers, 132, False) == 128
    assert one_launch_reducers(head.programs, 128, VARIANTS["one_launch"].reducers, 132, False) == 16
    assert one_launch_reducers(4000, 8192, 256, 78, False) == 78  # a swept grid past one wave: one per SM


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("shape", "offset"), [((4096, 4096), 0.0), ((4096, 32, 128), 0.0), ((777, 1031), 1.0)])
def test_rms_norm_every_variant_gpu(variant, shape, offset):
    """T = 4096 (hidden 4096 and per-head 32 x 128) and a ragged width, bf16, against the float64 reference; the
    GPU is where the one-launch path runs several reducers that wait on the ticket counter."""
    gen = torch.Generator(device="cuda").manual_seed(41)
    x = torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(shape[-1], device="cuda", generator=gen) * 0.3 + (0.0 if offset else 1.0)).to(torch.bfloat16)
    dy = torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)
    xs, ws = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    ys = rms_norm_reference(xs, ws, 1e-6, offset)
    same_dtype = (ys.detach(), *torch.autograd.grad(ys, (xs, ws), dy))
    expected = _float64_grads(x, w, dy, offset)
    xa, wa = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    ya = rms_norm(xa, wa, 1e-6, offset, variant=variant)
    actual = (ya.detach(), *torch.autograd.grad(ya, (xa, wa), dy))
    for name, a, r, e in zip(("y", "dx", "dw"), actual, same_dtype, expected, strict=True):
        bound = dtype_error_bound(r, e, ATOL[torch.bfloat16])
        assert_close_verbose(a, e, atol=bound, name=f"{name} {variant} {shape}")
    again = torch.autograd.grad(rms_norm(xa, wa, 1e-6, offset, variant=variant), (xa, wa), dy)
    assert torch.equal(again[1], actual[2]), "dw differs between two identical calls"
    # A frozen weight (LoRA) compiles the backward without dw: dx is per row, so it must be bit-identical.
    (dx_frozen,) = torch.autograd.grad(rms_norm(xa, w, 1e-6, offset, variant=variant), (xa,), dy)
    assert torch.equal(dx_frozen, actual[1]), "the frozen-weight dx differs from the dx computed with dw"


@pytest.mark.gpu
@pytest.mark.parametrize("capture", ["warm_stream", "other_stream", "fresh_counter"])
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 32, 128)])
def test_one_launch_backward_cuda_graph_replay(shape, capture):
    """Replaying a captured one-launch backward twice gives the same dx and dw (the kernel re-zeroes its ticket
    counter) and the eager two-launch dw. Captured on the warm-up stream, on torch.cuda.graph's own stream (as
    train.cuda_graph does: the device's warm-up counter is reused), or with no counter yet (made inside the graph)."""
    gen = torch.Generator(device="cuda").manual_seed(43)
    x = torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(shape[-1], device="cuda", generator=gen) * 0.3 + 1.0).to(torch.bfloat16)
    dy = torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)
    _, rstd = module._launch_fwd(x, w, 1e-6, 0.0)
    _, eager_dw = module._launch_bwd(dy, x, w, rstd, 0.0, True, True, variant="two_launch")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        module._launch_bwd(dy, x, w, rstd, 0.0, True, True, variant="one_launch")  # compile + warm-up
        if capture == "fresh_counter":
            module._COUNTERS.clear()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph, stream=side if capture == "warm_stream" else None):
        dx, dw = module._launch_bwd(dy, x, w, rstd, 0.0, True, True, variant="one_launch")
    results = []
    for _ in range(2):
        dx.zero_()
        dw.zero_()
        graph.replay()
        torch.cuda.synchronize()
        results.append((dx.clone(), dw.clone()))
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][0], results[1][0])
    assert_close_verbose(results[1][1].float(), eager_dw.float(), atol=2e-2, rtol=2e-2, name="graph dw vs eager")
    assert all(c.tolist() == [0, 0] for c in module._COUNTERS.values())
    eager_again = module._launch_bwd(dy, x, w, rstd, 0.0, True, True, variant="one_launch")[1]  # after the replays
    assert torch.equal(eager_again, results[1][1])


@pytest.mark.skipif(not INTERPRETED, reason="the --quick smoke run uses Triton's CPU interpreter")
def test_bench_rmsnorm_variants_quick_smoke(tmp_path):
    """tools/bench_rmsnorm_variants.py's plumbing (variants, shared measurements, table, JSON) on a tiny CPU run."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_rmsnorm_variants.py"
    spec = importlib.util.spec_from_file_location("bench_rmsnorm_variants", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--variants", "two_launch,one_launch_fwd_w4", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "rmsnorm_variants.json").read_text())
    got = {(r["variant"], r["kind"]) for r in payload["rows"] if r["fwd_us"] and r["bwd_us"] and not r["error"]}
    assert got == {(v, k) for v in ("two_launch", "one_launch_fwd_w4") for k in ("hidden", "per_head")}
    assert "| two_launch | hidden | 13 |" in (tmp_path / "rmsnorm_variants.md").read_text()
    # The same-traffic elementwise references run on the kernels' own tensors for every row.
    assert all(r["copy_fwd_us"] and r["copy_bwd_us"] for r in payload["rows"])


@pytest.mark.gpu
def test_pdl_chain_in_cuda_graph_matches_plain_launches():
    """A chain of norms (each reads the one before's output, forward and backward) launched with programmatic
    dependent launch and captured in a CUDA graph gives exactly the plain launches' values: each kernel waits for
    the previous one before reading, so an early launch never reads a half-written input."""
    gen = torch.Generator(device="cuda").manual_seed(47)
    x = torch.randn(4096, 4096, device="cuda", generator=gen).to(torch.bfloat16)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    assert module._pdl_kwargs(get_variant("two_launch_pdl"), x) == {"PDL": True, "launch_pdl": True}
    ws = [(torch.randn(4096, device="cuda", generator=gen) * 0.3 + 1.0).to(torch.bfloat16) for _ in range(4)]
    dy = torch.randn(4096, 4096, device="cuda", generator=gen).to(torch.bfloat16)

    def chain(variant):
        xa = x.detach().requires_grad_(True)
        was = [w.detach().requires_grad_(True) for w in ws]
        y = xa
        for w in was:
            y = rms_norm(y, w, 1e-6, variant=variant)
        return (y.detach(), *torch.autograd.grad(y, (xa, *was), dy))

    want = chain("two_launch")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain("two_launch_pdl")  # compile + warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain("two_launch_pdl")
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, e), f"output {i} of the PDL chain differs from the plain launches"
    eager = chain("two_launch_pdl")
    for i, (a, e) in enumerate(zip(eager, want, strict=True)):
        assert torch.equal(a, e), f"eager PDL output {i} differs from the plain launches"
