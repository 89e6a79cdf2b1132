"""Block-size sweep of our kernels for tools/bench_kernels.py ``--sweep`` (a separate invocation from the table).

Each configuration calls our launchers directly and is timed by CUDA-graph replay with rotated input sets (the
same device-only timer as the table), so small-T winners are not decided by launch overhead. The grids are
trimmed so that compile time (~0.5-1 s per new Triton configuration) plus timing fits one 100 s device run at
two T values; every default in ``kernels/*.py`` is inside its grid.
"""

from __future__ import annotations

import functools
import itertools

from bench_kernels_timing import Timer, rotation_sets, tbps

__all__ = ["best_of_sweep", "sweep", "sweep_markdown"]


def sweep(t: int, shape: dict, timer: Timer, device, quick: bool) -> list[dict]:
    """Time our launchers over block sizes / warps / programs; the fastest per (kernel, direction, T) wins."""
    import torch

    from padless.kernels import rmsnorm as N
    from padless.kernels import rope as R
    from padless.kernels import swiglu as S

    dt = torch.bfloat16
    results: list[dict] = []
    h, hkv, d, i, e = shape["H"], shape["Hkv"], shape["D"], shape["I"], shape["E"]

    def grid(*axes):
        combos = list(itertools.product(*axes))
        return combos[:2] if quick else combos  # the interpreter is slow: two configs prove the plumbing

    def record(kernel, direction, cfg, fns, nbytes):
        try:
            ms = timer.graph(fns)
        except Exception as error:  # a configuration that does not compile (registers) is skipped, not fatal
            results.append({"kernel": kernel, "dir": direction, "T": t, "cfg": cfg, "ms": None, "tbps": None,
                            "error": f"{type(error).__name__}: {error}"[:160]})  # fmt: skip
            return
        results.append({"kernel": kernel, "dir": direction, "T": t, "cfg": cfg, "ms": ms, "tbps": tbps(nbytes, ms)})

    rope_bytes = 2 * t * (h + hkv) * d * 2
    sets = rotation_sets(rope_bytes, device)
    qk = [(torch.randn(t, h, d, device=device, dtype=dt), torch.randn(t, hkv, d, device=device, dtype=dt))
          for _ in range(sets)]  # fmt: skip
    freqs = torch.randn(max(t, 16), d // 2, device=device)
    cos, sin, pos = freqs.cos(), freqs.sin(), torch.arange(t, device=device)
    for block_t, warps in grid((1, 2, 4, 8), (4, 8)):
        fns = [functools.partial(R._launch_rope, q, k, cos, sin, pos, False, block_t=block_t, num_warps=warps)
               for q, k in qk]  # fmt: skip
        record("rope", "fwd", {"block_t": block_t, "num_warps": warps}, fns, rope_bytes)
    del qk

    glu_elem = t * i * 2
    sets = rotation_sets(3 * glu_elem, device)
    glu = [tuple(torch.randn(t, i, device=device, dtype=dt) for _ in range(3)) for _ in range(sets)]
    for block, warps in grid((2048, 4096), (4, 8)):
        cfg = {"block": block, "num_warps": warps}
        fwd = [functools.partial(S._launch_glu_fwd, g, u, S._SILU, block=block, num_warps=warps) for g, u, _ in glu]
        record("swiglu", "fwd", cfg, fwd, 3 * glu_elem)
        bwd = [functools.partial(S._launch_glu_bwd, dy, g, u, S._SILU, block=block, num_warps=warps)
               for g, u, dy in glu]  # fmt: skip
        record("swiglu", "bwd", cfg, bwd, 5 * glu_elem)
    del glu

    for name, xshape in (("rmsnorm", (t, e)), ("rmsnorm_qk_head", (t, h, d))):
        nbytes = t * h * d * 2 if name == "rmsnorm_qk_head" else t * e * 2
        sets = rotation_sets(2 * nbytes, device)
        w = torch.randn(xshape[-1], device=device, dtype=dt)
        data = []
        for _ in range(sets):
            x = torch.randn(*xshape, device=device, dtype=dt)
            data.append((x, torch.randn_like(x), N._launch_fwd(x, w, 1e-6, 0.0)[1]))
        rows_options = (1, 2, 4) if name == "rmsnorm" else (16, 32, 64)
        for block_r, warps in grid(rows_options, (4, 8)):
            fns = [functools.partial(N._launch_fwd, x, w, 1e-6, 0.0, block_r=block_r, num_warps=warps)
                   for x, _, _ in data]  # fmt: skip
            record(name, "fwd", {"block_r": block_r, "num_warps": warps}, fns, 2 * nbytes)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
        for block_r, warps, per_sm, prefetch in grid(rows_options[:2], (8, 16), (2, 4), (False, True)):
            cfg = {"block_r": block_r, "num_warps": warps, "programs_per_sm": per_sm, "prefetch": prefetch}
            fns = [functools.partial(N._launch_bwd, dy, x, w, rstd, 0.0, True, True, block_r, warps,
                                     programs=sms * per_sm, prefetch=prefetch) for x, dy, rstd in data]  # fmt: skip
            record(name, "bwd", cfg, fns, 3 * nbytes)
        del data
    return results


def best_of_sweep(results: list[dict]) -> list[dict]:
    best: dict[tuple, dict] = {}
    for r in results:
        if r["ms"] is None:
            continue
        key = (r["kernel"], r["dir"], r["T"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return list(best.values())


def sweep_markdown(results: list[dict]) -> list[str]:
    def f(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    best = {id(b) for b in best_of_sweep(results)}
    lines = ["## Sweep (CUDA-graph time per call; * = fastest per kernel, direction and T)", "",
             "| kernel | dir | T | config | ms | TB/s | |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(results, key=lambda r: (r["kernel"], r["dir"], r["T"], r["ms"] or 1e9)):
        mark = "*" if id(r) in best else r.get("error", "")
        lines.append(f"| {r['kernel']} | {r['dir']} | {r['T']} | `{r['cfg']}` | {f(r['ms'], 4)} | "
                     f"{f(r['tbps'], 2)} | {mark} |")  # fmt: skip
    return lines
