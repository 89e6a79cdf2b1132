"""Schedule cache of varlen attention (kernels.attention_cache): hits, misses, invalidation, no leak, bitwise results.

CPU under the Triton interpreter on tiny packs; the GPU test checks that a cached schedule never leaks into a CUDA
graph (a graph replayed on refilled ``cu_seqlens`` must rebuild its schedule).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from padless.kernels import attention_cache
from padless.kernels.attention import varlen_attention, varlen_attention_reference
from padless.kernels.attention_cache import (
    MAX_ENTRIES,
    cached_schedules,
    clear_schedule_cache,
    schedule_cache_info,
    set_schedule_cache,
)
from padless.kernels.attention_fwd import build_schedules
from tests.kernels.test_attention import make_cu, make_inputs, run_grads


@pytest.fixture(autouse=True)
def fresh_cache():
    set_schedule_cache(True)
    clear_schedule_cache()
    yield
    set_schedule_cache(True)
    clear_schedule_cache()


def uncached(fn, *args, **kw):
    set_schedule_cache(False)
    try:
        return fn(*args, **kw)
    finally:
        set_schedule_cache(True)


def test_layers_of_one_batch_share_one_schedule_bitwise() -> None:
    # Three "layers" on the same cu_seqlens: one build, two hits; every output and gradient is bitwise the
    # uncached path's.
    lens = [5, 40, 1, 17]
    cu = make_cu(lens)
    layers = [make_inputs(lens, 4, 2, 16, seed=s)[:4] for s in range(3)]
    got = [run_grads(varlen_attention, q, k, v, do, cu, 40) for q, k, v, do in layers]
    assert schedule_cache_info() == {"hits": 2, "misses": 1, "entries": 1}
    want = [uncached(run_grads, varlen_attention, q, k, v, do, cu, 40) for q, k, v, do in layers]
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert torch.equal(a, b)


def test_in_place_edit_misses_and_uses_the_new_boundaries() -> None:
    lens, lens2 = [30, 2, 31], [1, 60, 2]  # same T and S, other boundaries
    q, k, v, _, cu = make_inputs(lens, 2, 1, 16, seed=3)
    varlen_attention(q, k, v, cu, 60)
    version = cu._version
    cu.copy_(make_cu(lens2))  # what a CUDA-graph trainer does to its static batch
    assert cu._version != version
    out = varlen_attention(q, k, v, cu, 60)
    assert schedule_cache_info()["misses"] == 2 and schedule_cache_info()["hits"] == 0
    assert torch.equal(out, uncached(varlen_attention, q, k, v, cu, 60))
    ref = varlen_attention_reference(q, k, v, cu, 60)
    assert (out - ref).abs().max().item() < 1e-4  # a stale schedule would mix the old examples' tokens


def test_equal_content_in_a_new_tensor_misses() -> None:
    q, k, v, _, cu = make_inputs([9, 20], 2, 2, 16, seed=5)
    a = varlen_attention(q, k, v, cu, 20)
    b = varlen_attention(q, k, v, cu.clone(), 20)
    assert schedule_cache_info()["misses"] == 2
    assert torch.equal(a, b)


def test_other_tiling_or_token_count_misses() -> None:
    cu = make_cu([7, 33])
    s1 = cached_schedules(cu, 40, (16,), build_schedules)
    s2 = cached_schedules(cu, 40, (16, 32), build_schedules)
    s3 = cached_schedules(cu, 56, (16,), build_schedules)  # same boundaries, more tokens (padded stream)
    assert schedule_cache_info() == {"hits": 0, "misses": 3, "entries": 3}
    assert cached_schedules(cu, 40, (16, 32), build_schedules) is s2
    for got, want in ((s1, build_schedules(cu, 40, (16,))), (s2, build_schedules(cu, 40, (16, 32)))):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert s3[0].numel() != s1[0].numel()


def test_cache_keeps_no_batch_alive() -> None:
    cu = make_cu([3, 4, 5])
    ref = weakref.ref(cu)
    cached_schedules(cu, 12, (16,), build_schedules)
    assert schedule_cache_info()["entries"] == 1
    del cu
    gc.collect()
    assert ref() is None
    assert schedule_cache_info()["entries"] == 0  # the weakref callback dropped the schedules too


def test_cache_is_bounded() -> None:
    keep = [make_cu([i + 1, 3]) for i in range(MAX_ENTRIES + 3)]
    for cu in keep:
        cached_schedules(cu, int(cu[-1]), (16,), build_schedules)
    assert schedule_cache_info()["entries"] == MAX_ENTRIES
    # the oldest went out first: it misses again, the newest hits
    cached_schedules(keep[-1], int(keep[-1][-1]), (16,), build_schedules)
    assert schedule_cache_info()["hits"] == 1
    cached_schedules(keep[0], int(keep[0][-1]), (16,), build_schedules)
    assert schedule_cache_info()["misses"] == MAX_ENTRIES + 4


def test_switch_off_builds_every_time() -> None:
    set_schedule_cache(False)
    cu = make_cu([5, 6])
    a = cached_schedules(cu, 11, (16,), build_schedules)
    b = cached_schedules(cu, 11, (16,), build_schedules)
    assert a[0] is not b[0] and torch.equal(a[0], b[0])
    assert schedule_cache_info() == {"hits": 0, "misses": 0, "entries": 0}
    assert not attention_cache.schedule_cache_enabled()


def test_inference_tensors_are_not_cached() -> None:
    with torch.inference_mode():
        q, k, v, _, cu = make_inputs([6, 20], 2, 1, 16, seed=9)
        a = varlen_attention(q, k, v, cu, 20)
        b = varlen_attention(q, k, v, cu, 20)
    assert torch.equal(a, b)
    assert schedule_cache_info() == {"hits": 0, "misses": 0, "entries": 0}


@pytest.mark.gpu
def test_gpu_cache_hits_outside_capture_never_inside() -> None:
    """Eager calls share the schedule; a graph captured after them builds its own (no lookup, no store while
    capturing), so a replay on refilled cu_seqlens matches the eager result on those boundaries."""
    lens, lens2 = [100, 3, 400, 9, 0], [0, 9, 400, 3, 100]
    T, H, Hkv, D = sum(lens), 8, 2, 64
    q, k, v = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
    cu = make_cu(lens).cuda()
    varlen_attention(q, k, v, cu, 400)
    varlen_attention(q, k, v, cu, 400)
    assert schedule_cache_info()["hits"] == 1
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        varlen_attention(q, k, v, cu, 400)  # warm-up on another stream: other key, a miss
    torch.cuda.current_stream().wait_stream(side)
    before = schedule_cache_info()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = varlen_attention(q, k, v, cu, 400)
        static2 = varlen_attention(q, k, v, cu, 400)
    assert schedule_cache_info() == before  # capture neither looked up nor stored
    cu.copy_(make_cu(lens2).cuda())
    graph.replay()
    eager = varlen_attention(q, k, v, cu, 400)
    assert torch.equal(static, eager) and torch.equal(static2, eager)
