"""A/B of the fused linear cross-entropy's chunk schedules against Liger and eager (lm_head + next-token CE).

Why: at T = 16K tokens with a frozen bf16 lm_head (V 151936, E 4096) padless measured 65.5-66.0 ms fwd+bwd against
Liger's 65.9: level, not faster. ~93% of that is the two cuBLAS GEMMs per chunk, ~6% the Triton row pass. The
variants here change what can be changed without touching the math: where the row pass runs (alone, or on a
side stream beside the next chunk's logits GEMM, optionally with cuBLAS leaving SMs free for it) and the chunk
rows C (GEMM shape, fewer weight re-reads). This script times them side by side so the lead can pick a default.

Rows (each at T in --tokens, frozen and trainable weight):
* ``<schedule>_c<C>``: ``fused_linear_cross_entropy(..., schedule=<schedule>, chunk_bytes=<C rows x buffers>)``;
  ``serial_c1280`` is the default since session 3's A/B (``serial_c1024`` before, the table's reference);
  ``*_lt_*``: the same with torch's preferred BLAS set to cuBLASLt. A variant is skipped (with a note) when its
  predicted extra memory passes the 0.5 GiB budget, or when its chunk rows at that T equal another variant's.
* ``serial_skip_c1024``: ``skip_ignored=True`` (only counted tokens get GEMMs; one host sync). With the default
  labels (1/64 ignored) it shows the gather/scatter/sync overhead; ``--ignored-frac 0.4`` gives SFT-like labels
  (each of 64 examples ignores its first 40%: the prompt), where every schedule but this one pays for them.
* ``floor_gemms_c<C>``: the default's cuBLAS GEMMs alone (no row pass): the floor of every cuBLAS schedule at
  that C; ``floor_rows_c<C>``: its row passes alone (the most any overlap can hide).
* ``liger``: ``LigerFusedLinearCrossEntropyLoss(reduction="sum")`` if liger-kernel imports (else a note);
  ``eager``: ``F.cross_entropy`` on full fp32 logits, only at T <= 4096 (27.8 GiB extra at 16K).

Timing: fwd+bwd = one ``torch.autograd.grad`` of the loss sum, event-timed per call; --warmup calls each, then
--reps rounds that call every implementation once, in an order rotated each round (drift and clock throttling
land on all alike); mean, min and std over the rounds. The SM clock and power draw (NVML via torch.cuda, when
it works) are sampled while each call runs: at 16K the per-chunk time was ~13% above 4K's for the same chunk
shape, which sustained-load clock throttling would explain. Memory: peak allocated during one call minus what
was allocated before it (includes the returned gradients); ``minus wgrad`` removes the V x E weight gradient.

Estimates per variant (columns ``GEMM TFLOP``, ``HBM GB``): GEMM FLOPs 2 T E V per GEMM (2 GEMMs frozen, 3
trainable), HBM bytes = the weight streamed once per GEMM per chunk + the logits written by the GEMM, read and
rewritten by the row pass (3 passes), read by each gradient GEMM.

Usage (repository root, CUDA): ``python3 tools/bench_ce_variants.py --out DIR`` (default $OUT); ~40-70 s on an
H200. ``--tiny --reps 1 --warmup 1`` runs small shapes on a CPU (Triton interpreter, ~1 min) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # padless's packages from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_kernels_* modules

from bench_kernels_timing import GiB, peak_minus_inputs_gib

__all__ = ["main"]

BUDGET_GIB = 0.5
# (name, schedule, rows per buffer, preferred BLAS or None, skip_ignored); the overlap schedules hold two buffers. The
# overlap_smN schedules switch torch to cuBLASLt (where torch applies the SM carve-out) for the carved logits
# GEMMs, so the *_lt rows (every GEMM through cuBLASLt, no carve-out) separate the library's effect from the
# carve-out's.
VARIANTS = [
    ("serial_c1280", "serial", 1280, None, False),  # the default since session 3's A/B
    ("serial_c1024", "serial", 1024, None, False),
    ("serial_lt_c1024", "serial", 1024, "cublaslt", False),
    ("serial_c1536", "serial", 1536, None, False),
    ("overlap_c512", "overlap", 512, None, False),
    ("overlap_lt_c512", "overlap", 512, "cublaslt", False),
    ("overlap_c640", "overlap", 640, None, False),
    ("overlap_sm16_c512", "overlap_sm16", 512, None, False),
    ("overlap_sm8_c512", "overlap_sm8", 512, None, False),
    ("serial_skip_c1024", "serial", 1024, None, True),
]


def _buffers(schedule: str) -> int:
    return 2 if schedule.startswith("overlap") else 1


class _Sampler:
    """SM clock (MHz) and power (W) through torch.cuda's NVML helpers; disabled after the first failure."""

    def __init__(self, cuda: bool) -> None:
        self.ok = cuda
        self.why = "" if cuda else "no CUDA"

    def sample(self) -> tuple[float | None, float | None]:
        if not self.ok:
            return None, None
        import torch

        try:
            return float(torch.cuda.clock_rate()), float(torch.cuda.power_draw()) / 1000.0
        except Exception as error:  # pynvml missing or NVML refused: clocks are a nice-to-have
            self.ok, self.why = False, f"{type(error).__name__}: {error}"[:120]
            return None, None


def _estimate(tokens: int, hidden_size: int, vocab: int, rows: int, trainable: bool) -> tuple[float, float]:
    """(GEMM TFLOP, HBM GB) of one fwd+bwd with chunks of ``rows`` (see the module docstring)."""
    n_chunks = -(-tokens // rows)
    gemms = 3 if trainable else 2
    flop = gemms * 2 * tokens * hidden_size * vocab
    weight_bytes = n_chunks * gemms * vocab * hidden_size * 2
    logits_bytes = tokens * vocab * 2 * (1 + 3 + (gemms - 1))
    return flop / 1e12, (weight_bytes + logits_bytes) / 1e9


def _floors(ce, h, w, labels, rows: int, trainable: bool) -> tuple[Callable, Callable]:
    """serial_c<rows>'s GEMMs alone and its row passes alone (same buffers, same order, no autograd)."""
    import torch

    tokens, vocab = h.shape[0], w.shape[0]
    h_ = h.detach()
    targets = torch.cat([labels[1:], labels.new_full((1,), -100)])
    row_loss = torch.empty(tokens, dtype=torch.float32, device=h.device)
    buffer = torch.empty(rows, vocab, dtype=h.dtype, device=h.device)
    grad_h = torch.empty_like(h_)
    grad_w = torch.empty_like(w) if trainable else None
    bounds = [(s, min(s + rows, tokens)) for s in range(0, tokens, rows)]

    @torch.no_grad()  # out= matmuls refuse inputs that require grad under grad mode
    def gemms():
        for index, (start, stop) in enumerate(bounds):
            logits = buffer[: stop - start]
            torch.mm(h_[start:stop], w.t(), out=logits)
            torch.mm(logits, w, out=grad_h[start:stop])
            if grad_w is not None:
                if index == 0:
                    torch.mm(logits.t(), h_[start:stop], out=grad_w)
                else:
                    grad_w.addmm_(logits.t(), h_[start:stop])
        return grad_h

    with torch.no_grad():
        torch.mm(h_[: bounds[0][1]], w.t(), out=buffer[: bounds[0][1]])  # finite values for the row-pass floor

    @torch.no_grad()
    def row_passes():
        for start, stop in bounds:
            # Rewrites the buffer with dlogits each time: finite values, the same traffic.
            ce._launch_ce_rows(buffer[: stop - start], targets[start:stop], row_loss[start:stop], -100, None, True)
        return row_loss

    return gemms, row_passes


def _implementations(ce, liger_loss, h, w, labels, tokens: int, hidden_size: int, vocab: int, eager_max_t: int):
    """[(name, fn or None, meta)] for one T and weight mode; fn() runs one fwd+bwd and returns the gradients."""
    import torch
    import torch.nn.functional as F

    trainable = w.requires_grad
    wrt = (h, w) if trainable else (h,)
    impls: list[tuple[str, Callable | None, dict]] = []
    seen: dict[tuple, str] = {}
    for name, schedule, rows, blas, skip in VARIANTS:
        nbuf = _buffers(schedule)
        chunk_bytes = nbuf * rows * vocab * h.element_size()
        actual = ce._chunk_rows(tokens, vocab, h.element_size(), chunk_bytes // nbuf)
        meta = {"schedule": schedule, "rows": actual, "n_chunks": -(-tokens // actual), "buffers": nbuf}
        meta["gemm_tflop"], meta["hbm_gb"] = _estimate(tokens, hidden_size, vocab, actual, trainable)
        predicted = (nbuf * actual * vocab + tokens * hidden_size) * h.element_size() / GiB
        key = (schedule, actual, blas, skip)
        if predicted > BUDGET_GIB:
            impls.append((name, None, meta | {"note": f"skipped: predicted extra {predicted:.2f} GiB > budget"}))
        elif key in seen:
            impls.append((name, None, meta | {"note": f"skipped: same chunks as {seen[key]} at this T"}))
        else:
            seen[key] = name

            def fn(schedule=schedule, chunk_bytes=chunk_bytes, blas=blas, skip=skip):
                previous = torch.backends.cuda.preferred_blas_library() if blas else None
                if blas:
                    torch.backends.cuda.preferred_blas_library(blas)
                try:
                    loss, _ = ce.fused_linear_cross_entropy(
                        h, w, labels, schedule=schedule, chunk_bytes=chunk_bytes, skip_ignored=skip
                    )
                    return torch.autograd.grad(loss, wrt)
                finally:
                    if blas:
                        torch.backends.cuda.preferred_blas_library(previous)

            note = "C x chunks, TFLOP and GB count every token, skipped ones too" if skip else ""
            impls.append((name, fn, meta | {"note": note}))
    floor = min(VARIANTS[0][2], tokens)  # the default's chunk rows
    gemms, row_passes = _floors(ce, h, w, labels, floor, trainable)
    floor_meta = {"schedule": "serial", "rows": floor, "n_chunks": -(-tokens // floor)}
    impls.append((f"floor_gemms_c{VARIANTS[0][2]}", gemms, floor_meta | {"note": "cuBLAS GEMMs only (not a loss)"}))
    impls.append((f"floor_rows_c{VARIANTS[0][2]}", row_passes, floor_meta | {"note": "row passes only (not a loss)"}))
    if liger_loss is None:
        impls.append(("liger", None, {"note": "n/a: liger-kernel not importable"}))
    else:

        def liger_fn():
            out = liger_loss(w, h[:-1], labels[1:])
            loss = out[0] if isinstance(out, tuple) else out  # some versions also return extras
            return torch.autograd.grad(loss, wrt)

        impls.append(("liger", liger_fn, {"note": ""}))
    if tokens <= eager_max_t:

        def eager_fn():
            logits = (h @ w.T)[:-1].float()
            loss = F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
            return torch.autograd.grad(loss, wrt)

        impls.append(("eager", eager_fn, {"note": ""}))
    else:
        impls.append(("eager", None, {"note": f"skipped above T={eager_max_t} (full fp32 logits: memory)"}))
    return impls


def _time_rounds(impls, warmup: int, reps: int, cuda: bool, sampler: _Sampler) -> dict[str, dict]:
    """Warm-up each, then ``reps`` rounds calling every implementation once in a rotated order."""
    import torch

    live = [(name, fn) for name, fn, _ in impls if fn is not None]
    for _, fn in live:
        for _ in range(warmup):
            fn()
    stats = {name: {"ms": [], "mhz": [], "w": []} for name, _ in live}
    for rep in range(reps):
        order = live[rep % len(live) :] + live[: rep % len(live)] if live else []
        for name, fn in order:
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                mhz, watts = sampler.sample()  # while the GPU still works on the call
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                out = fn()
                ms, mhz, watts = (time.perf_counter() - t0) * 1e3, None, None
            del out
            stats[name]["ms"].append(ms)
            if mhz is not None:
                stats[name]["mhz"].append(mhz)
                stats[name]["w"].append(watts)
    return stats


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def run(args: argparse.Namespace) -> dict:
    import torch

    from padless.kernels import cross_entropy as ce

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    hidden_size, vocab = (4096, 151936) if not args.tiny else (32, 300)
    tokens_list = [int(t) for t in args.tokens.split(",")] if not args.tiny else [96, 200]
    eager_max_t = 4096 if not args.tiny else 96
    liger_loss, liger_note = None, ""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    except Exception as error:  # optional baseline
        liger_note = f"{type(error).__name__}: {error}"[:160]
    if args.tiny:
        global VARIANTS
        VARIANTS = [(name, sched, rows // 8, None, skip) for name, sched, rows, _, skip in VARIANTS]  # CPU: no Lt
    sampler = _Sampler(cuda)
    rows_out: list[dict] = []
    t_start = time.perf_counter()
    for tokens in tokens_list:
        gen = torch.Generator(device=device).manual_seed(tokens)
        dt = torch.bfloat16
        h = (torch.randn(tokens, hidden_size, generator=gen, device=device) * 0.5).to(dt).requires_grad_(True)
        w_train = (torch.randn(vocab, hidden_size, generator=gen, device=device) * 0.02).to(dt).requires_grad_(True)
        labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
        labels[:: max(1, tokens // 64)] = -100  # a few masked tokens (example starts)
        if args.ignored_frac > 0:
            # SFT-like: 64 examples, each with its first ``ignored_frac`` of tokens (the prompt) ignored.
            length = max(1, tokens // 64)
            position = torch.arange(tokens, device=device) % length
            labels[position < int(args.ignored_frac * length)] = -100
        wgrad_gib = w_train.numel() * w_train.element_size() / GiB
        for mode, w in (("frozen", w_train.detach()), ("trainable", w_train)):
            impls = _implementations(ce, liger_loss, h, w, labels, tokens, hidden_size, vocab, eager_max_t)
            stats = _time_rounds(impls, args.warmup, args.reps, cuda, sampler)
            for name, fn, meta in impls:
                row = {"T": tokens, "weight": mode, "impl": name} | meta
                if name == "liger" and fn is None:
                    row["note"] = f"n/a: {liger_note}"
                if fn is not None:
                    ms = stats[name]["ms"]
                    row |= {
                        "mean_ms": _mean(ms),
                        "min_ms": min(ms),
                        "std_ms": statistics.pstdev(ms) if len(ms) > 1 else 0.0,
                        "n": len(ms),
                        "sm_mhz": _mean(stats[name]["mhz"]),
                        "power_w": _mean(stats[name]["w"]),
                    }
                    peak = peak_minus_inputs_gib(fn, cuda)
                    row["extra_gib"] = peak
                    row["minus_wgrad_gib"] = None if peak is None or mode == "frozen" else peak - wgrad_gib
                rows_out.append(row)
                if cuda:
                    torch.cuda.empty_cache()
            print(f"[{time.perf_counter() - t_start:6.1f}s] T={tokens} {mode} done", flush=True)
        del h, w_train
    return {
        "env": _environment(cuda, liger_loss is not None, sampler),
        "shape": {"E": hidden_size, "V": vocab, "dtype": "bfloat16"},
        "warmup": args.warmup,
        "reps": args.reps,
        "ignored_frac": args.ignored_frac,
        "wall_s": time.perf_counter() - t_start,
        "rows": rows_out,
    }


def _environment(cuda: bool, has_liger: bool, sampler: _Sampler) -> dict:
    import platform

    import torch
    import triton

    liger_version = None
    if has_liger:
        from importlib.metadata import version

        try:
            liger_version = version("liger-kernel")
        except Exception:  # an editable or vendored install: the version is only informative
            liger_version = "unknown"
    return {
        "machine": platform.node(),
        "gpu": torch.cuda.get_device_name() if cuda else "none (CPU, Triton interpreter)",
        "sms": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "liger": liger_version,
        "python": platform.python_version(),
        "clock_sampling": "ok" if sampler.ok else f"off ({sampler.why})",
    }


def markdown(result: dict) -> str:
    def f(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    env = result["env"]
    lines = [
        "# Fused linear CE: chunk-schedule A/B (tools/bench_ce_variants.py)",
        "",
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, liger {env['liger']}; "
        f"E {result['shape']['E']}, V {result['shape']['V']}, bf16; fwd+bwd per call, {result['warmup']} warm-up, "
        f"{result['reps']} interleaved rounds; ignored prompt fraction {result['ignored_frac']}; "
        f"clocks: {env['clock_sampling']}; wall {result['wall_s']:.0f} s.",
        "",
        "| T | weight | impl | C x chunks | mean ms | min ms | std | vs serial_c1024 | vs liger | extra GiB "
        "| minus wgrad | SM MHz | W | GEMM TFLOP | HBM GB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["T"], r["weight"], r["impl"]): r.get("mean_ms") for r in result["rows"]}
    for r in result["rows"]:
        ref = base.get((r["T"], r["weight"], "serial_c1024"))
        lig = base.get((r["T"], r["weight"], "liger"))
        mean = r.get("mean_ms")
        rel = f"{mean / ref:.3f}" if mean and ref else "n/a"
        rel_l = f"{mean / lig:.3f}" if mean and lig else "n/a"
        chunks = f"{r['rows']} x {r['n_chunks']}" if "rows" in r else ""
        lines.append(
            f"| {r['T']} | {r['weight']} | {r['impl']} | {chunks} | {f(mean)} | {f(r.get('min_ms'))} | "
            f"{f(r.get('std_ms'))} | {rel} | {rel_l} | {f(r.get('extra_gib'), 3)} | {f(r.get('minus_wgrad_gib'), 3)} | "
            f"{f(r.get('sm_mhz'), 0)} | {f(r.get('power_w'), 0)} | {f(r.get('gemm_tflop'), 1)} | "
            f"{f(r.get('hbm_gb'), 1)} | {r.get('note', '')} |"
        )
    lines += ["", "Fastest padless variant per row group (floors excluded; std in ms):", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["T"], r["weight"]), []).append(r)
    for (tokens, mode), rows in groups.items():
        ours = [r for r in rows if r.get("mean_ms") and "schedule" in r and not r["impl"].startswith("floor")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["mean_ms"])
        ref = base.get((tokens, mode, "serial_c1024"))
        lig = base.get((tokens, mode, "liger"))
        lines.append(
            f"- T={tokens} {mode}: {best['impl']} {best['mean_ms']:.2f} ms (std {best['std_ms']:.2f}); "
            f"serial_c1024 {f(ref)}, liger {f(lig)}"
            + (f" -> {100 * (1 - best['mean_ms'] / lig):.1f}% faster than Liger" if lig else "")
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON/markdown (default $OUT)")
    parser.add_argument("--tokens", default="4096,16384", help="comma-separated T values")
    parser.add_argument("--reps", type=int, default=10, help="timed rounds (each calls every implementation once)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per implementation first")
    parser.add_argument(
        "--ignored-frac", type=float, default=0.0, help="ignore this prompt fraction of each of 64 examples"
    )
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU: a smoke test of the script")
    args = parser.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by kernels.cross_entropy)
    result = run(args)
    report = markdown(result)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_ce_variants.json").write_text(json.dumps(result, indent=1))
        (out / "bench_ce_variants.md").write_text(report)
        print(f"wrote {out / 'bench_ce_variants.json'} and .md")


if __name__ == "__main__":
    main()
