"""Step time and peak memory of ``train run`` on long single-document packs with checkpoint offload: Qwen3-8B shapes,
the option of keeping the attention output (``--keep-attention``) and of keeping the top layers' checkpoints on the
GPU (``--checkpoint-gpu-gib``). Prints one line per case as it ends, then a table; appends each case's row to
docs/bench/results/long.jsonl as soon as the case ends.

    python tools/bench_long.py --shards .device-data/long-128k,.device-data/long-512k \\
        --cases 131072:8,131072:8:keep,131072:36:keep:gpu16,524288:4:keep --steps 3
    python tools/bench_long.py --shards DIR --shape tiny --cases 256:2,256:2:keep --steps 2     # CPU smoke run

A case is ``TOKENS:LAYERS[:OPTION...]``:

- TOKENS: tokens per micro-batch (``--tokens-per-micro-batch``), a number or with a ``k`` suffix for x 1024
  (``128k`` = 131072);
- LAYERS: decoder layers of the shape (``num_hidden_layers``): a step of the real layer shapes with fewer layers;
- then any of ``keep`` (``--keep-attention``), ``gpuX`` (``--checkpoint-gpu-gib X``, X in GiB: ``gpu16``,
  ``gpu7.5``), ``tileN`` (``--mlp-tile-tokens N``, N tokens or with a ``k`` suffix: ``tile8k``), ``segN``
  (``--checkpoint-layers N``: a checkpoint per N layers) and ``qlora``
  (the base in NF4, loaded from a random model folder written once per shape and layer count into ``--work`` by
  ``padless.train.random_weights``; without it, bf16 LoRA on a random model built on the GPU).

Every case is one ``python -m padless.train run`` subprocess, as a user runs it: ``--checkpointing offload``, LoRA
r 16 on every linear projection, ``--max-steps --steps``, no evaluation; the shape's ``max_position_embeddings`` is
raised to 1M (or TOKENS) so that RoPE covers the sequence. A case reads the ``--shards`` set with the largest
``max_len`` not above TOKENS: with one-document packs (``prep pack --max-len L --overlong truncate`` on rows longer
than L) every step is one document of L tokens.

Reported: the first step's time (compiles, pinned-memory allocation), the median step time after ``--warmup`` steps,
peak GPU memory and its breakdown (summary.json's ``peak_mem_gib`` and ``memory_gib``), with ``train plan``'s
predictions of the peak and the step time for the case beside them, the run's peak resident host memory (pinned
checkpoints included), and useful TFLOP/s: ``padless.train.metrics.step_flop_model`` with checkpointing off on
``train plan``'s inventory of the model, i.e. the forward and backward a step needs without any recompute
(attention counted causal, from the shard set's sum of squared lengths), over the median step time (the first
step's when there is no other), so that a variant that recomputes less shows as more useful work per second.
A case that times out (``--case-timeout``, or what is left of ``--budget-s``) or exits with an error is a row with
that status and the steps it finished (metrics.jsonl is written step by step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_harness as H

GIB = 2**30
MAX_POSITIONS = 1 << 20
LORA_R = 16


@dataclass(frozen=True)
class Case:
    tokens: int  # tokens per micro-batch
    layers: int  # num_hidden_layers
    keep: bool = False  # --keep-attention
    gpu_gib: float = 0.0  # --checkpoint-gpu-gib
    mode: str = "lora"  # lora | qlora
    tile: int = 0  # --mlp-tile-tokens
    segment: int = 1  # --checkpoint-layers

    @property
    def name(self) -> str:
        """The case in its command-line form (``131072:36:keep:gpu16``)."""
        return ":".join([str(self.tokens), str(self.layers), *self.options])

    @property
    def options(self) -> list[str]:
        return [*(["keep"] if self.keep else []), *([f"gpu{self.gpu_gib:g}"] if self.gpu_gib else []),
                *([f"tile{self.tile}"] if self.tile else []), *([f"seg{self.segment}"] if self.segment > 1 else []),
                *(["qlora"] if self.mode == "qlora" else [])]  # fmt: skip

    @property
    def flags(self) -> list[str]:
        """The ``train run`` options of the case beyond the mode and the token budget."""
        out = ["--checkpointing", "offload", *(["--keep-attention"] if self.keep else [])]
        out += ["--checkpoint-gpu-gib", f"{self.gpu_gib:g}"] if self.gpu_gib else []
        out += ["--checkpoint-layers", str(self.segment)] if self.segment > 1 else []
        return out + (["--mlp-tile-tokens", str(self.tile)] if self.tile else [])

    @property
    def train_options(self) -> list[str]:
        """What the case adds to the ``train run`` command line."""
        return [f"--{self.mode}", "--tokens-per-micro-batch", str(self.tokens), *self.flags]


def _count(text: str, what: str, *, k_suffix: bool) -> int:
    scale = 1024 if k_suffix and text.lower().endswith("k") else 1
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) < 1:
        suffix = " (k for x 1024 allowed)" if k_suffix else ""
        raise ValueError(f"{what} {text!r}: expected a positive whole number{suffix}")
    return int(digits) * scale


def _gib(option: str) -> float:
    try:
        value = float(option[3:])
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{option!r}: expected gpuX with X > 0 GiB, e.g. gpu16")
    return value


def parse_case(text: str) -> Case:
    """A ``TOKENS:LAYERS[:OPTION...]`` case (see the module doc); ValueError names the bad part."""
    parts = text.split(":")
    if len(parts) < 2:
        raise ValueError(
            f"case {text!r}: expected TOKENS:LAYERS[:keep][:gpuX][:tileN][:segN][:qlora], e.g. 131072:36:keep:gpu16"
        )
    fields: dict[str, Any] = {
        "tokens": _count(parts[0], "TOKENS", k_suffix=True),
        "layers": _count(parts[1], "LAYERS", k_suffix=False),
    }
    for option in parts[2:]:
        if option == "keep":
            fields["keep"] = True
        elif option == "qlora":
            fields["mode"] = "qlora"
        elif option.startswith("gpu"):
            fields["gpu_gib"] = _gib(option)
        elif option.startswith("tile"):
            fields["tile"] = _count(option[4:], "tileN's N", k_suffix=True)
        elif option.startswith("seg"):
            fields["segment"] = _count(option[3:], "segN's N", k_suffix=False)
        else:
            raise ValueError(f"case {text!r}: unknown option {option!r}; expected keep, gpuX, tileN, segN or qlora")
    if fields.get("keep") and fields.get("segment", 1) > 1:
        raise ValueError(f"case {text!r}: keep and segN do not go together (--keep-attention keeps one layer's output)")
    return Case(**fields)


# ---------------------------------------------------------------------------------------------------- models
def model_fields(shape: str, vocab: int, case: Case) -> tuple[str, dict[str, Any]]:
    """(family, config fields) of ``shape`` with the case's layer count and RoPE positions for its tokens."""
    family, fields = H.model_shape(shape, vocab)
    fields["num_hidden_layers"] = case.layers
    fields["max_position_embeddings"] = max(int(fields.get("max_position_embeddings", 0)), MAX_POSITIONS, case.tokens)
    return family, fields


def model_folder(shape: str, vocab: int, case: Case, work: Path) -> Path:
    """A random model of ``shape`` with the case's layers, written once into ``work`` (QLoRA cases load it)."""
    from padless.train.random_weights import write_random_model

    config = model_config(shape, vocab, case)
    folder = work / f"model-{shape}-{case.layers}-layers-{config.max_position_embeddings}-positions"
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        import torch

        t0 = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        write_random_model(config, folder, seed=0, dtype=torch.bfloat16, device=device)
        print(f"wrote {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def model_config(shape: str, vocab: int, case: Case) -> Any:
    """The transformers config of the case's model."""
    from padless.train.modeling import tiny_config

    family, fields = model_fields(shape, vocab, case)
    return tiny_config(family, fields.pop("vocab_size", vocab), **fields)


def predicted(case: Case, inv: Any, sum_sq_per_token: float) -> tuple[float, float]:
    """``train plan``'s peak (GiB) and step time (s) for the case on ``inv``, its inventory of the model."""
    from padless.train.plan import Setting, estimate

    setting = Setting(case.mode, case.tokens, "offload", lora_r=LORA_R, mlp_tile=case.tile,
                      keep_attention=case.keep, checkpoint_gpu_bytes=int(case.gpu_gib * GIB),
                      checkpoint_layers=case.segment)  # fmt: skip
    e = estimate(inv, setting, sum_sq_per_token=sum_sq_per_token)
    return e.peak / GIB, e.step_s


def useful_flops(inv: Any, tokens: int, sum_sq_per_token: float) -> float:
    """A step's forward + backward FLOPs without recompute (``metrics.step_flop_model``, checkpointing off) for
    ``inv``, ``train plan``'s inventory of the model."""
    from padless.train.metrics import step_flop_model

    model = step_flop_model(inv.matmul_params, inv.layers, inv.heads, inv.head_dim, full=False, checkpointing="off")
    return model.step_flops(tokens, round(sum_sq_per_token * tokens))


# ------------------------------------------------------------------------------------------------------ runs
def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    """(exit status, None after ``timeout`` seconds, when the run is killed; peak resident GiB of the run)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss * 1024 / GIB  # ru_maxrss: KiB on Linux
        if time.monotonic() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return None, usage.ru_maxrss * 1024 / GIB
        time.sleep(0.2)


def step_numbers(out: Path, warmup: int, inv: Any, sum_sq_per_token: float) -> dict[str, Any]:
    """The steps a run logged in ``out``/metrics.jsonl (a run cut short keeps those it finished) and, once it
    ended, its summary.json's peak and memory breakdown."""
    path = out / "metrics.jsonl"
    records = [r for r in map(json.loads, path.read_text().splitlines()) if "step_time_s" in r] if path.exists() else []
    if not records:
        return {}
    steady = [r for r in records if r["step"] > warmup]
    step_s = statistics.median(r["step_time_s"] for r in steady) if steady else None
    tokens = int(statistics.median(r["tokens"] for r in steady or records[:1]))
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return {
        "first_step_s": records[0]["step_time_s"],
        "step_s": step_s,
        "steps": len(records),
        "step_tokens": tokens,
        "peak_gib": summary.get("peak_mem_gib", max(r["peak_mem_gib"] for r in records)),
        "memory_gib": summary.get("memory_gib") or {},
        "useful_tflops": useful_flops(inv, tokens, sum_sq_per_token) / (step_s or records[0]["step_time_s"]) / 1e12,
        "losses": [r["loss"] for r in records],
    }


def run_case(case: Case, args: argparse.Namespace, shards: str, vocab: int, timeout: float) -> dict[str, Any]:
    from padless.train.plan import inventory

    slug = case.name.replace(":", "-")
    out, log = args.work / f"run-{slug}", args.work / f"run-{slug}.log"
    shutil.rmtree(out, ignore_errors=True)  # nothing of an earlier run is read back as this one's
    cmd = [sys.executable, "-m", "padless.train", "run", shards, "--output", str(out), *case.train_options,
           "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_R), "--max-steps", str(args.steps),
           "--eval-every", "-1", "--no-progress", "--force"]  # fmt: skip
    if case.mode == "qlora":
        cmd += ["--model", str(model_folder(args.shape, vocab, case, args.work))]
    else:
        family, fields = model_fields(args.shape, vocab, case)
        cmd += ["--family", family, "--model-overrides", json.dumps(fields)]
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:  # a file, not a pipe: a long run's output never blocks it
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
        code, host_gib = _wait(proc, timeout)
    result: dict[str, Any] = {"wall_s": time.perf_counter() - t0, "host_peak_gib": host_gib, "log": str(log)}
    inv = inventory(model_config(args.shape, vocab, case))
    result["predicted_gib"], result["predicted_step_s"] = predicted(case, inv, args.sum_sq_per_token[shards])
    result.update(step_numbers(out, args.warmup, inv, args.sum_sq_per_token[shards]))
    if result.get("peak_gib"):
        result["predicted_error"] = result["predicted_gib"] / result["peak_gib"] - 1
    if code is None:
        result["status"] = f"timeout after {timeout:.0f} s"
    elif code != 0:
        last = (log.read_text(encoding="utf-8", errors="replace").strip().splitlines() or ["?"])[-1]
        result["status"] = f"exit {code}: {last[:300]}"
    else:
        result["status"] = "ok"
    return result


def pick_shards(case: Case, sets: dict[str, int]) -> str | None:
    """The shard set (path -> max_len) with the largest max_len not above the case's tokens."""
    fitting = [(max_len, path) for path, max_len in sets.items() if max_len <= case.tokens]
    return max(fitting)[1] if fitting else None


def line(row: dict[str, Any]) -> str:
    """One case in one line: its status, then the steps it finished."""
    text = f"{row['case']:<24} {row['status']}"
    if row.get("steps"):
        step = f"{row['step_s']:.2f} s" if row["step_s"] is not None else "-"
        text += f"  steps {row['steps']}  first {row['first_step_s']:.2f} s  step {step}"
        text += f"  peak {row['peak_gib']:.2f} GiB  {row['useful_tflops']:.1f} useful TFLOP/s"
    if row.get("wall_s") is not None:
        text += f"  host {row['host_peak_gib']:.1f} GiB  wall {row['wall_s']:.0f} s"
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="comma-separated shard sets of one-document packs (prep pack)")
    p.add_argument("--cases", required=True, help="comma-separated TOKENS:LAYERS[:keep][:gpuX][:tileN][:segN][:qlora]")
    p.add_argument("--shape", choices=sorted(H.MODEL_SHAPES), default="qwen3-8b", help="model shape")
    p.add_argument("--steps", type=int, default=3, help="steps per case (--max-steps)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median step time")
    p.add_argument("--work", type=Path, default=Path("bench-long"), help="model folders, runs and their logs (kept)")
    p.add_argument("--case-timeout", type=float, default=900.0, help="seconds before a case's row is a timeout")
    p.add_argument("--budget-s", type=float, default=0.0, help="seconds for all cases (0 = no limit): a case gets "
                   "at most what is left, and a case with under 10 s left is not started")  # fmt: skip
    H.add_results_args(p, "long")
    args = p.parse_args(argv)
    try:
        args.cases = [parse_case(text) for text in args.cases.split(",") if text]
    except ValueError as error:
        p.error(f"--cases: {error}")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.monotonic()
    from padless.shards.reader import open_shards
    from padless.train.plan import shard_statistics

    sets = {path: int(open_shards(path).manifest["max_len"]) for path in args.shards.split(",") if path}
    manifests = {path: open_shards(path).manifest for path in sets}
    args.sum_sq_per_token = {path: shard_statistics(path)[1] for path in sets}
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        shards = pick_shards(case, sets)
        left = args.budget_s - (time.monotonic() - t0) if args.budget_s else args.case_timeout
        row: dict[str, Any] = {"bench": "long", "case": case.name, "shape": args.shape, "tokens": case.tokens,
                               "layers": case.layers, "mode": case.mode, "flags": " ".join(case.flags),
                               "lora_r": LORA_R, "shards": shards}  # fmt: skip
        if shards is None:
            row["status"] = f"no --shards set with max_len <= {case.tokens} (have {sorted(sets.values())})"
        elif left < 10:
            row["status"] = "skipped: --budget-s spent"
        else:
            vocab = int(manifests[shards]["tokenizer"]["vocab_size"])
            row["shards_fingerprint"] = manifests[shards].get("fingerprint")
            row.update(run_case(case, args, shards, vocab, min(args.case_timeout, left)))
        print(line(row), flush=True)
        rows.append(row)
        H.record(args, "long", [row], smoke=args.shape == "tiny")  # each case as it ends: a killed run keeps them
    cols = [("case", "case", "s"), ("first_step_s", "first s", ".2f"), ("step_s", "s/step", ".2f"),
            ("predicted_step_s", "plan s", ".2f"), ("peak_gib", "peak GiB", ".2f"), ("predicted_gib", "plan", ".2f"),
            ("predicted_error", "plan err", "+.1%"),
            ("memory_gib.weights", "weights", ".2f"),
            ("memory_gib.step", "step", ".2f"), ("memory_gib.slack", "slack", ".2f"),
            ("host_peak_gib", "host GiB", ".1f"), ("useful_tflops", "TFLOP/s", ".1f"),
            ("status", "status", "s")]  # fmt: skip
    print(H.format_table(rows, cols, title=f"\ntrain run on long packs, {args.shape}, on {H.environment()['gpu']}"))


if __name__ == "__main__":
    main()
