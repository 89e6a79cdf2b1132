"""Direct launch path of the attention kernels (kernels.attention_launch) against Triton's own launch.

CPU: the specialisation key is at least as fine as Triton's native ``specialize_impl`` (equal keys never hide
different specialisations), every attention launch passes its constexprs in parameter order (else the direct path
would refuse the kernel on the GPU), and the interpreter always takes the normal path. GPU (``pytest -m gpu``):
outputs and gradients of the direct path bitwise equal the normal path's over dtypes, head dims, GQA ratios,
windows (1 is a specialised int), misaligned inputs, and under CUDA-graph capture and replay.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch

from padless.kernels import attention_launch
from padless.kernels.attention import default_configs, varlen_attention
from padless.kernels.attention_cache import set_schedule_cache
from padless.kernels.attention_launch import direct_launch_info, set_direct_launch
from tests.kernels.test_attention import make_cu, make_inputs, run_grads


@pytest.fixture(autouse=True)
def direct_on():
    set_direct_launch(True)
    yield
    set_direct_launch(True)
    set_schedule_cache(True)


def _triton_spec(a):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, a, False, True, True)


def test_arg_key_is_at_least_as_fine_as_triton_specialisation() -> None:
    ints = [0, 1, 2, 15, 16, 17, 32, 48, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 1, 2**40, 2**40 + 3]
    ints += [2**63 - 1, 2**63, 2**63 + 16, -(2**31), -(2**31) - 1, -(2**31) - 16]
    base = {dt: torch.zeros(64, dtype=dt) for dt in (torch.bfloat16, torch.float16, torch.float32, torch.int32)}
    tensors = [t[o:] for t in base.values() for o in (0, 1, 2, 4, 8)]  # offsets move the pointer off 16 bytes
    values = [*ints, 0.0, 1.0, 0.37, True, False, *tensors]
    keys = [attention_launch._arg_key([a]) for a in values]
    specs = [_triton_spec(a) for a in values]
    for (ka, sa, a), (kb, sb, b) in itertools.combinations(zip(keys, specs, values, strict=True), 2):
        if ka == kb:
            assert sa == sb, f"same key {ka} but Triton specialises {a!r} as {sa} and {b!r} as {sb}"
    # Several arguments at once (the generated key function of a type tuple): position by position the same rule.
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        pick = [values[int(i)] for i in torch.randint(len(values), (2, 4), generator=g).flatten()]
        a, b = tuple(pick[:4]), tuple(pick[4:])
        if attention_launch._arg_key(a) == attention_launch._arg_key(b):
            assert [_triton_spec(x) for x in a] == [_triton_spec(x) for x in b], (a, b)
    same = (tensors[0], 16, 7, 0.5, True)
    assert attention_launch._arg_key(same) == attention_launch._arg_key((tensors[0], 32, 9, 0.25, False))
    # Types Triton may treat otherwise (numpy/torch scalars, strings): no key, so the normal launch.
    assert attention_launch._arg_key([torch.tensor(3).numpy()[()]]) is None
    assert attention_launch._arg_key(["x"]) is None


def test_attention_launches_pass_constexprs_in_parameter_order(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    normal = attention_launch._normal

    def record(fn, grid, args, constexprs, num_warps, num_stages):
        seen[fn.__name__] = (fn, len(args), list(constexprs))
        return normal(fn, grid, args, constexprs, num_warps, num_stages)

    monkeypatch.setattr(attention_launch, "_normal", record)
    set_schedule_cache(False)  # the schedule kernel launches on every call
    for det in (False, True):
        q, k, v, do, cu = make_inputs([5, 20], 4, 2, 16, seed=2)
        run_grads(varlen_attention, q, k, v, do, cu, 20, deterministic=det)
    assert {"_schedule_kernel", "_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel"} <= set(seen)
    for name, (fn, n_args, consts) in seen.items():
        params = list(inspect.signature(getattr(fn, "fn", fn)).parameters.values())
        is_const = ["constexpr" in str(p.annotation) for p in params]
        assert is_const == [False] * n_args + [True] * len(consts), name
        assert [p.name for p in params[n_args:]] == consts, name


def test_interpreter_and_switch_stay_on_the_normal_path() -> None:
    before = direct_launch_info()["normal"]
    q, k, v, do, cu = make_inputs([7, 9], 2, 1, 16, seed=4)
    run_grads(varlen_attention, q, k, v, do, cu, 9)
    info = direct_launch_info()
    if not torch.cuda.is_available():
        assert info["direct"] == 0 and info["normal"] > before and info["ready"] is False and info["why_off"]
    set_direct_launch(False)
    assert not attention_launch.direct_launch_enabled()
    assert direct_launch_info()["kernels"] == 0


# ------------------------------------------------------------------------------------------------------ GPU
def _gpu_inputs(lens, H, Hkv, D, dtype, seed, misalign=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = sum(lens)

    def make(h):
        if not misalign:
            return torch.randn(T, h, D, device="cuda", dtype=dtype, generator=g)
        flat = torch.randn(T * h * D + 8, device="cuda", dtype=dtype, generator=g)
        return flat[1 : 1 + T * h * D].view(T, h, D)  # 2-byte offset: not 16-byte aligned

    q, k, v, do = make(H), make(Hkv), make(Hkv), make(H)
    return q, k, v, do, make_cu(lens).cuda()


def _both_paths(q, k, v, do, cu, max_seqlen, **kw):
    set_direct_launch(False)
    normal = run_grads(varlen_attention, q, k, v, do, cu, max_seqlen, **kw)
    set_direct_launch(True)
    run_grads(varlen_attention, q, k, v, do, cu, max_seqlen, **kw)  # first call per specialisation: normal
    before = direct_launch_info()["direct"]
    direct = run_grads(varlen_attention, q, k, v, do, cu, max_seqlen, **kw)
    torch.cuda.synchronize()
    return normal, direct, direct_launch_info()["direct"] - before


GPU_CASES = {
    # name: (lens, H, Hkv, D, dtype, kwargs)
    "bf16_d128_gqa4": ([95, 3, 700, 1, 260], 16, 4, 128, torch.bfloat16, {}),
    "fp16_d64_mha": ([33, 1, 500], 8, 8, 64, torch.float16, {}),
    "bf16_d80_gqa8_softcap": ([120, 64, 7], 8, 1, 80, torch.bfloat16, {"softcap": 30.0}),
    "bf16_d256_gqa2_window1": ([40, 200], 4, 2, 256, torch.bfloat16, {"window": 1}),
    "bf16_d96_window17": ([300, 17, 2], 4, 1, 96, torch.bfloat16, {"window": 17}),
    "bf16_d128_window16": ([300, 17, 2], 4, 1, 128, torch.bfloat16, {"window": 16}),
    "fp16_d128_gqa8_long": ([2000, 13, 1], 8, 1, 128, torch.float16, {}),
}


@pytest.mark.gpu
@pytest.mark.parametrize("schedule_cache", [False, True], ids=["sched_build", "sched_cached"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_direct_launch_bitwise_equals_normal(name: str, schedule_cache: bool) -> None:
    lens, H, Hkv, D, dtype, kw = GPU_CASES[name]
    set_schedule_cache(schedule_cache)
    q, k, v, do, cu = _gpu_inputs(lens, H, Hkv, D, dtype, seed=len(name))
    normal, direct, n_direct = _both_paths(q, k, v, do, cu, max(lens), deterministic=True, **kw)
    # schedule (unless cached), forward, delta (unless dQ computes it: dq_first), dK/dV, dQ: every launch of the
    # second call went direct
    bwd = default_configs(D, dtype, max(lens), H // Hkv, sum(lens) / len(lens), deterministic=True)[1]
    assert n_direct == 3 + (not bwd.dq_first) + (not schedule_cache), direct_launch_info()
    assert not direct_launch_info()["refused"], direct_launch_info()
    for tag, a, b in zip(("out", "dq", "dk", "dv"), normal, direct, strict=True):
        assert torch.equal(a, b), f"{name}: direct {tag} differs from the normal launch"


@pytest.mark.gpu
def test_gpu_direct_launch_atomic_dq_and_misaligned_inputs() -> None:
    lens = [95, 3, 700, 1, 260]
    for misalign in (False, True):
        q, k, v, do, cu = _gpu_inputs(lens, 16, 4, 128, torch.bfloat16, seed=11, misalign=misalign)
        assert (q.data_ptr() % 16 != 0) == misalign
        normal, direct, n_direct = _both_paths(q, k, v, do, cu, 700)
        assert n_direct >= 3, direct_launch_info()
        for tag, a, b in zip(("out", "dq", "dk", "dv"), normal, direct, strict=True):
            if tag == "dq":  # fp32 atomics: summation order varies run to run on either path
                assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2), f"misalign={misalign}: dq"
            else:
                assert torch.equal(a, b), f"misalign={misalign}: direct {tag} differs from the normal launch"


@pytest.mark.gpu
def test_gpu_direct_launch_under_cuda_graph_capture() -> None:
    """Direct launches recorded in a graph replay on new data exactly as normal eager launches compute it."""
    lens = [95, 3, 700, 1, 260, 0]
    q, k, v, do, cu = _gpu_inputs(lens, 16, 4, 128, torch.bfloat16, seed=5)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))

    def step():
        out = varlen_attention(q, k, v, cu, 700, deterministic=True)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    before = direct_launch_info()["direct"]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    assert direct_launch_info()["direct"] - before >= 4  # the capture recorded direct launches
    with torch.no_grad():
        for x in (q, k, v, do):
            x.copy_(torch.randn_like(x))
        cu.copy_(make_cu([0, 260, 1, 700, 3, 95]).cuda())
    graph.replay()
    set_direct_launch(False)
    eager = run_grads(varlen_attention, q, k, v, do, cu, 700, deterministic=True)
    for tag, a, b in zip(("out", "dq", "dk", "dv"), static, eager, strict=True):
        assert torch.equal(a, b), f"graph replay {tag} (direct launches) differs from normal eager"
