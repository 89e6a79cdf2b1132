"""Varlen attention kernels against the per-example plain-PyTorch reference (CPU: Triton interpreter, tiny shapes).

Every case checks the output and dq, dk, dv (torch.autograd.grad) on fresh random inputs and random ragged
``cu_seqlens``. fp32 cases use a tight absolute bound; bf16/fp16 bounds are twice PyTorch's own error in that
dtype (``compare.dtype_error_bound``). Small explicit tilings force multi-block paths (full and masked key
blocks, several q blocks per example) on examples of a few dozen tokens.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from padless.kernels import attention as attention_mod
from padless.kernels.attention import (
    BwdConfig,
    FwdConfig,
    _kernel_layout,
    _reference_impl,
    default_configs,
    length_bucket,
    varlen_attention,
    varlen_attention_reference,
    varlen_attention_with_configs,
)
from padless.kernels.attention_fwd import build_schedules, n_slots
from tests.kernels.compare import assert_close_verbose, dtype_error_bound

# Smallest tiles tl.dot accepts (16): 16-token q/k blocks make a 40-token example span 3 blocks.
SMALL_FWD = FwdConfig(block_m=16, hpb=1, block_n=16, num_warps=4, num_stages=1)
SMALL_BWD = BwdConfig(16, 16, 1, 4, 1, 16, 1, 16, 4, 1)
# Heads packed into rows (2 heads x 16 tokens) with 32-key blocks: block_n > block_m exercises partial diagonals.
PACKED_FWD = FwdConfig(block_m=16, hpb=2, block_n=32, num_warps=4, num_stages=1)
PACKED_BWD = BwdConfig(32, 16, 2, 4, 1, 16, 2, 32, 4, 1)


def make_cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def make_inputs(lens, H, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v, do = (torch.randn(T, h, D, generator=g).to(dtype) for h in (H, Hkv, Hkv, H))
    return q, k, v, do, make_cu(lens)


def run_grads(fn, q, k, v, do, cu, max_seqlen, **kw):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v, cu, max_seqlen, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def run_grads_by_kv_head(fn, q, k, v, do, cu, max_seqlen, **kw):
    """``run_grads`` one KV head (and its query heads) at a time: heads never mix in attention, so the results are
    the same, and a reference that materialises (heads, l, l) scores needs 1/Hkv of the memory (an 8K example's
    fp32 scores and their autograd copies are ~40 GB for all 32 heads at once)."""
    group = q.shape[1] // k.shape[1]
    parts = [
        run_grads(fn, q[:, j * group : (j + 1) * group], k[:, j : j + 1], v[:, j : j + 1],
                  do[:, j * group : (j + 1) * group], cu, max_seqlen, **kw)
        for j in range(k.shape[1])
    ]  # fmt: skip
    return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(4))


def ragged_lens(total: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(1, 40, (1,), generator=g)))
        lens.append(n)
        left -= n
    return lens


CASES = {
    # name: (lens, H, Hkv, D, kwargs, configs)
    "ragged_len1_mha": ([5, 40, 1, 17, 1], 2, 2, 16, {}, (SMALL_FWD, SMALL_BWD)),
    "random_ragged_gqa4": (ragged_lens(72, 1), 4, 1, 32, {}, (None, None)),
    "gqa8_packed": ([3, 30, 9], 8, 1, 16, {}, (PACKED_FWD, PACKED_BWD)),
    "one_example_fills_pack": ([64], 2, 1, 16, {}, (SMALL_FWD, SMALL_BWD)),
    "many_tiny": ([1, 2, 3, 1, 4, 1, 6, 2, 1, 5, 1, 7], 2, 1, 16, {}, (None, None)),
    "window": ([33, 1, 50], 4, 2, 32, {"window": 7}, (PACKED_FWD, PACKED_BWD)),
    "window_wide_softcap": ([50, 20], 2, 1, 16, {"window": 35, "softcap": 3.0}, (SMALL_FWD, SMALL_BWD)),
    "softcap_gqa4": ([33, 1, 50], 4, 1, 32, {"softcap": 2.0}, (None, None)),
    "non_causal": ([19, 1, 44], 4, 2, 16, {"causal": False}, (PACKED_FWD, PACKED_BWD)),
    "scale": ([21, 30], 2, 1, 16, {"softmax_scale": 0.3}, (SMALL_FWD, SMALL_BWD)),
    "empty_example": ([10, 0, 25], 2, 1, 16, {}, (SMALL_FWD, SMALL_BWD)),
    "atomic_dq_window_softcap": (
        [5, 40, 1, 17],
        4,
        2,
        16,
        {"window": 9, "softcap": 3.0},
        (SMALL_FWD, BwdConfig(32, 16, 2, 4, 1, 16, 2, 32, 4, 1, dq_atomic=True)),
    ),
    "d64": ([9, 20], 2, 1, 64, {}, (None, None)),
    "d80": ([9, 20], 2, 1, 80, {"window": 6}, (SMALL_FWD, SMALL_BWD)),
    "d96": ([9, 20], 2, 1, 96, {}, (None, None)),
    "d128": ([9, 20], 2, 1, 128, {}, (SMALL_FWD, SMALL_BWD)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name: str) -> None:
    lens, H, Hkv, D, kw, (fcfg, bcfg) = CASES[name]
    q, k, v, do, cu = make_inputs(lens, H, Hkv, D, seed=hash(name) % 1000)
    max_seqlen = max(lens)
    got = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max_seqlen, fwd_cfg=fcfg, bwd_cfg=bcfg, **kw)
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, max_seqlen, **kw)
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), name=f"{name}:{tag}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_dtype_bound(dtype: torch.dtype) -> None:
    lens = [1, 30, 7, 41, 1, 16]
    q, k, v, do, cu = make_inputs(lens, 4, 1, 32, dtype=dtype, seed=7)
    got = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), fwd_cfg=PACKED_FWD, bwd_cfg=PACKED_BWD)

    def ref(compute):
        def fn(q, k, v, cu, m):
            return _reference_impl(q, k, v, cu, None, True, None, None, compute)

        return fn

    same = run_grads(ref(dtype), q, k, v, do, cu, max(lens))  # PyTorch's own error in this dtype
    exact = run_grads(ref(torch.float64), *(x.double() for x in (q, k, v, do)), cu, max(lens))
    for tag, a, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact, strict=True):
        assert a.dtype == dtype
        bound = dtype_error_bound(s, e, atol=1e-3 * max(1.0, e.abs().max().item()))
        assert_close_verbose(a, e, atol=bound, name=f"{dtype}:{tag}")


def test_public_function_default_tiling() -> None:
    lens = [12, 1, 30]
    q, k, v, do, cu = make_inputs(lens, 8, 2, 32, dtype=torch.bfloat16, seed=3)
    got = run_grads(varlen_attention, q, k, v, do, cu, max(lens))
    want = run_grads(varlen_attention_reference, *(x.float() for x in (q, k, v, do)), cu, max(lens))
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == torch.bfloat16
        assert_close_verbose(a, e, atol=3e-2 * max(1.0, e.abs().max().item()), name=f"default:{tag}")


@pytest.mark.parametrize("window", [None, 5])
def test_no_contamination_between_examples(window: int | None) -> None:
    """Changing every q/k/v token of one example changes no output or gradient of any other example (bitwise)."""
    lens = [13, 1, 29, 18]
    q, k, v, do, cu = make_inputs(lens, 4, 2, 16, seed=11)
    kw = {"window": window, "fwd_cfg": PACKED_FWD, "bwd_cfg": PACKED_BWD}
    base = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), **kw)
    a, b = int(cu[2]), int(cu[3])  # the 29-token example
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[a:b] = torch.randn_like(x[a:b]) * 3
    changed = run_grads(varlen_attention_with_configs, q2, k2, v2, do, cu, max(lens), **kw)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[a:b] = False
    for tag, x, y in zip(("out", "dq", "dk", "dv"), base, changed, strict=True):
        assert torch.equal(x[others], y[others]), f"{tag} of another example changed"
        assert not torch.equal(x[a:b], y[a:b]), f"{tag} of the changed example did not change: test is vacuous"


@pytest.mark.parametrize("atomic", [False, True], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_non_finite_values_stay_in_their_example(atomic: bool, device: str) -> None:
    """inf in the first and last token of one example's q, k and v leaves every other example's output and
    gradients bitwise unchanged: no tile that reaches past an example's end reads the next example's values or
    writes anything but zeros into its rows (0 * inf would be NaN). On the CPU (Triton's interpreter) with small
    tiles; on a GPU with the tiles ``varlen_attention`` picks."""
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the interpreter case: run where Triton interprets (the cuda case covers this machine)")
    lens = [13, 1, 29, 18] if device == "cpu" else [300, 1, 1029, 518]
    q, k, v, do, cu = make_inputs(lens, 4, 2, 16 if device == "cpu" else 128, seed=19)
    q, k, v, do, cu = (x.to(device) for x in (q, k, v, do, cu))
    if device == "cpu":
        kw = {"fwd_cfg": PACKED_FWD, "bwd_cfg": PACKED_BWD._replace(dq_atomic=atomic)}
    else:
        fwd, bwd = default_configs(128, q.dtype, max(lens), 2, sum(lens) / len(lens), gpu=torch.cuda.get_device_name())
        kw = {"fwd_cfg": fwd, "bwd_cfg": bwd._replace(dq_atomic=atomic)}
    base = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), **kw)
    a, b = int(cu[2]), int(cu[3])  # the third example
    for x in (q, k, v):
        x[a] = x[b - 1] = float("inf")
    changed = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), **kw)
    others = torch.ones(q.shape[0], dtype=torch.bool, device=device)
    others[a:b] = False
    for tag, x, y in zip(("out", "dq", "dk", "dv"), base, changed, strict=True):
        assert torch.equal(x[others], y[others]), f"{tag} of another example changed"
        assert not y[a:b].isfinite().all(), f"{tag} of the changed example stayed finite: test is vacuous"


@pytest.mark.parametrize("deterministic", [False, True])
def test_window_past_the_pack_is_plain_causal(deterministic: bool) -> None:
    """A window no shorter than the pack (2**31 - 1 as an 'unbounded' sentinel, or exactly T) gives plain causal
    attention: no key hidden, no int32 range arithmetic wrapping to an empty range (dK = dV = 0)."""
    lens = [13, 1, 29, 18]
    q, k, v, do, cu = make_inputs(lens, 4, 2, 16, seed=12)
    kw = {"fwd_cfg": PACKED_FWD, "bwd_cfg": PACKED_BWD._replace(dq_atomic=not deterministic)}
    want = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), **kw)
    for window in (2**31 - 1, sum(lens)):
        got = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), window=window, **kw)
        for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert_close_verbose(a, e, atol=1e-5, name=f"window={window}:{tag}")


def test_deterministic_backward_is_bitwise_repeatable() -> None:
    lens = ragged_lens(70, 5)
    q, k, v, do, cu = make_inputs(lens, 4, 1, 16, dtype=torch.bfloat16, seed=5)
    first = run_grads(varlen_attention, q, k, v, do, cu, max(lens), deterministic=True)
    second = run_grads(varlen_attention, q, k, v, do, cu, max(lens), deterministic=True)
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)


def test_deterministic_flag_picks_the_backward_path(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built-in default: the deterministic pair; a tuned "atomic" case: atomic dQ, which deterministic=True turns
    off (also over an explicit atomic bwd_cfg)."""
    for length in (64.0, 1024.0, 4096.0, 16384.0):
        assert not default_configs(128, torch.bfloat16, 16384, 4, length, gpu=None)[1].dq_atomic
    for gpu in (None, "NVIDIA H200"):
        for bucket_len in (64.0, 1024.0, 4096.0, 16384.0):
            bwd = default_configs(128, torch.bfloat16, 16384, 4, bucket_len, deterministic=True, gpu=gpu)[1]
            assert not bwd.dq_atomic
    path = tmp_path / "tuned.json"
    at = {"kv_block_n": 128, "kv_block_m": 32, "kv_hpb": 2, "kv_warps": 8, "kv_stages": 3}
    _write_tuned(path, [{"D": 128, "dtype": "bf16", "bucket": "long", "backward": "atomic",
                         "tiles": {"bwd_atomic": at}}])  # fmt: skip
    _use_table(monkeypatch, path)
    fast = default_configs(128, torch.bfloat16, 4096, 4, 4096.0, gpu="GPU A")[1]
    safe = default_configs(128, torch.bfloat16, 4096, 4, 4096.0, deterministic=True, gpu="GPU A")[1]
    assert fast.dq_atomic and not safe.dq_atomic
    calls = []
    real = attention_mod.flash_bwd

    def spy(*args, **kw):
        calls.append(args[-1].dq_atomic)
        return real(*args, **kw)

    lens = [20, 9]
    q, k, v, do, cu = make_inputs(lens, 2, 1, 16, seed=4)
    atomic_cfg = SMALL_BWD._replace(dq_atomic=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_mod, "flash_bwd", spy)
        got = run_grads(varlen_attention_with_configs, q, k, v, do, cu, 20, deterministic=True, fwd_cfg=SMALL_FWD,
                        bwd_cfg=atomic_cfg)  # fmt: skip
        run_grads(varlen_attention, q, k, v, do, cu, 20)
    assert calls == [False, False]
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, 20)
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), name=f"deterministic:{tag}")


# Long single examples over many 16-token tiles: windows narrower than a tile, spanning several tiles, and
# softcapped scores far into tanh's flat part (q scaled up: raw scores ~ +-40 against a cap of 5).
LONG_CASES = {
    "window_lt_tile": ([150, 3], {"window": 5}),
    "window_several_tiles": ([150, 3], {"window": 40}),
    "window_one_tile_exact": ([97], {"window": 16}),
    "softcap_large_scores": ([130], {"softcap": 5.0}),
    "window_softcap": ([140, 11], {"window": 23, "softcap": 5.0}),
}


@pytest.mark.parametrize("atomic", [False, True], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("name", list(LONG_CASES))
def test_long_example_window_softcap(name: str, atomic: bool) -> None:
    lens, kw = LONG_CASES[name]
    q, k, v, do, cu = make_inputs(lens, 2, 1, 16, seed=len(name))
    if "softcap" in kw:
        q = q * 10
    bcfg = SMALL_BWD._replace(dq_atomic=atomic)
    got = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), fwd_cfg=SMALL_FWD, bwd_cfg=bcfg, **kw)
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), name=f"{name}:{tag}")


BAD_FWD = {"block_m": 48, "hpb": 1, "block_n": 64, "num_warps": 4, "num_stages": 2}


def _write_tuned(path, cases, gpu: str = "GPU A") -> None:
    path.write_text(json.dumps({"version": attention_mod.TUNED_VERSION, "tables": [{"gpu": gpu, "cases": cases}]}))


def _use_table(monkeypatch: pytest.MonkeyPatch, path) -> None:
    monkeypatch.setattr(attention_mod, "TUNED_PATH", path)
    attention_mod.load_tuned.cache_clear()
    attention_mod._configs_for.cache_clear()


def test_tuned_table_is_read_and_fitted_to_the_group(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tuned.json"
    at = {"kv_block_n": 128, "kv_block_m": 16, "kv_hpb": 4, "kv_warps": 8, "kv_stages": 3}
    fwd = {"block_m": 32, "hpb": 2, "block_n": 64, "num_warps": 4, "num_stages": 2}
    _write_tuned(path, [
        {"D": 128, "dtype": "bf16", "bucket": "long", "backward": "atomic", "tiles": {"bwd_atomic": at}},
        {"D": 128, "dtype": "bf16", "bucket": "short", "tiles": {"fwd": fwd}},
    ])  # fmt: skip
    _use_table(monkeypatch, path)
    f, b = default_configs(128, torch.bfloat16, 8192, 4, 8192.0, gpu="GPU A")
    assert (b.kv_block_n, b.kv_block_m, b.kv_hpb, b.kv_warps, b.kv_stages, b.dq_atomic) == (128, 16, 4, 8, 3, True)
    assert f == attention_mod._builtin_configs(128, "long", 4)["fwd"]  # no tuned fwd tiles for "long"
    # Group 2: 4 heads per tile do not divide it, so the tile keeps its 64 rows as 32 tokens x 2 heads.
    b2 = default_configs(128, torch.float16, 8192, 2, 8192.0, gpu="GPU A")[1]  # fp16 falls back to bf16's tiles
    assert (b2.kv_block_m, b2.kv_hpb) == (32, 2)
    assert default_configs(128, torch.bfloat16, 8192, 4, 100.0, gpu="GPU A")[0] == FwdConfig(**fwd)
    # Deterministic path: no tuned bwd_kv tiles, so the built-in ones.
    bd = default_configs(128, torch.bfloat16, 8192, 4, 8192.0, deterministic=True, gpu="GPU A")[1]
    assert tuple(bd[:5]) == attention_mod._builtin_configs(128, "long", 4)["bwd_kv"] and not bd.dq_atomic


def test_tuned_table_is_honoured_only_on_its_gpu(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another GPU (or the CPU) gets the built-in tiles and the deterministic backward, not GPU A's measurements."""
    path = tmp_path / "tuned.json"
    fwd = {"block_m": 32, "hpb": 2, "block_n": 64, "num_warps": 4, "num_stages": 2}
    at = {"kv_block_n": 64, "kv_block_m": 32, "kv_hpb": 2, "kv_warps": 8, "kv_stages": 1}
    _write_tuned(path, [{"D": 128, "dtype": "bf16", "bucket": "long", "backward": "atomic",
                         "tiles": {"fwd": fwd, "bwd_atomic": at}}])  # fmt: skip
    _use_table(monkeypatch, path)
    builtin = attention_mod._builtin_configs(128, "long", 4)
    f, b = default_configs(128, torch.bfloat16, 8192, 4, 8192.0, gpu="GPU A")
    assert f == FwdConfig(**fwd) and tuple(b[:5]) == tuple(at.values()) and b.dq_atomic
    for other in ("GPU B", None):
        f, b = default_configs(128, torch.bfloat16, 8192, 4, 8192.0, gpu=other)
        assert tuple(f) == builtin["fwd"] and tuple(b[:10]) == (*builtin["bwd_kv"], *builtin["bwd_dq"])
        assert not b.dq_atomic


def test_xlong_bucket_takes_long_tiles_until_it_has_its_own(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One 16K example per pack is "xlong". With only a "long" case it runs long's tiles and long's backward;
    # its own tiles win once a sweep writes them, and its own backward choice once the sweep measured both.
    assert [length_bucket(n) for n in (256, 2048, 8192, 8193)] == ["short", "medium", "long", "xlong"]
    path = tmp_path / "tuned.json"
    kv = {"kv_block_n": 64, "kv_block_m": 32, "kv_hpb": 2, "kv_warps": 8, "kv_stages": 1}
    at = {"kv_block_n": 64, "kv_block_m": 16, "kv_hpb": 2, "kv_warps": 8, "kv_stages": 2}
    dq = {"q_block_m": 64, "q_hpb": 2, "q_block_n": 32, "q_warps": 8, "q_stages": 2}

    def case(bucket, tiles, backward=None):
        out = {"D": 256, "dtype": "bf16", "bucket": bucket, "tiles": tiles}
        return out if backward is None else {**out, "backward": backward}

    long_case = case("long", {"bwd_atomic": at, "bwd_kv": kv, "bwd_dq": dq}, "deterministic")
    _write_tuned(path, [long_case])
    _use_table(monkeypatch, path)
    b_long = default_configs(256, torch.bfloat16, 4096, 4, 4096.0, gpu="GPU A")[1]
    b_xlong = default_configs(256, torch.bfloat16, 16384, 4, 16384.0, gpu="GPU A")[1]
    assert b_xlong == b_long and not b_xlong.dq_atomic
    assert tuple(b_xlong[:10]) == (64, 32, 2, 8, 1, 64, 2, 32, 8, 2)
    # An xlong sweep that timed only the deterministic pair: its tiles, long's backward choice.
    kv_x = dict(kv, kv_stages=2)
    dq_x = dict(dq, q_hpb=4, q_block_m=32)
    _write_tuned(path, [long_case, case("xlong", {"bwd_kv": kv_x, "bwd_dq": dq_x})])
    _use_table(monkeypatch, path)
    b = default_configs(256, torch.bfloat16, 16384, 4, 16384.0, gpu="GPU A")[1]
    assert tuple(b[:10]) == (64, 32, 2, 8, 2, 32, 4, 32, 8, 2) and not b.dq_atomic
    assert default_configs(256, torch.bfloat16, 4096, 4, 4096.0, gpu="GPU A")[1] == b_long  # long keeps its own
    # The xlong case's own choice wins over long's.
    _write_tuned(path, [long_case, case("xlong", {"bwd_atomic": at}, "atomic")])
    _use_table(monkeypatch, path)
    assert default_configs(256, torch.bfloat16, 16384, 4, 16384.0, gpu="GPU A")[1].dq_atomic


def _case(tiles=None, **change):
    return {"D": 128, "dtype": "bf16", "bucket": "long", "tiles": tiles or {}, **change}


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"version": 1, "entries": []}, "expected \\{'version': 2"),
        ({"version": 2, "tables": [{"cases": []}]}, "non-empty 'gpu'"),
        ({"version": 2, "tables": [{"gpu": "A", "cases": [_case(tiles={"bwd": {}})]}]}, "keys among"),
        ({"version": 2, "tables": [{"gpu": "A", "cases": [_case(bucket="huge")]}]}, "bucket='huge'"),
        ({"version": 2, "tables": [{"gpu": "A", "cases": [_case(backward="fast")]}]}, "backward='fast'"),
        ({"version": 2, "tables": [{"gpu": "A", "cases": [_case(tiles={"fwd": {"block_m": 32}})]}]}, "exactly the"),
        ({"version": 2, "tables": [{"gpu": "A", "cases": [_case(tiles={"fwd": BAD_FWD})]}]}, "block_m=48"),
        ({"version": 2, "tables": [{"gpu": "A", "cases": [_case(), _case()]}]}, "a second case"),
        ({"version": 2, "tables": [{"gpu": "A", "cases": []}, {"gpu": "A", "cases": []}]}, "a second table"),
        (None, "not valid JSON"),
    ],
)
def test_bad_tuned_table_raises_naming_the_file(tmp_path, monkeypatch, doc, match: str) -> None:
    path = tmp_path / "bad_tuned.json"
    path.write_text("{oops" if doc is None else json.dumps(doc))
    _use_table(monkeypatch, path)
    with pytest.raises(ValueError, match=f"bad_tuned.json.*{match}"):
        default_configs(128, torch.bfloat16, 8192, 4, gpu="A")


def test_shipped_tuned_table_resolves_to_its_tiles() -> None:
    """kernels/attention_tuned.json parses, and on each of its GPUs every case's tiles and backward choice are
    what default_configs runs for that case (the xlong fallback and GQA fitting aside: group 4 keeps every
    tuned heads-per-tile)."""
    attention_mod.load_tuned.cache_clear()
    attention_mod._configs_for.cache_clear()
    tables = attention_mod.load_tuned(attention_mod.TUNED_PATH)
    assert tables, "the shipped table has no GPU"
    mean_of = {"short": 100.0, "medium": 1000.0, "long": 4096.0, "xlong": 16384.0}
    dtypes = {name: dtype for dtype, name in attention_mod.DTYPE_NAMES.items()}
    for gpu, cases in tables.items():
        assert cases, f"{gpu}: no cases"
        for (D, dtype, bucket), case in cases.items():
            fwd, bwd = default_configs(D, dtypes[dtype], 16384, 4, mean_of[bucket], gpu=gpu)
            if "fwd" in case.tiles:
                assert tuple(fwd) == case.tiles["fwd"], (gpu, D, bucket)
            if case.backward is not None:
                assert bwd.dq_atomic == (case.backward == "atomic"), (gpu, D, bucket)
            kv_kind = "bwd_atomic" if bwd.dq_atomic else "bwd_kv"
            if kv_kind in case.tiles:
                assert tuple(bwd[:5]) == case.tiles[kv_kind], (gpu, D, bucket)
            if not bwd.dq_atomic and "bwd_dq" in case.tiles:
                assert tuple(bwd[5:10]) == case.tiles["bwd_dq"], (gpu, D, bucket)


@pytest.mark.parametrize("atomic", [False, True], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("kw", [{}, {"window": 5}, {"softcap": 3.0}], ids=["causal", "window", "softcap"])
def test_long_indexing_path(monkeypatch: pytest.MonkeyPatch, kw: dict, atomic: bool) -> None:
    """The int64 path (forced on small inputs) on ragged examples: int32 token indices, int64 element offsets."""
    monkeypatch.setenv("PADLESS_FORCE_LONG_INDEXING", "1")
    lens = [7, 30, 1, 45]
    q, k, v, do, cu = make_inputs(lens, 4, 2, 16, seed=13)
    bwd = PACKED_BWD._replace(dq_atomic=atomic)
    got = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), fwd_cfg=PACKED_FWD, bwd_cfg=bwd, **kw)
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), name=f"long:{tag}")


@pytest.mark.parametrize("long_indexing", ["0", "1"], ids=["int32", "int64"])
def test_k_and_v_with_different_token_strides(monkeypatch: pytest.MonkeyPatch, long_indexing: str) -> None:
    """v a view into a wider (T, 2 Hkv, D) tensor: its token stride is twice k's, so the kernels must step K and V
    by their own strides."""
    monkeypatch.setenv("PADLESS_FORCE_LONG_INDEXING", long_indexing)
    lens = [7, 30, 1, 45]
    q, k, v, do, cu = make_inputs(lens, 4, 2, 16, seed=17)
    wide = torch.cat([v, torch.randn_like(v)], dim=1).requires_grad_(True)
    qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    view = wide[:, : v.shape[1]]
    assert view.stride(0) == 2 * k.stride(0)
    out = varlen_attention_with_configs(qg, kg, view, cu, max(lens), fwd_cfg=PACKED_FWD, bwd_cfg=PACKED_BWD)
    dq, dk, dwide = torch.autograd.grad(out, (qg, kg, wide), do)
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, max(lens))
    for tag, a, e in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dwide[:, : v.shape[1]]), want, strict=True):
        assert_close_verbose(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), name=f"strided v:{tag}")


@pytest.mark.parametrize(("scale", "size"), [(1e-30, 1.0), (2e8, 0.02)], ids=["tiny", "huge"])
def test_extreme_scales_keep_masked_keys_out(scale: float, size: float) -> None:
    """A masked key weighs nothing at a tiny or a huge scale, also in a sliding window whose first key block is
    wholly masked for some rows (no NaN, no weight leaking to future or padding keys)."""
    lens = [7, 30, 1, 45]
    q, k, v, do, cu = make_inputs(lens, 4, 2, 16, seed=5)
    q, k = q * size, k * size
    kw = {"softmax_scale": scale, "window": 5}
    got = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), fwd_cfg=PACKED_FWD, bwd_cfg=PACKED_BWD,
                    **kw)  # fmt: skip
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    assert all(torch.isfinite(x).all() for x in got)
    # At the huge scale the softmax is nearly one-hot and its gradients amplify fp32 rounding: compare the output.
    for tag, a, e in list(zip(("out", "dq", "dk", "dv"), got, want, strict=True))[: 1 if scale > 1 else 4]:
        assert_close_verbose(a, e, atol=2e-4 * max(1.0, e.abs().max().item()), name=f"scale {scale:g}:{tag}")


def test_kernel_layout_copies_only_layouts_whose_in_tile_offsets_pass_int32() -> None:
    """The kernels keep head and in-tile offsets int32 on the long path: a head-major view of 1M tokens (head
    stride x heads past 2**31) is copied token-major, a token-major tensor or a small head-major view is not."""
    T, H, D = 1 << 20, 32, 128
    token_major = torch.empty(T, H, D, device="meta")
    assert _kernel_layout(token_major) is token_major
    head_major = torch.empty(H, T, D, device="meta").transpose(0, 1)
    laid = _kernel_layout(head_major)
    assert laid.is_contiguous() and laid.shape == (T, H, D)
    small = torch.empty(H, 1024, D, device="meta").transpose(0, 1)
    assert _kernel_layout(small) is small
    not_unit = torch.empty(T, H, D, device="meta").transpose(1, 2).contiguous().transpose(1, 2)  # D-stride H
    assert _kernel_layout(not_unit).stride(-1) == 1


@pytest.mark.parametrize(
    ("configs", "match"),
    [
        ({"fwd_cfg": FwdConfig(16, 1, 512, 4, 2)}, "fwd_cfg.block_n=512"),
        ({"bwd_cfg": PACKED_BWD._replace(q_block_n=512)}, "bwd_cfg.q_block_n=512"),
    ],
)
def test_tiles_past_the_row_limit_are_refused(configs: dict, match: str) -> None:
    """Explicit key blocks longer than the int32 in-tile offsets are laid out for: one clear error."""
    q, k, v, _, cu = make_inputs([7, 30], 4, 2, 16, seed=3)
    with pytest.raises(ValueError, match=re.escape(match)):
        varlen_attention_with_configs(q, k, v, cu, 30, **configs)


def _expected_schedule(lens: list[int], block: int) -> list[int]:
    """Independent model of the slot layout: example s owns slots cu[s] // block + s + j, j < cdiv(l_s, block)."""
    slots = [-1] * n_slots(sum(lens), len(lens), block)
    start = 0
    for s, n in enumerate(lens):
        for j in range(-(-n // block)):
            assert slots[start // block + s + j] == -1, "slot ranges overlap"
            slots[start // block + s + j] = s
        start += n
    return slots


@pytest.mark.parametrize(
    "lens",
    [
        [1, 0, 40, 16, 17, 3, 64],
        [0, 0, 5, 0, 33, 0, 0],  # zero-length examples first, between and last (repeated cu_seqlens entries)
        [300, *([1] * 37), 2],  # max_seqlen far above the mean
        [0],
    ],
    ids=["ragged", "zero_len", "max_gg_mean", "only_empty"],
)
def test_schedules_one_launch_match_slot_model(lens: list[int]) -> None:
    """Three block sizes in one launch; each slot's example (or -1) against the Python model, every block once."""
    cu = make_cu(lens)
    blocks = (16, 64, 32)
    scheds = build_schedules(cu, sum(lens), blocks)
    for block, sched in zip(blocks, scheds, strict=True):
        assert sched.dtype == torch.int32 and sched.shape == (n_slots(sum(lens), len(lens), block),)
        assert sched.tolist() == _expected_schedule(lens, block), f"block {block}"
        # Each (example, block) pair appears exactly once: no tile lost, none twice.
        owned = sorted(x for x in sched.tolist() if x >= 0)
        assert owned == sorted(s for s, n in enumerate(lens) for _ in range(-(-n // block)))


@pytest.mark.parametrize("atomic", [False, True], ids=["deterministic", "atomic"])
@pytest.mark.parametrize(
    ("lens", "D", "kw"),
    [([5, 40, 1, 17], 16, {}), ([33, 1, 20], 80, {"window": 9, "softcap": 3.0}), ([0, 64, 0, 3], 32, {})],
    ids=["plain", "d80_window_softcap", "zero_len_and_full_blocks"],
)
def test_packed_heads_backward_matches_reference(lens: list[int], D: int, kw: dict, atomic: bool) -> None:
    """Heads packed into the tile rows, both ways to dQ. Deterministic: the dQ kernel computes delta and stores it
    for the dK/dV kernel launched after it; a delta row it failed to store would leave dK/dV reading garbage."""
    q, k, v, do, cu = make_inputs(lens, 4, 2, D, seed=41 + D)
    bcfg = PACKED_BWD._replace(dq_atomic=atomic)
    got = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), fwd_cfg=PACKED_FWD, bwd_cfg=bcfg, **kw)
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), name=f"packed:{tag}")


def test_deterministic_backward_with_strided_output_gradient() -> None:
    """dO with other strides than O (a slice of a wider buffer): the dQ kernel reads O with O's own strides."""
    lens = [13, 30, 2]
    q, k, v, do, cu = make_inputs(lens, 4, 2, 16, seed=57)
    wide = torch.randn(do.shape[0], 6, 16)
    wide[:, 1:5] = do
    got = run_grads(varlen_attention_with_configs, q, k, v, wide[:, 1:5], cu, max(lens), fwd_cfg=PACKED_FWD,
                    bwd_cfg=PACKED_BWD)  # fmt: skip
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, max(lens))
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), name=f"strided dO:{tag}")


ZERO_LEN_LENS = [0, 10, 0, 0, 25, 1, 0, 0]


@pytest.mark.parametrize(
    "bcfg",
    [
        SMALL_BWD,
        SMALL_BWD._replace(dq_atomic=True),
        PACKED_BWD._replace(q_block_m=32, q_hpb=1),
    ],
    ids=["deterministic", "atomic", "three_schedules"],
)
def test_zero_length_examples_match_reference(bcfg: BwdConfig) -> None:
    """Repeated cu_seqlens entries (empty examples first, inside and at the end): forward and all gradients."""
    q, k, v, do, cu = make_inputs(ZERO_LEN_LENS, 4, 2, 16, seed=17)
    assert cu.tolist()[-3:] == [36, 36, 36] and cu.tolist()[:2] == [0, 0]
    m = max(ZERO_LEN_LENS)
    got = run_grads(varlen_attention_with_configs, q, k, v, do, cu, m, fwd_cfg=PACKED_FWD, bwd_cfg=bcfg)
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, m)
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), name=f"zero_len:{tag}")


@pytest.mark.parametrize("atomic", [False, True], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp16_non_causal_backward_has_no_overflow(D: int, atomic: bool, device: str) -> None:
    """flash-attention's overflow case (scaled q, k, v; one-token and short examples; non-causal; fp16).

    A one-token query with a very negative score has lse far below 0; a key slot past its example's end (read as
    zeros in a partial key block) would get probability exp2(0 - lse), which is inf in fp16 and makes inf * 0 =
    NaN in dQ. Every gradient must stay finite and within the fp16 bound of the reference. On the CPU (Triton's
    interpreter) with small tiles; on a GPU with the tiles ``varlen_attention`` picks.
    """
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the interpreter case: run where Triton interprets (the cuda case covers this machine)")
    lens = [1, 2, 1, 1, 5, 1, 17, 1, 1, 3, 1, 1]
    q, k, v, do, cu = make_inputs(lens, 2, 1, D, dtype=torch.float16, seed=D)
    q, k, v = q * 5, k * 3, v * 3
    if device == "cuda":
        q, k, v, do, cu = (x.cuda() for x in (q, k, v, do, cu))
        got = run_grads(varlen_attention, q, k, v, do, cu, max(lens), causal=False, deterministic=not atomic)
        q, k, v, do, cu = (x.cpu() for x in (q, k, v, do, cu))
        got = tuple(x.cpu() for x in got)
    else:
        bcfg = SMALL_BWD._replace(dq_atomic=atomic)
        got = run_grads(varlen_attention_with_configs, q, k, v, do, cu, max(lens), causal=False,
                        fwd_cfg=SMALL_FWD, bwd_cfg=bcfg)  # fmt: skip

    def ref(compute):
        return lambda q, k, v, cu, m: _reference_impl(q, k, v, cu, None, False, None, None, compute)

    same = run_grads(ref(torch.float16), q, k, v, do, cu, max(lens))  # PyTorch's own error in fp16
    exact = run_grads(ref(torch.float64), *(x.double() for x in (q, k, v, do)), cu, max(lens))
    for tag, a, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact, strict=True):
        assert torch.isfinite(a).all(), f"{tag}: {int((~torch.isfinite(a)).sum())} non-finite values"
        bound = dtype_error_bound(s, e, atol=1e-3 * max(1.0, e.abs().max().item()))
        assert_close_verbose(a, e, atol=bound, name=f"fp16 overflow D{D}:{tag}")


def test_max_seqlen_far_above_longest_example() -> None:
    """The trainer may pass the shard's max_len (e.g. 16384) for a pack of short examples: results are unchanged."""
    lens = [7, 0, 30, 1, 12]
    q, k, v, do, cu = make_inputs(lens, 2, 1, 16, seed=23)
    got = run_grads(varlen_attention, q, k, v, do, cu, 16384)
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, 16384)
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, atol=2e-5 * max(1.0, e.abs().max().item()), name=f"big_max:{tag}")


def test_forward_without_grad_matches_and_saves_nothing() -> None:
    """no_grad / inputs without requires_grad: forward only (no backward schedules), same output."""
    lens = [9, 0, 21]
    q, k, v, _, cu = make_inputs(lens, 4, 2, 16, seed=29)
    with torch.no_grad():
        got = varlen_attention_with_configs(q, k, v, cu, 21, fwd_cfg=PACKED_FWD, bwd_cfg=PACKED_BWD)
    assert got.grad_fn is None
    want = varlen_attention_reference(q, k, v, cu, 21)
    assert_close_verbose(got, want, atol=2e-5 * max(1.0, want.abs().max().item()), name="no_grad:out")


def test_reference_is_per_example_attention() -> None:
    """The reference itself against one hand-written softmax attention per example (guards the test oracle)."""
    lens = [3, 5]
    q, k, v, _, cu = make_inputs(lens, 2, 1, 8, dtype=torch.float64, seed=2)
    out = varlen_attention_reference(q, k, v, cu, 5, window=2)
    for s, (a, b) in enumerate([(0, 3), (3, 8)]):
        for h in range(2):
            for i in range(a, b):
                js = [j for j in range(a, b) if j <= i and j > i - 2]
                w = torch.softmax(torch.stack([q[i, h] @ k[j, 0] / math.sqrt(8) for j in js]), 0)
                expect = sum(wj * v[j, 0] for wj, j in zip(w, js, strict=True))
                torch.testing.assert_close(out[i, h], expect, rtol=1e-12, atol=1e-12)
        del s


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"cu": torch.tensor([0, 4], dtype=torch.int64)}, "cu_seqlens must be a 1-D int32"),
        ({"k": torch.zeros(4, 3, 16)}, "not a multiple of Hkv=3"),
        ({"window": 0}, "window=0 must be None or a positive int"),
        ({"window": 3, "causal": False}, "needs causal=True"),
        ({"softcap": -1.0}, "softcap=-1.0 must be None or > 0"),
        ({"q": torch.zeros(4, 2, 16, dtype=torch.float64)}, "expected one of"),
        ({"q": torch.zeros(4, 2, 512), "k": torch.zeros(4, 1, 512)}, "head dim D=512"),
    ],
)
def test_bad_arguments_raise(change: dict, match: str) -> None:
    args = {"q": torch.zeros(4, 2, 16), "k": torch.zeros(4, 1, 16), "cu": make_cu([4]), "causal": True}
    args.update(change)
    q, k = args.pop("q"), args.pop("k")
    v = torch.zeros_like(k)
    if q.dtype != k.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, args.pop("cu"), 4, **args)


def test_reference_by_kv_head_equals_all_heads_at_once() -> None:
    """The memory-saving way the GPU tests run the reference gives the all-heads result (GQA 4, ragged)."""
    torch.manual_seed(3)
    lens = [5, 1, 12, 7]
    T, H, Hkv, D = sum(lens), 8, 2, 16
    q, k, v, do = (torch.randn(T, h, D, dtype=torch.float64) for h in (H, Hkv, Hkv, H))
    cu = make_cu(lens)
    for kw in ({}, {"window": 3}, {"softcap": 5.0}):
        whole = run_grads(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
        split = run_grads_by_kv_head(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
        for tag, a, b in zip(("out", "dq", "dk", "dv"), split, whole, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{kw} {tag}")


# ------------------------------------------------------------------------------------------------ GPU only
def _alpaca_lens(total: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens, left = [], total
    while left > 0:
        n = int(min(max(math.exp(math.log(95) + 0.8 * float(torch.randn(1, generator=g))), 8), 1024))
        n = min(n, left)
        lens.append(n)
        left -= n
    return lens


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lens",
    # One 8K example, not 16K: the fp32 reference materialises (heads, l, l) scores (8.6 GB at 8K for 32 heads,
    # 34 GB at 16K); run_grads_by_kv_head takes 4 heads at a time.
    [_alpaca_lens(4096, 0), [1024] * 4, [4096, 1, 2047, 1024, 1, 1023], _alpaca_lens(16384, 1), [8192]],
    ids=["alpaca4k", "eq1k", "ragged8k", "alpaca16k", "one8k"],
)
@pytest.mark.parametrize("kw", [{}, {"window": 512}, {"softcap": 50.0}], ids=["plain", "window", "softcap"])
def test_gpu_realistic_bf16(lens: list[int], kw: dict) -> None:
    torch.manual_seed(0)
    T, H, Hkv, D = sum(lens), 32, 8, 128
    dev = "cuda"
    q, k, v, do = (torch.randn(T, h, D, device=dev, dtype=torch.bfloat16) for h in (H, Hkv, Hkv, H))
    cu = make_cu(lens).to(dev)
    got = run_grads(varlen_attention, q, k, v, do, cu, max(lens), **kw)
    same = run_grads_by_kv_head(
        lambda q, k, v, cu, m, **kw: _reference_impl(
            q, k, v, cu, None, True, kw.get("window"), kw.get("softcap"), torch.bfloat16
        ),
        q, k, v, do, cu, max(lens), **kw,
    )  # fmt: skip
    exact = run_grads_by_kv_head(varlen_attention_reference, *(x.float() for x in (q, k, v, do)), cu, max(lens), **kw)
    for tag, a, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact, strict=True):
        bound = dtype_error_bound(s, e, atol=1e-3 * max(1.0, e.abs().max().item()))
        assert_close_verbose(a, e, atol=bound, name=f"gpu:{tag}")
    # Default backward: where the table chose the atomic kernel dq may differ in the last bits; dk/dv never do.
    again = run_grads(varlen_attention, q, k, v, do, cu, max(lens), **kw)
    for tag, x, y in zip(("out", "dq", "dk", "dv"), got, again, strict=True):
        assert tag == "dq" or torch.equal(x, y), f"{tag} not deterministic"


@pytest.mark.gpu
def test_gpu_deterministic_backward() -> None:
    lens = [*_alpaca_lens(4096, 5), 2048]
    T, H, Hkv, D = sum(lens), 32, 8, 128
    q, k, v, do = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv, H))
    cu = make_cu(lens).cuda()
    first = run_grads(varlen_attention, q, k, v, do, cu, max(lens), deterministic=True)
    second = run_grads(varlen_attention, q, k, v, do, cu, max(lens), deterministic=True)
    fast = run_grads(varlen_attention, q, k, v, do, cu, max(lens))
    for tag, x, y, z in zip(("out", "dq", "dk", "dv"), first, second, fast, strict=True):
        assert torch.equal(x, y), f"deterministic=True: {tag} differs between runs"
        assert_close_verbose(z, x, atol=2e-2 * max(1.0, x.abs().max().item()), name=f"atomic vs det:{tag}")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [8, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_head_dims(D: int, dtype: torch.dtype) -> None:
    lens = [1, 300, 77, 1500, 5, 160]
    H, Hkv = 8, 2
    q, k, v, do, cu = make_inputs(lens, H, Hkv, D, dtype=dtype, seed=D)
    q, k, v, do, cu = (x.cuda() for x in (q, k, v, do, cu))
    got = run_grads(varlen_attention, q, k, v, do, cu, max(lens))
    same = run_grads(
        lambda q, k, v, cu, m: _reference_impl(q, k, v, cu, None, True, None, None, dtype), q, k, v, do, cu, 0
    )
    exact = run_grads(varlen_attention_reference, *(x.float() for x in (q, k, v, do)), cu, max(lens))
    for tag, a, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact, strict=True):
        bound = dtype_error_bound(s, e, atol=1e-3 * max(1.0, e.abs().max().item()))
        assert_close_verbose(a, e, atol=bound, name=f"gpu D={D}:{tag}")


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_memory")  # tens of GiB: one at a time under --dist loadgroup
@pytest.mark.parametrize("D", [128, 256])
@pytest.mark.parametrize("lens", [[4096, 4000, 96], [8704]], ids=["long", "xlong"])
def test_gpu_long_buckets(D: int, lens: list[int]) -> None:
    # The tuned tiles of the long (mean <= 8K) and xlong buckets (D 256: 64 keys x 64 rows in 2 stages, 3-stage
    # dQ), which the shorter GPU tests never pick; GQA 4, bf16, the reference one kv head at a time.
    from padless.kernels.attention import length_bucket

    assert length_bucket(sum(lens) / len(lens)) == ("xlong" if len(lens) == 1 else "long")
    H, Hkv = 8, 2
    q, k, v, do, cu = make_inputs(lens, H, Hkv, D, dtype=torch.bfloat16, seed=D + len(lens))
    q, k, v, do, cu = (x.cuda() for x in (q, k, v, do, cu))
    got = run_grads(varlen_attention, q, k, v, do, cu, max(lens))
    same = run_grads_by_kv_head(
        lambda q, k, v, cu, m: _reference_impl(q, k, v, cu, None, True, None, None, torch.bfloat16),
        q, k, v, do, cu, max(lens),
    )  # fmt: skip
    exact = run_grads_by_kv_head(varlen_attention_reference, *(x.float() for x in (q, k, v, do)), cu, max(lens))
    for tag, a, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact, strict=True):
        bound = dtype_error_bound(s, e, atol=1e-3 * max(1.0, e.abs().max().item()))
        assert_close_verbose(a, e, atol=bound, name=f"gpu D={D} {lens}:{tag}")


@pytest.mark.gpu
@pytest.mark.gpu_exclusive  # about 45 GB: the card to itself
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_past_2_31_elements(deterministic: bool) -> None:
    """A pack whose q, k, v, dout and gradients run past 2**31 elements (64 heads of 128 over 268,288 tokens): the
    examples lying wholly past that offset match the reference run on them alone, so no index wrapped."""
    lens = [2048] * 128 + [1000, 3000, 2144]
    T, H, D = sum(lens), 64, 128
    tail = slice(T - sum(lens[-3:]), T)
    assert tail.start * H * D >= 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    alone = [x[tail].float() for x in (q, k, v, do)]  # copies taken before the kernels run
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))  # no copies: 8 tensors of 4.4 GB and the fp32 dQ buffer
    fwd, bwd = default_configs(D, q.dtype, max(lens), 1, T / len(lens), gpu=torch.cuda.get_device_name())
    bwd = bwd._replace(dq_atomic=not deterministic)  # the tables choose the deterministic pair: ask for each
    out = varlen_attention_with_configs(q, k, v, make_cu(lens).cuda(), max(lens), fwd_cfg=fwd, bwd_cfg=bwd)
    got = [x[tail].clone() for x in (out.detach(), *torch.autograd.grad(out, (q, k, v), do))]
    del q, k, v, do, out  # the reference's fp32 scores get the memory
    want = run_grads(varlen_attention_reference, *alone, make_cu(lens[-3:]).cuda(), max(lens))
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_verbose(a, e, atol=2e-2 * max(1.0, e.abs().max().item()), name=f"past 2**31:{tag}")


def torch_varlen_causal(q, k, v, cu, max_seqlen):
    """Causal ``torch.nn.attention.varlen.varlen_attn`` across torch versions (2.10: is_causal; later: window_size).

    GQA: ``enable_gqa=True`` where the signature has it, otherwise k/v are repeated (outside any timing that
    matters: the caller decides). Raises ImportError when this torch has no varlen_attn.
    """
    import inspect

    from torch.nn.attention import varlen  # ImportError on torch without it

    params = inspect.signature(varlen.varlen_attn).parameters
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen.varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kw)


@pytest.mark.gpu
def test_gpu_against_torch_varlen_attn() -> None:
    pytest.importorskip("torch.nn.attention.varlen")
    lens = _alpaca_lens(8192, 3)
    T, H, Hkv, D = sum(lens), 16, 4, 128
    q, k, v, do = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv, H))
    cu = make_cu(lens).cuda()
    ours = run_grads(varlen_attention, q, k, v, do, cu, max(lens))
    theirs = run_grads(torch_varlen_causal, q, k, v, do, cu, max(lens))
    for tag, a, e in zip(("out", "dq", "dk", "dv"), ours, theirs, strict=True):
        assert_close_verbose(a, e, atol=2e-2 * max(1.0, e.abs().max().item()), name=f"vs varlen_attn:{tag}")


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_cuda_graph_replay_with_new_data(deterministic: bool) -> None:
    """fwd+bwd captures in a CUDA graph (no host sync, nothing host-side baked in): replayed on new q/k/v/dout and
    new example boundaries (same counts, written in place), it matches eager calls on those inputs."""
    lens = [*_alpaca_lens(2048, 7), 0, 0]  # zero-length examples at the end: repeated cu_seqlens entries
    T, H, Hkv, D = sum(lens), 16, 4, 128
    q, k, v, do = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv, H))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    cu = make_cu(lens).cuda()

    def step():
        out = varlen_attention(q, k, v, cu, 1024, deterministic=deterministic)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    lens2 = [0, *lens[::-1][2:], 0]  # same T and S, other boundaries (zero-length first and last)
    with torch.no_grad():
        for x in (q, k, v, do):
            x.copy_(torch.randn_like(x))
        cu.copy_(make_cu(lens2).cuda())
    graph.replay()
    eager = run_grads(varlen_attention, q, k, v, do, cu, 1024, deterministic=deterministic)
    for tag, a, e in zip(("out", "dq", "dk", "dv"), static, eager, strict=True):
        if deterministic or tag != "dq":
            assert torch.equal(a, e), f"graph replay {tag} differs from eager"
        else:
            assert_close_verbose(a, e, atol=1e-2 * max(1.0, e.abs().max().item()), name=f"graph:{tag}")


def test_mean_seqlen_hint_keeps_the_tiling_of_the_unpadded_stream() -> None:
    # Two 300-token examples: "medium" tiles. Padded with zero-length examples (as a CUDA-graph batch is) the
    # stream's T / S is 100 tokens ("short" tiles); the hint restores the data's own tiling, so the padded call
    # runs exactly the unpadded call's tiles and gives bitwise the same output and gradients.
    lens = [300, 300]
    assert length_bucket(sum(lens) / 6) == "short" and length_bucket(300) == "medium"
    q, k, v, do, cu = make_inputs(lens, 2, 1, 64, seed=41)
    padded_cu = torch.cat([cu, cu[-1:].repeat(4)])
    plain = run_grads(varlen_attention, q, k, v, do, cu, 300, deterministic=True)
    hinted = run_grads(varlen_attention, q, k, v, do, padded_cu, 300, deterministic=True, mean_seqlen=300.0)
    for a, b in zip(plain, hinted):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"mean_seqlen=0\.0 must be None or > 0"):
        varlen_attention(q, k, v, cu, 300, mean_seqlen=0.0)


# ------------------------------------------------------------------- saved forward (selective recomputation)
def test_saved_forward_gives_the_same_output_and_gradients_without_a_forward_launch(monkeypatch) -> None:
    """``return_lse`` then ``saved=(out, lse)``: no forward kernel runs, the output is the kept tensor, and the
    backward's dq, dk, dv are bitwise those of the plain call; lse equals the reference's (log2 domain)."""
    lens, kw = [5, 23, 1, 9], {"window": 9, "softcap": 3.0}
    q, k, v, do, cu = make_inputs(lens, 4, 2, 16, seed=11)
    cfgs = {"fwd_cfg": SMALL_FWD, "bwd_cfg": SMALL_BWD}
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out, lse = varlen_attention_with_configs(q, k, v, cu, max(lens), return_lse=True, **cfgs, **kw)
    assert not lse.requires_grad and lse.shape == (sum(lens), 4) and lse.dtype == torch.float32
    plain = torch.autograd.grad(out, (q, k, v), do)
    launches = []
    real_fwd = attention_mod.flash_fwd
    monkeypatch.setattr(attention_mod, "flash_fwd", lambda *a, **kw: launches.append(1) or real_fwd(*a, **kw))
    again = varlen_attention_with_configs(q, k, v, cu, max(lens), saved=(out.detach(), lse), **cfgs, **kw)
    assert launches == [] and again.data_ptr() == out.data_ptr()
    for tag, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(again, (q, k, v), do), plain, strict=True):
        assert torch.equal(a, b), tag
    # The same pair in other layouts (lse transposed in memory, out with a strided head dim) gives the same gradients.
    strided = (out.detach().transpose(1, 2).contiguous().transpose(1, 2), lse.t().contiguous().t())
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    again = varlen_attention_with_configs(q, k, v, cu, max(lens), saved=strided, **cfgs, **kw)
    for tag, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(again, (q, k, v), do), plain, strict=True):
        assert torch.equal(a, b), f"strided saved pair: {tag}"
    ref_out, ref_lse = varlen_attention_reference(q, k, v, cu, max(lens), return_lse=True, **kw)
    assert_close_verbose(out, ref_out, atol=2e-5, name="out")
    assert_close_verbose(lse, ref_lse, atol=2e-5, name="lse")


@pytest.mark.parametrize("kw", [{}, {"window": 4, "softcap": 2.0}, {"causal": False}], ids=["causal", "wsc", "full"])
def test_reference_backward_from_lse_equals_autograd_of_the_reference(kw: dict) -> None:
    """The reference's flash-style backward (from out and lse, no forward rerun) against autograd through the
    plain reference, in fp64 with GQA and an empty example; ``saved`` reruns no forward."""
    lens = [6, 0, 13, 1]
    q, k, v, do, cu = make_inputs(lens, 4, 2, 8, dtype=torch.float64, seed=5)
    want = run_grads(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out, lse = varlen_attention_reference(q, k, v, cu, max(lens), return_lse=True, **kw)
    got = (out, *torch.autograd.grad(out, (q, k, v), do))
    again = varlen_attention_reference(q, k, v, cu, max(lens), saved=(out.detach(), lse), **kw)
    assert again.data_ptr() == out.data_ptr()
    for tag, a, e in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        # lse is fp32 whatever the inputs (as the kernel's): about 1e-7 relative
        assert_close_verbose(a, e, atol=1e-6 * max(1.0, e.abs().max().item()), name=tag)
    for tag, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(again, (q, k, v), do), got[1:], strict=True):
        assert torch.equal(a, b), tag


@pytest.mark.parametrize("fn", [varlen_attention, varlen_attention_reference], ids=["triton", "reference"])
def test_bad_saved_pair_raises(fn) -> None:
    q, k, v, _, cu = make_inputs([4, 4], 2, 1, 16)
    lse = torch.zeros(8, 2)
    with pytest.raises(ValueError, match=r"saved must be the \(out, lse\) pair"):
        fn(q, k, v, cu, 4, saved=q)
    with pytest.raises(ValueError, match=r"saved \(out, lse\) must be \(\(8, 2, 16\) torch.float32, \(8, 2\) torch"):
        fn(q, k, v, cu, 4, saved=(q, lse.double()))
    with pytest.raises(ValueError, match=r"got \(\(8, 1, 16\) torch.float32"):
        fn(q, k, v, cu, 4, saved=(k, lse))
