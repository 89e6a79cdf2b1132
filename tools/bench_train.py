"""End-to-end LoRA training benchmark: padless against HF+peft (padded, packed SDPA/Flex), Liger-Kernel, Unsloth.

One command, one table: every system trains the same randomly initialised 8B-shaped model (Qwen3-8B or
Llama-3-8B shapes, bf16, built directly on the GPU) on the same examples from one shard set, and reports real
(non-padding) tokens/s, trainable tokens/s, MFU, seconds per step, peak ``torch.cuda.max_memory_allocated()`` and
the loss of every step. Steps are padless's micro-batch plan at each token budget; every system at the same plan
budget trains on exactly the same examples per step (see ``tools/bench_train_data.py``), so their step losses agree
to bf16 noise, and padless's first-step loss is printed beside Hugging Face's unpacked loss on the same examples.
Padded peers take b examples per step from the same example sequence (``--padded-steps plan``: padless's steps).

Systems run in worker subprocesses, one after another (one GPU): an OOM is recorded and the worker goes on; a crash
or hang (``--system-timeout``) loses only that system's row, and a fresh worker continues with the rest. Liger
patches transformers' module globals, so its systems get their own worker. On a machine with several GPUs, ``;`` in
``--systems`` splits the line-up into lanes that run at the same time, lane i on GPU i (each system still has a
whole GPU to itself); the table keeps the order of ``--systems``. Systems that share compiled kernels (the two
FlexAttention rows) belong in one lane: the second then reuses the first one's Inductor cache.

The shards (the real Alpaca 52K, Qwen3 tokenizer, max_len 1024):
    python -m prep pack ../shared/data/alpaca/alpaca_data_en_52k.jsonl.gz --max-len 1024 \\
        --tokenizer ../shared/data/tokenizers/qwen3-4b-thinking-2507 --out .device-data/alpaca-qwen3-1024
On the H200 (about 8 minutes for the Qwen3 line-up; docs/bench/train.md has the Llama-3-8B command):
    python tools/bench_train.py --shards .device-data/alpaca-qwen3-1024 --model-shape qwen3-8b --out $OUT \
        --profile --time-budget 560
CPU smoke run of every code path on a tiny model: ``python tools/bench_train.py --tiny --shards DIR``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_train_* modules
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # padless's packages from a plain checkout

from bench_train_report import environment, render_markdown, render_table
from bench_train_systems import SHAPES, BenchConfig, SystemSpec

__all__ = ["default_systems", "main"]

WORKER_FLAG = "--worker"
RESTART_RC = 75  # a worker exits with this after a CUDA error: the context is poisoned, a fresh process goes on


def _tok(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def default_systems(max_len: int, *, warmup: int, steps: int, slow_steps: int) -> list[SystemSpec]:
    """The full line-up, most important first (a --time-budget cut skips the tail); token budgets are multiples
    of the shards' max_len (1K..32K at max_len 1024)."""
    k = lambda n: n * max_len
    slow = dict(warmup=1, steps=slow_steps)  # the dense-mask SDPA peer at long rows
    base = dict(warmup=warmup, steps=steps)
    hf = dict(family="hf", attn="sdpa")
    out: list[SystemSpec] = []
    for n in (1, 4, 8, 16, 32):  # padless-1k is the "1K-token step" row
        out.append(SystemSpec(name=f"padless-{_tok(k(n))}", family="padless", layout="stream", attn="padless",
                              plan_tokens=k(n), **base))  # fmt: skip
    out.append(SystemSpec(name=f"padless-{_tok(k(16))}-offload", family="padless", layout="stream", attn="padless",
                          plan_tokens=k(16), checkpointing="offload", cuda_graphs=False, **base))  # fmt: skip
    for n in (1, 4, 16):  # the same without CUDA graphs: what the graphs buy
        out.append(SystemSpec(name=f"padless-{_tok(k(n))}-eager", family="padless", layout="stream", attn="padless",
                              plan_tokens=k(n), cuda_graphs=False, optional=n != 1, **base))  # fmt: skip

    def padded(b: int, **kw: Any) -> SystemSpec:  # plan_tokens: used by --padded-steps plan only
        return SystemSpec(name=f"hf-padded-b{b}", layout="padded", plan_tokens=k(1 if b == 1 else 4), batch_size=b,
                          **{**hf, **base, **kw})  # fmt: skip

    def packed(attn: str, n: int, **kw: Any) -> SystemSpec:
        label = "flex" if attn == "flex_attention" else attn
        return SystemSpec(name=f"hf-packed-{label}-{_tok(k(n))}", layout="packed", plan_tokens=k(n),
                          **{**hf, **base, "attn": attn, "needs_cuda": attn != "sdpa", **kw})  # fmt: skip

    out += [packed("flex_attention", 16), padded(32), packed("sdpa", 4), padded(1), padded(8), padded(16)]
    out += [packed("sdpa", 16, **slow), packed("flex_attention", 4, optional=True)]
    liger = dict(family="liger", group="liger", needs_cuda=True, **base)
    out.append(SystemSpec(name=f"liger-packed-flex-{_tok(k(16))}", layout="packed", attn="flex_attention",
                          plan_tokens=k(16), **liger))  # fmt: skip
    out.append(SystemSpec(name="liger-padded-b32", layout="padded", attn="sdpa", plan_tokens=k(4), batch_size=32,
                          **liger))  # fmt: skip
    out.append(SystemSpec(name=f"liger-packed-sdpa-{_tok(k(4))}", layout="packed", attn="sdpa", plan_tokens=k(4),
                          optional=True, **liger))  # fmt: skip
    out.append(SystemSpec(name="unsloth", family="unsloth", layout="padded", attn="sdpa", plan_tokens=k(4),
                          batch_size=32, group="unsloth", needs_cuda=True, **base))  # fmt: skip
    return out


def _select(systems: list[SystemSpec], patterns: str) -> list[SystemSpec]:
    from fnmatch import fnmatch

    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in systems if any((p == "default" and not s.optional) or fnmatch(s.name, p) for p in pats)]
    if not chosen:
        names = ", ".join(s.name for s in systems)
        raise click.BadParameter(f"{patterns!r} matches no system; known: {names}", param_hint="--systems")
    return chosen


def select_lanes(systems: list[SystemSpec], patterns: str) -> list[list[SystemSpec]]:
    """``--systems`` split at ``;`` into lanes (one GPU each), each lane selected like a plain ``--systems``; a
    system may appear in one lane only."""
    lanes = [_select(systems, part) for part in patterns.split(";") if part.strip()]
    if not lanes:
        raise click.BadParameter(f"{patterns!r} names no system", param_hint="--systems")
    seen: dict[str, int] = {}
    for i, lane in enumerate(lanes):
        for s in lane:
            if s.name in seen:
                raise click.BadParameter(f"{s.name!r} is in lane {seen[s.name]} and lane {i}; give each system "
                                         "one lane", param_hint="--systems")  # fmt: skip
            seen[s.name] = i
    return lanes


# -- worker (one subprocess runs a list of systems, one JSON line each) ----------------------------------------
def worker_main(config_path: str, names: str, results_path: str) -> int:
    spec_all = json.loads(Path(config_path).read_text())
    cfg = BenchConfig(**spec_all["config"])
    specs = {s["name"]: SystemSpec(**s) for s in spec_all["systems"]}
    if any(specs[n].family == "unsloth" for n in names.split(",")):
        from bench_train_unsloth import use_site  # its own datasets < 5 first (also first on its PYTHONPATH)

        use_site()
    from bench_train_systems import run_system

    from padless.shards.reader import open_shards

    ss = open_shards(cfg.shards)
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny CPU models: 2 threads on a loaded 2-core box run ~10x slower than 1
    for name in names.split(","):
        print(f"=== {name}", flush=True)
        try:
            if specs[name].family == "unsloth":
                from bench_train_unsloth import run_unsloth

                row = run_unsloth(cfg, specs[name], ss)
            else:
                row = run_system(cfg, specs[name], ss)
        except Exception as error:  # one system's failure is its row, not the end of the run
            traceback.print_exc()
            row = {"system": name, "spec": asdict(specs[name]), "status": f"error: {type(error).__name__}: "
                   + (str(error).splitlines() or [""])[0][:160]}  # fmt: skip
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"=== {name}: {row['status']}", flush=True)
        if "CUDA error" in row["status"] or "device-side assert" in row["status"]:
            return RESTART_RC
    return 0


def _unsloth_worker_env() -> dict[str, str]:
    from bench_train_unsloth import worker_env

    return worker_env()


def _read_rows(path: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["system"]] = row
    return rows


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _run_group(
    names: list[str],
    config_path: Path,
    results: Path,
    timeout: float,
    log: Path,
    on_row: Callable[[], None],
    env: dict[str, str] | None = None,
    prefix: str = "  | ",
) -> None:
    """Run ``names`` in worker subprocesses until each has a row; a crash or hang costs one row, not the run."""
    specs = {s["name"]: s for s in json.loads(config_path.read_text())["systems"]}
    remaining = list(names)
    while remaining:
        before = set(_read_rows(results))
        cmd = [sys.executable, "-u", __file__, WORKER_FLAG, str(config_path), ",".join(remaining), str(results)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=env)  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        tail: list[str] = []
        last, n_done, timed_out = time.monotonic(), 0, False
        with open(log, "a") as logf:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    sys.stdout.write(prefix + line)
                    logf.write(line)
                    tail = ([*tail, line.rstrip()])[-8:]
                done = len(set(_read_rows(results)) - before)
                if done != n_done:
                    n_done, last = done, time.monotonic()
                    on_row()
                if not timed_out and time.monotonic() - last > timeout:
                    timed_out = True
                    with contextlib.suppress(ProcessLookupError):  # it may have just exited by itself
                        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and its children
        rc = proc.wait()
        have = set(_read_rows(results))
        remaining = [n for n in remaining if n not in have]
        if remaining and rc != RESTART_RC:  # the worker died (or hung) inside remaining[0]: record it, go on
            why = f"timeout after {timeout:.0f} s" if timed_out else f"worker crashed (exit {rc})"
            last_line = f": {tail[-1][:160]}" if tail else ""
            with open(results, "a") as f:
                row = {"system": remaining[0], "spec": specs[remaining[0]], "status": f"{why}{last_line}"}
                f.write(json.dumps(row) + "\n")
            remaining = remaining[1:]
            on_row()


def _unsloth_row(spec: SystemSpec, cuda: bool) -> dict[str, Any] | None:
    """Unsloth's row when it cannot run here (no GPU; not installed in ``/tmp/site-unsloth`` nor importable), else
    None: it then trains in its own worker (it patches transformers at import), see tools/bench_train_unsloth.py."""
    from bench_train_unsloth import precheck

    return precheck(spec, cuda)


@click.command(context_settings={"show_default": True})
@click.option(
    "--shards",
    "shards_path",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Shard set built by `prep pack` (see this file's docstring for the exact command).",
)
@click.option("--model-shape", type=click.Choice(sorted(SHAPES)), default="qwen3-8b", help="Model shapes.")
@click.option(
    "--systems",
    default="default",
    help="Comma-separated names or globs ('padless-*,hf-packed-flex-*'); "
    "'default' = all but hf-packed-flex-4k and liger-packed-sdpa-4k (~8 min on an H200), '*' = all. "
    "';' splits it into lanes that run at the same time, lane i on GPU i ('padless-*;hf-*').",
)
@click.option("--steps", default=10, help="Timed steps per system (after --warmup).")
@click.option("--warmup", default=3, help="Untimed warm-up steps per system (compilation, autotuning).")
@click.option("--slow-steps", default=3, help="Timed steps (after 1 warm-up) of the slow peer: packed SDPA, 16K rows.")
@click.option("--seed", default=0, help="Model init, LoRA init and pack order.")
@click.option("--lr", default=2e-4, help="AdamW learning rate.")
@click.option("--out", default=lambda: os.environ.get("OUT", "bench-train-out"), help="Results folder ($OUT).")
@click.option("--append", is_flag=True, help="Keep rows of earlier runs in --out (split a run over commands).")
@click.option("--profile", is_flag=True, help="torch.profiler on one extra padless step: top kernels + trace.")
@click.option("--profile-systems", default="padless-1k,padless-16k", help="Which padless systems --profile covers.")
@click.option("--tiny", is_flag=True, help="CPU smoke run: 2 layers, hidden 64, vocab of the shards, fp32.")
@click.option("--peak-tflops", default=989.0, help="Dense bf16 peak for MFU (H100/H200 SXM spec: 989).")
@click.option(
    "--flex-pad-rows/--no-flex-pad-rows",
    default=False,
    help="Pad FlexAttention rows to the row budget (one compiled shape instead of dynamic shapes).",
)
@click.option(
    "--padded-steps",
    type=click.Choice(["examples", "plan"]),
    default="examples",
    help="Padded peers' steps: b examples (one micro-batch) per step, or padless's plan steps split into "
    "micro-batches of b (gradient accumulation; exactly the same examples per step as padless).",
)
@click.option("--system-timeout", default=420.0, help="Seconds one system may run before its worker is killed.")
@click.option(
    "--time-budget",
    default=0.0,
    help="Seconds for the whole run; systems not started by then are "
    "skipped (0 = no limit). Keep it under the machine's per-command limit.",
)
def main(**o: Any) -> None:
    """Train every system on the same examples; print one table (also written to --out as JSON and markdown)."""
    from padless.shards.reader import open_shards

    if o["steps"] < 1 or o["warmup"] < 0 or o["slow_steps"] < 1:
        raise click.BadParameter(f"steps={o['steps']}, warmup={o['warmup']}, slow_steps={o['slow_steps']}: "
                                 "need >= 1, >= 0, >= 1")  # fmt: skip
    ss = open_shards(o["shards_path"])
    out_dir = Path(o["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig(
        shards=str(Path(o["shards_path"]).resolve()),
        model_shape=o["model_shape"],
        tiny=o["tiny"],
        seed=o["seed"],
        lr=o["lr"],
        out=str(out_dir.resolve()),
        profile=o["profile_systems"] if o["profile"] else "",
        peak_tflops=o["peak_tflops"],
        flex_pad_rows=o["flex_pad_rows"],
        padded_steps=o["padded_steps"],
        deadline=time.time() + o["time_budget"] if o["time_budget"] > 0 else 0.0,
    )
    every = default_systems(ss.max_len, warmup=o["warmup"], steps=o["steps"], slow_steps=o["slow_steps"])
    lanes = select_lanes(every, o["systems"])
    env = environment(cfg, ss, command=shlex.join([Path(sys.executable).name, *sys.argv]))
    rows = run_bench(cfg, lanes, env, append=o["append"], system_timeout=o["system_timeout"])
    print(render_table(rows, env))


def run_bench(
    cfg: BenchConfig,
    lanes: list[list[SystemSpec]],
    env: dict[str, Any],
    *,
    append: bool,
    system_timeout: float,
) -> dict[str, dict[str, Any]]:
    """Run each lane's systems worker group by worker group, the lanes at the same time (lane i on GPU i when
    there are several); rows (and --out files) are updated after every system."""
    out_dir = Path(cfg.out)
    stem = f"bench_train_{cfg.model_shape}" + ("_tiny" if cfg.tiny else "")
    results = out_dir / f"{stem}.rows.jsonl"
    line_up = [s for lane in lanes for s in lane]
    names = {s.name for s in line_up}
    kept = [r for r in _read_rows(results).values() if r["system"] not in names] if append else []
    lane_results = [out_dir / f"{stem}.rows.lane{i}.jsonl" for i in range(len(lanes))]
    for path in lane_results:
        path.write_text("")
    config_path = out_dir / f"{stem}.config.json"
    config_path.write_text(json.dumps({"config": asdict(cfg), "systems": [asdict(s) for s in line_up]}, indent=1))
    cuda = env["gpu"] != "none"
    if len(lanes) > 1:
        env["lanes"] = [[s.name for s in lane] for lane in lanes]
        if cuda and (have := _gpu_count()) < len(lanes):
            raise click.UsageError(f"--systems has {len(lanes)} lanes but this machine has {have} GPU(s); "
                                   "drop the ';' or run on a machine with one GPU per lane")  # fmt: skip
    t0 = time.monotonic()
    order = {s.name: i for i, s in enumerate(line_up)}
    lock = threading.Lock()

    def rows_now() -> dict[str, dict[str, Any]]:
        # the line-up's order; rows of earlier runs kept by --append go last
        rows = {r["system"]: r for r in kept}
        for path in lane_results:
            rows.update(_read_rows(path))
        return dict(sorted(rows.items(), key=lambda kv: order.get(kv[0], len(order))))

    def save() -> None:  # after every row: a run killed by the machine's limit keeps what it measured
        with lock:
            env["wall_s"] = time.monotonic() - t0
            rows = rows_now()
            results.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
            _write(out_dir, stem, env, cfg, rows)

    def run_lane(i: int) -> None:
        gpu_env = {"CUDA_VISIBLE_DEVICES": str(i)} if len(lanes) > 1 and cuda else {}
        prefix = f"  {i}| " if len(lanes) > 1 else "  | "
        groups: dict[str, list[SystemSpec]] = {}
        for s in lanes[i]:
            groups.setdefault(s.group, []).append(s)
        for group, specs in groups.items():
            runnable = []
            for s in specs:
                if (row := _static_row(s, cuda)) is None:
                    runnable.append(s.name)
                else:
                    with open(lane_results[i], "a") as f:
                        f.write(json.dumps(row) + "\n")
            if runnable:
                print(f"[bench_train] lane {i} worker group {group!r}: {', '.join(runnable)}", flush=True)
                base = _unsloth_worker_env() if group == "unsloth" else dict(os.environ)
                _run_group(runnable, config_path, lane_results[i], system_timeout, out_dir / f"{stem}.log", save,
                           {**base, **gpu_env}, prefix)  # fmt: skip
            save()

    threads = [threading.Thread(target=run_lane, args=(i,), name=f"lane{i}") for i in range(len(lanes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    save()
    final = rows_now()
    for path in lane_results:  # their rows are in the results file now
        path.unlink()
    return final


def _static_row(s: SystemSpec, cuda: bool) -> dict[str, Any] | None:
    """The row of a system that cannot run here (no GPU, peer not installed), else None (it runs)."""
    if s.family == "unsloth":
        return _unsloth_row(s, cuda)
    if s.needs_cuda and not cuda:
        return {"system": s.name, "spec": asdict(s), "status": "skipped (cpu)"}
    if s.family == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return {"system": s.name, "spec": asdict(s), "status": "n/a (liger-kernel not installed)"}
    return None


def _gpu_count() -> int:
    """GPUs this machine has, without initialising CUDA in this (parent) process."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 1
    return max(1, sum(line.startswith("GPU ") for line in out.splitlines()))


def _write(out_dir: Path, stem: str, env: dict[str, Any], cfg: BenchConfig, rows: dict[str, dict[str, Any]]) -> None:
    doc = {"environment": env, "config": asdict(cfg), "rows": list(rows.values())}
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (out_dir / f"{stem}.md").write_text(render_markdown(rows, env))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        sys.exit(worker_main(*sys.argv[2:5]))
    main()
