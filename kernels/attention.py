"""Varlen causal attention over a packed stream: examples packed back to back never see each other.

Shape legend: T packed tokens, S examples, H query heads, Hkv key/value heads (H % Hkv == 0), D head dim.
``cu_seqlens`` (S+1,) int32 holds example boundaries; example s owns tokens ``cu_seqlens[s]:cu_seqlens[s+1]``.

The mask is block-diagonal causal and never materialised: cost is sum(l_s^2), not T^2. The Triton kernels and
their launchers live in ``attention_fwd`` / ``attention_bwd``; this file holds the tiling choice (built-in tiles
and the tuned table), the autograd.Function, the public functions and the plain-PyTorch reference.

Measured on an H200 (bf16, CUDA-graph device time, tuned tiles): at D 128, 421 / 384 TFLOP/s forward / forward +
backward on 4K-token examples, and 1.90x / 1.80x FlexAttention's speed on Alpaca-like examples in 16K packs; ahead
of PyTorch's ``varlen_attn`` and FlexAttention in every packed case at D 64, 128 and 256.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch

from .attention_bwd import BwdConfig, flash_bwd
from .attention_fwd import LOG2E, FwdConfig, build_schedules, flash_fwd
from .indexing import INT32_MAX, needs_long_indexing

__all__ = [
    "BUCKETS",
    "TUNED_FIELDS",
    "TUNED_PATH",
    "BwdConfig",
    "FwdConfig",
    "TunedCase",
    "default_configs",
    "length_bucket",
    "load_tuned",
    "parse_tuned",
    "varlen_attention",
    "varlen_attention_reference",
    "varlen_attention_with_configs",
]

# Length buckets for the tiling: short (Alpaca-like, mean <= 256 tokens), medium (<= 2048), long (<= 8192) and
# xlong (longer, up to one 1M-token example per pack; at 64K the dK/dV loop over query blocks is already 16x its 4K
# length).
SHORT, MEDIUM, LONG = 256, 2048, 8192
# The largest block (query rows or keys) a tile may have: the tuned table's limit, and the key-block size
# _kernel_layout lays inputs out for. Some offsets stay int32 even on the long path: head index x head stride, the
# head-dim index, and key row x token stride inside the K/V blocks that the forward and dQ kernels step through (the
# long path widens the token offsets of q, out, dout, dq, lse and of the dK/dV kernel's rows).
_MAX_BLOCK = 256
BUCKETS = ("short", "medium", "long", "xlong")
# A bucket with no tuned entry of a kind takes the tuned entry of the bucket named here (else the built-in tiles).
BUCKET_FALLBACK = {"xlong": "long"}
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal, window, softcap
) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (T, H, D) / (T, Hkv, D); got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}. Flatten the batch into the packed token axis first."
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"k and v must be (T, Hkv, D) matching q (T, H, D)={tuple(q.shape)}; got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}."
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"H={q.shape[1]} query heads is not a multiple of Hkv={k.shape[1]} key/value heads; GQA needs H % Hkv == 0."
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor (S+1,); got dtype {cu_seqlens.dtype}, shape "
            f"{tuple(cu_seqlens.shape)}. Use cu_seqlens.to(torch.int32)."
        )
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be None or a positive int (Hugging Face sliding_window).")
    if window is not None and not causal:
        raise ValueError(f"window={window} needs causal=True (Hugging Face sliding_window is causal).")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be None or > 0 (Gemma 2 attn_logit_softcapping).")


# ------------------------------------------------------------------------------------------- launch configuration
def _pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while n % (2 * p) == 0 and 2 * p <= cap:
        p *= 2
    return p


def length_bucket(length: float) -> str:
    """'short' (Alpaca-like, mean <= 256 tokens), 'medium' (<= 2048), 'long' (<= 8192) or 'xlong': the key of
    the tiling table."""
    if length <= SHORT:
        return "short"
    return "medium" if length <= MEDIUM else "long" if length <= LONG else "xlong"


def _builtin_configs(head_dim: int, bucket: str, group: int) -> dict[str, tuple]:
    """Hand-picked Hopper tilings per kind (used where kernels/attention_tuned.json has no entry).

    Why these: the dK/dV kernel's dots have M = its key block, and Hopper's wgmma needs M >= 64 per warpgroup
    (M = 32 falls back to mma.sync at about half the rate), so key blocks are 64 (one warpgroup) or 128 (two).
    The atomic-dQ kernel keeps 5 matmuls per step instead of the deterministic pair's 7.
    """
    big = head_dim > 128
    short, medium = bucket == "short", bucket == "medium"
    rows = 64 if big else 128
    hpb = _pow2_divisor(group, 8 if short else 4)
    fwd_n = 32 if short else (32 if big else 64 if medium else 128)
    fwd = (max(16, rows // hpb), hpb, fwd_n, 4 if short else 8, 2 if big else 3)
    bhpb = _pow2_divisor(group, 4 if short else 2)
    if big:  # D 256: fp32 dK/dV accumulators of 64 keys would not fit the registers beside the tiles
        kv = (32, max(16, 32 // bhpb), bhpb, 8, 2)
        dq = (max(16, 32 // bhpb), bhpb, 32, 8, 2)
        at = kv
    elif short:  # 64 keys x (16 tokens x 4 heads): one warpgroup, causal waste at 16-token granularity
        kv = at = (64, max(16, 64 // bhpb), bhpb, 4, 2)
        dq = (max(16, 64 // bhpb), bhpb, 32, 4, 2)
    else:  # 128 keys x 64 rows, 8 warps (FlexAttention's Hopper backward tiles); dQ: 128 rows x 64 keys
        kv = at = (128, max(16, 64 // bhpb), bhpb, 8, 3)
        dq = (max(16, 128 // bhpb), bhpb, 64, 8, 3)
    return {"fwd": fwd, "bwd_kv": kv, "bwd_dq": dq, "bwd_atomic": at}


TUNED_PATH = Path(__file__).with_name("attention_tuned.json")
TUNED_VERSION = 2
# kind -> the config fields it sets (FwdConfig for "fwd"; the dK/dV or dQ half of BwdConfig otherwise).
TUNED_FIELDS = {
    "fwd": ("block_m", "hpb", "block_n", "num_warps", "num_stages"),
    "bwd_kv": ("kv_block_n", "kv_block_m", "kv_hpb", "kv_warps", "kv_stages"),
    "bwd_dq": ("q_block_m", "q_hpb", "q_block_n", "q_warps", "q_stages"),
    "bwd_atomic": ("kv_block_n", "kv_block_m", "kv_hpb", "kv_warps", "kv_stages"),
}
BACKWARDS = ("atomic", "deterministic")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


class TunedCase(NamedTuple):
    """The tuned tiles of one (D, dtype, bucket) on one GPU, and the backward its sweep measured faster."""

    tiles: dict[str, tuple[int, ...]]  # kind -> config tuple in TUNED_FIELDS order (any subset of the kinds)
    backward: str | None  # "atomic" | "deterministic" | None (not measured: fall back)


def _fail(source: str, where: str, message: str) -> ValueError:
    return ValueError(
        f"{source}: {where}: {message}. Re-run `python tools/bench_attention.py --sweep --write-tuned`, or delete "
        "the file to use the built-in tilings."
    )


def _parse_tiles(source: str, where: str, tiles: object) -> dict[str, tuple[int, ...]]:
    if not isinstance(tiles, dict) or set(tiles) - set(TUNED_FIELDS):
        raise _fail(source, where, f"tiles={tiles!r}: expected an object with keys among {list(TUNED_FIELDS)}")
    out = {}
    for kind, cfg in tiles.items():
        fields = TUNED_FIELDS[kind]
        if not isinstance(cfg, dict) or set(cfg) != set(fields):
            raise _fail(source, where, f"tiles.{kind}={cfg!r}: expected exactly the fields {list(fields)}")
        for f in fields:
            x = cfg[f]
            if not isinstance(x, int) or isinstance(x, bool):
                raise _fail(source, where, f"tiles.{kind}.{f}={x!r}: expected an int")
            if f.endswith("stages"):
                if not 1 <= x <= 8:
                    raise _fail(source, where, f"tiles.{kind}.{f}={x}: expected 1..8")
            elif x < 1 or x & (x - 1) or (f.endswith("warps") and x > 16):
                raise _fail(source, where, f"tiles.{kind}.{f}={x}: expected a power of two (warps <= 16)")
            if f.endswith(("block_m", "block_n")) and not 16 <= x <= _MAX_BLOCK:
                limit = f"block sizes must be 16..{_MAX_BLOCK} (tl.dot needs >= 16)"
                raise _fail(source, where, f"tiles.{kind}.{f}={x}: {limit}")
        out[kind] = tuple(cfg[f] for f in fields)
    return out


def parse_tuned(data: object, source: str = "attention tuned table") -> dict[str, dict[tuple, TunedCase]]:
    """Validate a tuned-tiling document and return {gpu name: {(D, dtype name, bucket): TunedCase}}.

    Format (version 2): ``{"version": 2, "tables": [{"gpu": <torch.cuda.get_device_name()>, "torch": ...,
    "triton": ..., "date": ..., "cases": [{"D": 128, "dtype": "bf16", "bucket": "long", "backward":
    "deterministic", "tiles": {"bwd_kv": {...}, ...}, "note": "..."}]}]}``. A table is honoured only on the GPU
    it was measured on. ``backward`` is the sweep's choice, made when the table was written from its measured
    times; notes are free text and never read. Raises ValueError naming the first problem.
    """
    if not isinstance(data, dict) or data.get("version") != TUNED_VERSION or not isinstance(data.get("tables"), list):
        got = f"keys {sorted(data)}, version {data.get('version')!r}" if isinstance(data, dict) else type(data).__name__
        raise _fail(source, "top level", f"expected {{'version': {TUNED_VERSION}, 'tables': [...]}}; got {got}")
    tables: dict[str, dict[tuple, TunedCase]] = {}
    for t, table in enumerate(data["tables"]):
        where = f"tables[{t}]"
        if not isinstance(table, dict) or not isinstance(table.get("gpu"), str) or not table["gpu"]:
            raise _fail(source, where, "expected an object with a non-empty 'gpu' name and 'cases'")
        if set(table) - {"gpu", "torch", "triton", "date", "cases"} or not isinstance(table.get("cases"), list):
            raise _fail(source, where, f"keys {sorted(table)}: expected gpu, torch, triton, date, cases (a list)")
        if table["gpu"] in tables:
            raise _fail(source, where, f"a second table for {table['gpu']!r}")
        cases: dict[tuple, TunedCase] = {}
        for i, case in enumerate(table["cases"]):
            at = f"{where}.cases[{i}]"
            if not isinstance(case, dict) or set(case) - {"D", "dtype", "bucket", "backward", "tiles", "note"}:
                raise _fail(source, at, "expected an object with keys D, dtype, bucket, tiles (backward, note)")
            if not isinstance(case.get("D"), int) or case.get("dtype") not in DTYPE_NAMES.values():
                raise _fail(source, at, f"D={case.get('D')!r} dtype={case.get('dtype')!r}: expected an int and one "
                                        f"of {list(DTYPE_NAMES.values())}")  # fmt: skip
            if case.get("bucket") not in BUCKETS:
                raise _fail(source, at, f"bucket={case.get('bucket')!r}: expected one of {list(BUCKETS)}")
            backward = case.get("backward")
            if backward is not None and backward not in BACKWARDS:
                raise _fail(source, at, f"backward={backward!r}: expected one of {list(BACKWARDS)}")
            key = (case["D"], case["dtype"], case["bucket"])
            if key in cases:
                raise _fail(source, at, f"a second case for D={key[0]} {key[1]} {key[2]}")
            cases[key] = TunedCase(_parse_tiles(source, at, case.get("tiles", {})), backward)
        tables[table["gpu"]] = cases
    return tables


@functools.lru_cache(maxsize=4)
def load_tuned(path: Path) -> dict[str, dict[tuple, TunedCase]]:
    """:func:`parse_tuned` of a JSON file; {} without the file."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise _fail(str(path), "file", f"not valid JSON ({err})") from err
    return parse_tuned(data, str(path))


def _fit_group(cfg: tuple, kind: str, group: int) -> tuple:
    """Keep a tuned tile's rows (tokens x heads) when this model's GQA group is not a multiple of its heads."""
    fields = TUNED_FIELDS[kind]
    ih = next(i for i, f in enumerate(fields) if f.endswith("hpb"))
    im = next(i for i, f in enumerate(fields) if f.endswith("block_m"))
    hpb = _pow2_divisor(group, cfg[ih])
    if hpb == cfg[ih]:
        return cfg
    out = list(cfg)
    out[im], out[ih] = cfg[im] * cfg[ih] // hpb, hpb
    return tuple(out)


def default_configs(
    head_dim: int,
    dtype: torch.dtype,
    max_seqlen: int,
    group: int,
    mean_seqlen: float | None = None,
    deterministic: bool = False,
    gpu: str | None = None,
) -> tuple[FwdConfig, BwdConfig]:
    """The tiling per (D, dtype, length bucket): the tuned table of ``gpu`` (``torch.cuda.get_device_name()``) in
    kernels/attention_tuned.json where it has an entry, else the built-in Hopper tiles; None: built-in only.

    The bucket follows the mean example length T / S when given (known without a device sync): an Alpaca pack
    has max_seqlen ~1000 but a mean ~130, and it is the mean that decides how much of a big tile is masked.
    Rows of a tile are (query token, head) pairs of one GQA group (HPB heads), so short examples still give the
    tensor cores 64-128 rows while causal waste stays at 16-32-token granularity. ``deterministic`` forces the
    atomic-free backward; otherwise the backward is the table's choice for the case (the deterministic pair
    without one). Cached per (table path, GPU, D, dtype, bucket, group, deterministic): a call costs one lookup.
    """
    length = min(max_seqlen, mean_seqlen) if mean_seqlen is not None else max_seqlen
    return _configs_for(TUNED_PATH, gpu, head_dim, dtype, length_bucket(length), group, deterministic)


@functools.lru_cache(maxsize=256)
def _configs_for(
    path: Path, gpu: str | None, head_dim: int, dtype: torch.dtype, bucket: str, group: int, deterministic: bool
) -> tuple[FwdConfig, BwdConfig]:
    cfgs = _builtin_configs(head_dim, bucket, group)
    cases = load_tuned(path).get(gpu, {}) if gpu is not None else {}
    name = DTYPE_NAMES.get(dtype, "bf16")
    # The bucket's own case, then its fallback's (xlong -> long); fp16 shares bf16's tiles (same MMA shapes and
    # byte sizes).
    found = [
        case
        for b in (bucket, BUCKET_FALLBACK.get(bucket))
        if b
        for dt in dict.fromkeys((name, "bf16" if name == "fp16" else name))
        if (case := cases.get((head_dim, dt, b))) is not None
    ]
    for kind in cfgs:
        hit = next((c.tiles[kind] for c in found if kind in c.tiles), None)
        if hit is not None:
            cfgs[kind] = _fit_group(hit, kind, group)
    # Without a measured choice, the deterministic pair: it beat the atomic kernel in every case swept so far (each
    # H200 bucket at D 128 and 256, 1.3-1.6x; the H100's one long sequence at D 128, 1.2x).
    backward = next((c.backward for c in found if c.backward is not None), "deterministic")
    atomic = not deterministic and backward == "atomic"
    kv = cfgs["bwd_atomic"] if atomic else cfgs["bwd_kv"]
    return FwdConfig(*cfgs["fwd"]), BwdConfig(*kv, *cfgs["bwd_dq"], dq_atomic=atomic)


@functools.lru_cache(maxsize=16)
def _gpu_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


# ------------------------------------------------------------------------------------------- host launchers
def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` (T, heads, D) as the kernels take it: unit stride along D, and head and in-tile offsets that fit int32.
    Any other layout (e.g. a head-major view of a 1M-token tensor, whose head stride times heads passes 2**31) is
    copied token-major first."""
    if x.stride(-1) != 1:
        return x.contiguous()
    span = (x.shape[1] - 1) * x.stride(1) + x.shape[2] - 1 + (_MAX_BLOCK - 1) * x.stride(0)
    return x if span <= INT32_MAX else x.contiguous()


def _check_tile_rows(fwd_cfg: FwdConfig, bwd_cfg: BwdConfig) -> None:
    """Key blocks of at most ``_MAX_BLOCK`` keys, as :func:`_kernel_layout` assumes (the tuned table's limit)."""
    for name, keys in (("fwd_cfg.block_n", fwd_cfg.block_n), ("bwd_cfg.q_block_n", bwd_cfg.q_block_n)):
        if keys > _MAX_BLOCK:
            raise ValueError(f"{name}={keys}: key blocks of more than {_MAX_BLOCK} keys are not supported.")


def _schedule_blocks(fwd_cfg: FwdConfig, bwd_cfg: BwdConfig | None) -> tuple[tuple[int, ...], int, int]:
    """Distinct block sizes to schedule (forward first) and the indices of the dK/dV and dQ schedules among them."""
    blocks = [fwd_cfg.block_m]
    if bwd_cfg is None:
        return tuple(blocks), 0, 0
    wanted = [bwd_cfg.kv_block_n] + ([] if bwd_cfg.dq_atomic else [bwd_cfg.q_block_m])
    for b in wanted:
        if b not in blocks:
            blocks.append(b)
    i_q = blocks.index(bwd_cfg.q_block_m) if not bwd_cfg.dq_atomic else 0
    return tuple(blocks), blocks.index(bwd_cfg.kv_block_n), i_q


def _forward(q, k, v, cu_seqlens, softmax_scale, causal, window, softcap, fwd_cfg, bwd_cfg, saved=None):
    """The forward launches: (out, lse, the dK/dV and dQ schedules or None, long_idx). ``bwd_cfg`` None: forward
    only (no backward schedules). ``saved``: (out, lse) of an earlier forward of the same q, k, v, used instead of
    the forward kernel (only the schedules are built)."""
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    # One launch builds every schedule this call needs (forward, dK/dV, dQ); the backward reuses them.
    blocks, i_kv, i_q = _schedule_blocks(fwd_cfg, bwd_cfg)
    scheds = build_schedules(cu_seqlens, q.shape[0], blocks)
    # int64 offsets if any tensor of the pass needs them (dQ's fp32 buffer has q's element count; a saved out is
    # read in place of the forward's).
    long_idx = needs_long_indexing(q, k, v, None if saved is None else saved[0])
    if saved is None:
        out, lse = flash_fwd(q, k, v, cu_seqlens, scheds[0], softmax_scale, causal, window, softcap, fwd_cfg, long_idx)
    else:
        out, lse = saved
    return (q, k, v), out, lse, (scheds[i_kv], scheds[i_q]), long_idx


def _check_saved(q: torch.Tensor, saved: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """``saved`` must be (out (T, H, D) of q's dtype, lse (T, H) fp32) on q's device, as a forward returned them."""
    if saved is None:
        return
    if not (isinstance(saved, tuple) and len(saved) == 2):
        raise ValueError(f"saved must be the (out, lse) pair of an earlier forward; got {type(saved).__name__}.")
    out, lse = saved
    T, H, _ = q.shape
    if out.shape != q.shape or out.dtype != q.dtype or lse.shape != (T, H) or lse.dtype != torch.float32:
        raise ValueError(
            f"saved (out, lse) must be ({tuple(q.shape)} {q.dtype}, ({T}, {H}) torch.float32) for q of shape "
            f"{tuple(q.shape)}; got ({tuple(out.shape)} {out.dtype}, {tuple(lse.shape)} {lse.dtype}). Pass the pair "
            "that return_lse=True returned for these q, k, v."
        )
    if out.device != q.device or lse.device != q.device:
        raise ValueError(f"saved (out, lse) must be on q's device {q.device}; got {out.device}, {lse.device}.")


# ------------------------------------------------------------------------------------------ autograd.Function
class _VarlenAttention(torch.autograd.Function):
    """(out, lse) of q, k, v; ``saved_out``/``saved_lse`` (both or neither): an earlier forward's, returned without
    running the forward kernel. lse is not differentiable."""

    @staticmethod
    def forward(
        ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap, fwd_cfg, bwd_cfg, saved_out,
        saved_lse,
    ):  # fmt: skip
        saved = None if saved_out is None else (saved_out, saved_lse)
        (q, k, v), out, lse, (sched_kv, sched_q), long_idx = _forward(
            q, k, v, cu_seqlens, softmax_scale, causal, window, softcap, fwd_cfg, bwd_cfg, saved
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, sched_kv, sched_q)
        ctx.args = (softmax_scale, causal, window, softcap, bwd_cfg, long_idx)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens, sched_kv, sched_q = ctx.saved_tensors
        softmax_scale, causal, window, softcap, bwd_cfg, long_idx = ctx.args
        dout = _kernel_layout(dout)
        # A contiguous dout has q's element count, judged in the forward; only a strided one needs a look.
        if not long_idx and not dout.is_contiguous():
            long_idx = needs_long_indexing(dout)
        dq, dk, dv = flash_bwd(
            dout, q, k, v, out, lse, cu_seqlens, sched_kv, sched_q,
            softmax_scale, causal, window, softcap, bwd_cfg, long_indexing=long_idx,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ public API
def varlen_attention_with_configs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    deterministic: bool = False,
    *,
    fwd_cfg: FwdConfig | None = None,
    bwd_cfg: BwdConfig | None = None,
    mean_seqlen: float | None = None,
    return_lse: bool = False,
    saved: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``varlen_attention`` with explicit tilings (tests and the benchmark sweep); None picks the defaults.

    An explicit ``bwd_cfg`` decides the backward path by its ``dq_atomic``; ``deterministic=True`` always turns
    atomics off.
    """
    _check_args(q, k, v, cu_seqlens, causal, window, softcap)
    _check_saved(q, saved)
    if window is not None and window >= q.shape[0]:
        # A window of at least the pack's length hides no key: plain causal, whose kernels skip the window's
        # range arithmetic (int32 in the kernels, where a sentinel such as 2**31 - 1 would wrap).
        window = None
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}: expected one of {SUPPORTED_DTYPES}, all the same; cast "
            "the inputs (use varlen_attention_reference for float64)."
        )
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"q, k, v, cu_seqlens must share a device; got {q.device}, {k.device}, {v.device}, "
                         f"{cu_seqlens.device}.")  # fmt: skip
    if q.shape[2] > 256:
        raise ValueError(f"head dim D={q.shape[2]} is not supported; expected D <= 256.")
    group = q.shape[1] // k.shape[1]
    if mean_seqlen is not None and not mean_seqlen > 0:
        raise ValueError(f"mean_seqlen={mean_seqlen!r} must be None or > 0 (real tokens / real examples).")
    # The tile bucket follows the mean example length: the caller's when given (a stream padded with filler and
    # zero-length examples for a CUDA graph has a smaller T / S than its data), else T / S from shapes (no sync).
    mean_len = mean_seqlen if mean_seqlen is not None else q.shape[0] / max(cu_seqlens.numel() - 1, 1)
    gpu = (
        _gpu_name(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else None
    )
    d_fwd, d_bwd = default_configs(q.shape[2], q.dtype, max_seqlen, group, mean_len, deterministic, gpu)
    bwd_cfg = bwd_cfg or d_bwd
    if deterministic and bwd_cfg.dq_atomic:
        bwd_cfg = bwd_cfg._replace(dq_atomic=False)
    fwd_cfg = fwd_cfg or d_fwd
    _check_tile_rows(fwd_cfg, bwd_cfg)
    scale = float(softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2]))
    causal, softcap = bool(causal), None if softcap is None else float(softcap)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # No backward will run: schedule the forward's blocks only, save nothing, and skip autograd.Function.apply
        # (about a fifth of the call's Python in a CPU profile with the launches stubbed out; an Alpaca-like 4K
        # pack's forward is only ~60 us of GPU work, so the host path matters for eager callers).
        if saved is not None:
            return saved if return_lse else saved[0]
        _, out, lse, _, _ = _forward(q, k, v, cu_seqlens, scale, causal, window, softcap, fwd_cfg, None)
        return (out, lse) if return_lse else out
    saved_out, saved_lse = saved if saved is not None else (None, None)
    if saved is not None:  # the kernels index out by its token and head strides only, and lse as a dense (T, H)
        saved_out, saved_lse = _kernel_layout(saved_out), saved_lse.contiguous()
    out, lse = _VarlenAttention.apply(
        q, k, v, cu_seqlens, int(max_seqlen), scale, causal, window, softcap, fwd_cfg, bwd_cfg, saved_out, saved_lse
    )  # fmt: skip
    return (out, lse) if return_lse else out


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    deterministic: bool = False,
    *,
    mean_seqlen: float | None = None,
    return_lse: bool = False,
    saved: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention over a packed stream (Triton forward and backward, no T x T tensor anywhere).

    q (T, H, D), k/v (T, Hkv, D) with H % Hkv == 0 (GQA without repeating k/v), ``cu_seqlens`` int32 (S+1,),
    ``max_seqlen`` >= the longest example (a Python int from the shard: no device sync). ``window=W``: token i
    sees keys i-W < j <= i (Hugging Face ``sliding_window``); ``softcap``: Gemma 2 logit capping. bf16/fp16 (and
    fp32) with fp32 accumulation; D <= 256 (64, 80, 96, 128, 256 tuned).

    ``deterministic=False`` (default): the backward the tuned table chose for this GPU, D and length bucket: dQ
    summed with fp32 atomics inside the dK/dV kernel (5 matmuls per tile instead of 7; dq may differ in the last
    bits from run to run, dk and dv never do), or the deterministic pair (the choice of every case in the shipped
    table, and the default without a table entry). ``deterministic=True``: always the pair, a dQ kernel that
    recomputes the scores (and delta) then the dK/dV kernel; dq, dk, dv are bitwise reproducible.
    ``mean_seqlen``: the real mean example length, which picks the tiling when the stream holds filler or
    zero-length examples (None: T / S).

    ``return_lse=True``: returns (out, lse), lse (T, H) fp32 in the log2 domain (not differentiable).
    ``saved=(out, lse)``: the pair an earlier call returned for the same q, k, v; the forward kernel does not run
    (only the tile schedules are built) and the backward uses them. Activation checkpointing passes it in its
    recompute, so that the backward never runs the attention forward twice.
    """
    return varlen_attention_with_configs(
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, window, softcap, deterministic,
        mean_seqlen=mean_seqlen, return_lse=return_lse, saved=saved,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ reference
def _reference_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None,
    causal: bool,
    window: int | None,
    softcap: float | None,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """Per-example attention in ``compute_dtype`` (tests use the input dtype to measure PyTorch's own error)."""
    T, H, D = q.shape
    group = H // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bounds = cu_seqlens.tolist()  # host sync: fine in the reference
    outs = []
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        n = b - a
        if n == 0:
            continue
        qs = q[a:b].to(compute_dtype).transpose(0, 1)  # (H, n, D)
        ks = k[a:b].to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[a:b].to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        scores, _ = _example_scores(qs, ks, scale, causal, window, softcap)  # (H, n, n)
        p = torch.softmax(scores, dim=-1)
        outs.append((p @ vs).transpose(0, 1))
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={T}; got {bounds[0]} .. {bounds[-1]}.")
    return torch.cat(outs, dim=0).to(q.dtype) if outs else q.new_zeros(q.shape)


def _example_scores(
    qs: torch.Tensor, ks: torch.Tensor, scale: float, causal: bool, window: int | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H, n, n) masked scores of one example (-inf where masked) and, with a softcap, tanh(raw / softcap)."""
    n = qs.shape[1]
    raw = (qs @ ks.transpose(1, 2)) * scale
    capped = torch.tanh(raw / softcap) if softcap is not None else None
    scores = softcap * capped if softcap is not None else raw
    i = torch.arange(n, device=qs.device)[:, None]
    j = torch.arange(n, device=qs.device)[None, :]
    keep = torch.ones(n, n, dtype=torch.bool, device=qs.device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
    return scores.masked_fill(~keep, float("-inf")), capped


def _example_ranges(cu_seqlens: torch.Tensor, n_tokens: int) -> list[tuple[int, int]]:
    """(start, end) token range of every non-empty example."""
    bounds = cu_seqlens.tolist()  # host sync: fine in the reference
    if bounds[0] != 0 or bounds[-1] != n_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={n_tokens}; got {bounds[0]} .. {bounds[-1]}.")
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _heads(x: torch.Tensor, group: int, compute: torch.dtype) -> torch.Tensor:
    """(n, Hx, D) -> (Hx * group, n, D) in ``compute``: k/v repeated over each GQA group (group 1: q as is)."""
    return x.to(compute).repeat_interleave(group, dim=1).transpose(0, 1)


def _reference_with_lse(q, k, v, cu_seqlens, scale, causal, window, softcap) -> tuple[torch.Tensor, torch.Tensor]:
    """(out q.dtype, lse (T, H) fp32 in the kernel's log2 domain), computed in fp32 (fp64 for fp64 inputs)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    for a, b in _example_ranges(cu_seqlens, q.shape[0]):
        qs, ks, vs = _heads(q[a:b], 1, compute), _heads(k[a:b], group, compute), _heads(v[a:b], group, compute)
        scores, _ = _example_scores(qs, ks, scale, causal, window, softcap)
        row_lse = torch.logsumexp(scores, dim=-1)  # (H, n)
        out[a:b] = (torch.exp(scores - row_lse[..., None]) @ vs).transpose(0, 1).to(q.dtype)
        lse[a:b] = (row_lse * LOG2E).transpose(0, 1).float()
    return out, lse


def _reference_backward(dout, q, k, v, out, lse, cu_seqlens, scale, causal, window, softcap):
    """(dq, dk, dv) from the forward's out and lse (the flash backward's math, per example, no forward rerun):
    P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)), through the softcap, dQ = dS K, dK = dS^T Q."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq, dk, dv = (torch.zeros(x.shape, dtype=compute, device=x.device) for x in (q, k, v))
    hkv, d = k.shape[1], k.shape[2]
    group = q.shape[1] // hkv
    for a, b in _example_ranges(cu_seqlens, q.shape[0]):
        n = b - a
        qs, ks, vs = _heads(q[a:b], 1, compute), _heads(k[a:b], group, compute), _heads(v[a:b], group, compute)
        do = _heads(dout[a:b], 1, compute)
        scores, capped = _example_scores(qs, ks, scale, causal, window, softcap)
        p = torch.exp(scores - (lse[a:b].to(compute) / LOG2E).transpose(0, 1)[..., None])  # (H, n, n)
        delta = (do * out[a:b].to(compute).transpose(0, 1)).sum(-1, keepdim=True)
        ds = p * (do @ vs.transpose(1, 2) - delta)
        if capped is not None:
            ds = ds * (1.0 - capped * capped)
        ds = ds * scale
        dq[a:b] = (ds @ ks).transpose(0, 1)
        dk[a:b] = (ds.transpose(1, 2) @ qs).view(hkv, group, n, d).sum(1).transpose(0, 1)
        dv[a:b] = (p.transpose(1, 2) @ do).view(hkv, group, n, d).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _ReferenceAttention(torch.autograd.Function):
    """The reference as (out, lse) with the flash backward's math: the path of ``return_lse`` / ``saved``, so that
    a checkpoint's recompute given ``saved`` saves the same tensors as the forward and runs no attention."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, causal, window, softcap, saved_out, saved_lse):
        if saved_out is None:
            out, lse = _reference_with_lse(q, k, v, cu_seqlens, scale, causal, window, softcap)
        else:
            out, lse = saved_out, saved_lse
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.args = (scale, causal, window, softcap)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _reference_backward(dout, q, k, v, out, lse, cu_seqlens, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    *,
    return_lse: bool = False,
    saved: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch per-example attention (fp32 inside, fp64 if given fp64), differentiable; returns q.dtype.

    GQA repeats k/v here only. ``window=W``: token i sees j with i-W < j <= i. ``softcap``: scores become
    softcap*tanh(scores/softcap) before masking. ``return_lse`` / ``saved``: as in :func:`varlen_attention`
    (lse in the same log2 domain); these go through an autograd.Function with the flash backward's math, the
    plain call through autograd of the forward.
    """
    _check_args(q, k, v, cu_seqlens, causal, window, softcap)
    if not return_lse and saved is None:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        return _reference_impl(q, k, v, cu_seqlens, softmax_scale, causal, window, softcap, compute)
    _check_saved(q, saved)
    scale = float(softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2]))
    if saved is not None and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return saved if return_lse else saved[0]
    saved_out, saved_lse = saved if saved is not None else (None, None)
    out, lse = _ReferenceAttention.apply(
        q, k, v, cu_seqlens, scale, bool(causal), window, softcap, saved_out, saved_lse
    )  # fmt: skip
    return (out, lse) if return_lse else out
