"""The benchmark harness shared by ``tools/bench_{prep,kernels,attention,train,memory,long}.py``: timers, the
environment record, the results writer, the table printer and the model shapes. It is imported by those scripts
(``python tools/bench_x.py`` puts ``tools/`` first on ``sys.path``) and is not run on its own.

- ``time_ms(fn)``: median milliseconds of ``repeats`` calls after ``warmup`` calls; CUDA events around each call on
  a GPU (L2 flushed before each call), wall clock on the CPU.
- ``time_graph_ms(fns)``: calls ``fns[i % len(fns)]`` captured in one CUDA graph, replays timed with CUDA events:
  device time without the host's launch path (on the CPU it falls back to ``time_ms``). ``input_sets`` says how
  many input sets to rotate so that L2 cannot serve a memory-bound op from its previous call.
- ``environment()``: date, GPU, driver, CPU, Python, package versions, git commit and the exact command line.
- ``append_rows(area, rows)``: appends one JSON line per row to ``docs/bench/results/<area>.jsonl`` (areas:
  prep, kernels, attention, train, memory, long), each row carrying the environment record.
- ``format_table(rows, columns)``: a plain-text table.

Importing this module imports neither torch nor triton (the kernel scripts set ``TRITON_INTERPRET`` first).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "AREAS",
    "MODEL_SHAPES",
    "REPO",
    "REQUIRED_KEYS",
    "RESULTS_DIR",
    "add_results_args",
    "append_rows",
    "comma_choices",
    "environment",
    "format_table",
    "input_sets",
    "model_shape",
    "record",
    "time_graph_ms",
    "time_ms",
]

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "docs" / "bench" / "results"
AREAS = ("prep", "kernels", "attention", "train", "memory", "long")
PACKAGES = ("torch", "triton", "transformers", "peft", "liger-kernel", "numba", "pyarrow", "tokenizers", "padless")
REQUIRED_KEYS = ("area", "date", "gpu", "driver", "python", "versions", "commit", "command")
_FALLBACK_L2_BYTES = 50 * 2**20

# Model shapes of the benchmarks' random models: family, config fields.
MODEL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-4b": ("qwen3", dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=128, intermediate_size=9728, vocab_size=151936, rope_theta=1e6,
                               rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=True)),
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=128, intermediate_size=12288, vocab_size=151936, rope_theta=1e6,
                               rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False)),
    "qwen3-14b": ("qwen3", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8,
                                head_dim=128, intermediate_size=17408, vocab_size=151936, rope_theta=1e6,
                                rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False)),
    "llama3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=5e5,
                                rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False)),
    "tiny": ("qwen3", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=128, tie_word_embeddings=False)),
}  # fmt: skip


def model_shape(name: str, shards_vocab: int) -> tuple[str, dict[str, Any]]:
    """(family, config fields) of ``MODEL_SHAPES[name]``, with the vocabulary raised (to a multiple of 64) if the
    shards' tokenizer needs more rows than the shape has; a shape without a vocabulary takes the shards' own."""
    family, shape = MODEL_SHAPES[name]
    shape = dict(shape)
    if shape.get("vocab_size", 0) and shards_vocab > shape["vocab_size"]:
        shape["vocab_size"] = -(-shards_vocab // 64) * 64
    return family, shape


# ---------------------------------------------------------------------------------------------------- timers
def _cuda_ready() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available()


def select_device(script: str, smoke: bool) -> str:
    """ "cuda", or "cpu" for a ``--smoke`` run (Triton's interpreter, set before our kernels import triton); exits
    with one line when a real run has no GPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if not smoke:
        sys.exit(f"{script} needs a CUDA GPU for real numbers (--smoke runs tiny shapes on the CPU)")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def time_ms(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10, cuda: bool | None = None) -> float:
    """Median milliseconds per call of ``fn`` over ``repeats`` calls, after ``warmup`` untimed calls.

    On a GPU (``cuda`` defaults to whether torch sees one) each call is bracketed by CUDA events and preceded by a
    256 MiB write that evicts L2, outside the events; on the CPU it is wall clock.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    cuda = _cuda_ready() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    samples = []
    if cuda:
        import torch

        flush = torch.empty(2**28, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def input_sets(bytes_per_call: int, *, most: int = 8) -> int:
    """How many input sets a graph-timed op should rotate so that >= 4 x L2 bytes pass between two uses of one
    (1 without a GPU)."""
    if not _cuda_ready():
        return 1  # the CPU fallback times eager calls: one set
    import torch

    l2 = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or _FALLBACK_L2_BYTES)
    return max(1, min(most, math.ceil(4 * l2 / max(1, bytes_per_call))))


def time_graph_ms(fns: Sequence[Callable[[], object]], *, calls: int = 20, replays: int = 5) -> float:
    """Milliseconds per call: ``calls`` calls (``fns`` in turn) captured in one CUDA graph, median of ``replays``.

    Each fn must be capturable (no host sync, no data-dependent shapes). Two eager rounds on the capture stream
    come first (compiles, allocator warm-up). On the CPU: ``time_ms`` of one round over ``fns``, per call.
    """
    if not _cuda_ready():
        return time_ms(lambda: [fn() for fn in fns], warmup=1, repeats=3, cuda=False) / len(fns)
    import torch

    calls = len(fns) * max(1, math.ceil(calls / len(fns)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin()
        try:
            for i in range(calls):
                fns[i % len(fns)]()
        finally:
            graph.capture_end()  # always leave capture mode, or every later CUDA call fails
    try:
        graph.replay()
        torch.cuda.synchronize()
        samples = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls)
    finally:
        del graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return statistics.median(samples)


# ------------------------------------------------------------------------------------------------ environment
def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _gpu_and_driver() -> tuple[str, str | None]:
    """The first GPU's name and driver from nvidia-smi (no CUDA context is created), else from an imported torch."""
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
        if out:
            name, _, driver = out.splitlines()[0].partition(",")
            return name.strip(), driver.strip() or None
    if _cuda_ready():
        import torch

        return torch.cuda.get_device_name(0), None
    return "none", None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Where and with what a benchmark ran (no package is imported: versions come from the installed metadata)."""
    gpu, driver = _gpu_and_driver()
    # PADLESS_COMMIT names the commit of the code that runs where the checkout's own .git cannot (a wheel of it
    # installed into a copied tree, a tree without .git); else the checkout's HEAD.
    commit = os.environ.get("PADLESS_COMMIT")
    if not commit:
        commit = _run(["git", "rev-parse", "HEAD"])
        if commit and _run(["git", "status", "--porcelain", "--untracked-files=no"]):
            commit += "-dirty"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu,
        "driver": driver,
        "cpu": f"{_cpu_name()} ({os.cpu_count()} cores)",
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PACKAGES},
        "commit": commit,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }


# ---------------------------------------------------------------------------------------------------- results
def append_rows(area: str, rows: Sequence[dict[str, Any]], path: str | Path | None = None) -> Path:
    """Append ``rows`` as JSON lines to ``path`` (default ``docs/bench/results/<area>.jsonl``), each prefixed
    with ``area`` and the environment record; returns the path written."""
    if area not in AREAS:
        raise ValueError(f"area={area!r}: expected one of {AREAS}")
    env = {"area": area, **environment()}
    out = Path(path) if path is not None else RESULTS_DIR / f"{area}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        if clash := sorted(set(row) & set(env)):
            raise ValueError(f"row keys {clash} would overwrite the environment record; rename them")
        lines.append(json.dumps({**env, **row}, default=str) + "\n")
    with open(out, "a", encoding="utf-8") as f:
        f.write("".join(lines))
    return out


def add_results_args(parser: argparse.ArgumentParser, area: str) -> None:
    """``--results PATH`` and ``--no-record`` (where ``record`` appends this script's rows)."""
    parser.add_argument(
        "--results",
        default=None,
        help=f"JSON-lines file the rows are appended to (default: docs/bench/results/{area}.jsonl; "
        "smoke runs append only when this is given)",
    )
    parser.add_argument("--no-record", action="store_true", help="print the table only, append nothing")


def comma_choices(parser: argparse.ArgumentParser, flag: str, text: str, allowed: Sequence[str]) -> list[str]:
    """``text`` split on commas; a name outside ``allowed`` is a usage error naming ``flag``."""
    names = [name for name in text.split(",") if name]
    if unknown := sorted(set(names) - set(allowed)):
        parser.error(f"{flag}: unknown {unknown}; expected some of {list(allowed)}")
    return names


def record(args: argparse.Namespace, area: str, rows: Sequence[dict[str, Any]], *, smoke: bool = False) -> None:
    """Append ``rows`` as ``add_results_args``'s options say, and print where they went."""
    if args.no_record or not rows or (smoke and args.results is None):
        return
    path = append_rows(area, rows, args.results)
    print(f"appended {len(rows)} row(s) to {path}")


# ----------------------------------------------------------------------------------------------------- tables
Column = tuple[str, str, "str | Callable[[Any], str]"]


def _cell(value: Any, fmt: str | Callable[[Any], str]) -> str:
    if value is None:
        return "-"
    if callable(fmt):
        return fmt(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def _get(row: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str = "") -> str:
    """Rows as a plain-text table: ``columns`` = (row key, header, format spec or callable); a dotted key reads a
    nested dict ("stages_s.write"); a missing value prints '-'."""
    cells = [[header for _, header, _ in columns]]
    cells += [[_cell(_get(row, key), fmt) for key, _, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
