"""Reporting for ``tools/bench_train.py``: the environment record, the table, loss agreement, targets, markdown."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shutil
import subprocess
from typing import Any

__all__ = ["environment", "loss_agreement", "render_markdown", "render_table", "targets"]

_PACKAGES = ("torch", "triton", "transformers", "peft", "liger-kernel", "unsloth", "bitsandbytes", "padless")

PREP_COMMAND = (
    "python -m prep pack ../shared/data/alpaca/alpaca_data_en_52k.jsonl.gz --max-len 1024 "
    "--tokenizer ../shared/data/tokenizers/qwen3-4b-thinking-2507 --out .device-data/alpaca-qwen3-1024"
)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpu_name() -> str:
    """The GPU's name without creating a CUDA context in this (parent) process: nvidia-smi, else 'none'."""
    import torch

    if not torch.cuda.is_available():
        return "none"
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    return "cuda"


def environment(cfg: Any, ss: Any, *, command: str) -> dict[str, Any]:
    from bench_train_data import shards_vocab_size
    from bench_train_systems import flops_per_token, model_config

    mcfg, notes = model_config(cfg.model_shape, shards_vocab_size(ss), tiny=cfg.tiny)
    per_token, per_sq = flops_per_token(mcfg)
    tok = ss.manifest.get("tokenizer") or {}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "command": command,
        "shards": {
            "path": cfg.shards,
            "max_len": ss.max_len,
            "packs": len(ss),
            "totals": ss.manifest.get("totals"),
            "fingerprint": ss.manifest.get("fingerprint"),
            "tokenizer": tok.get("name"),
            "inputs": (ss.manifest.get("source") or {}).get("inputs"),
            "prep_options": ss.manifest.get("options"),
        },
        "prep_command": PREP_COMMAND,
        "model": {"shape": cfg.model_shape + (" (tiny)" if cfg.tiny else ""), "notes": notes,
                  **{k: getattr(mcfg, k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")}},
        "flops_per_token": per_token,
        "flops_per_sq_len": per_sq,
        "peak_tflops": cfg.peak_tflops,
    }  # fmt: skip


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _micro(row: dict[str, Any]) -> str:
    spec = row.get("spec") or {}
    if spec.get("layout") == "padded":
        per = row.get("micro_batches_per_step")
        return f"b{spec.get('batch_size')} x{per:.1f}" if per else f"b{spec.get('batch_size')}"
    if spec.get("layout") == "packed":
        return "1 row" + (" (padded)" if row.get("pad_fraction", 0) > 0.001 else "")
    return "1 stream" if spec else "-"


_HEAD = ["system", "step plan", "micro-batch", "steps", "real tok/s", "train tok/s", "MFU", "s/step", "1st step s",
         "peak GiB", "loss@1", "loss@last", "status"]  # fmt: skip


def _cells(row: dict[str, Any]) -> list[str]:
    spec = row.get("spec") or {}
    losses = row.get("losses") or []
    ok = row.get("status") == "ok"
    return [
        row["system"] + (" (1K-token step)" if row["system"] == "padless-1k" else ""),
        row.get("plan", "-"),
        _micro(row),
        f"{spec.get('warmup', 0)}+{spec.get('steps', 0)}" if ok else "-",
        _f(row.get("tokens_per_s"), ",.0f"),
        _f(row.get("trainable_tokens_per_s"), ",.0f"),
        _f(row["mfu"] * 100, ".1f") + "%" if row.get("mfu") is not None else "-",
        _f(row.get("step_s_median"), ".3f"),
        _f(row.get("first_step_s"), ".1f"),
        _f(row.get("peak_gib"), ".1f"),
        _f(losses[0] if losses else None, ".4f"),
        (f"{losses[-1]:.4f} @{len(losses)}" if losses else "-"),
        row.get("status", "?"),
    ]


def _gpu(rows: dict[str, dict[str, Any]], env: dict[str, Any]) -> str:
    names = {r["gpu"] for r in rows.values() if r.get("gpu") and r["gpu"] != "cpu"}
    return ", ".join(sorted(names)) or env.get("gpu", "?")


def loss_agreement(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Per plan: every system's loss against the padless row's (same examples per step), step 1 and the last."""
    lines = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows.values():
        if r.get("status") == "ok" and r.get("losses"):
            groups.setdefault(r["plan"], []).append(r)
    for plan, group in sorted(groups.items()):
        ref = next((r for r in group if r["spec"]["family"] == "padless"), group[0])
        for r in group:
            if r is ref:
                continue
            n = min(len(ref["losses"]), len(r["losses"]))
            d = [abs(a - b) for a, b in zip(ref["losses"][:n], r["losses"][:n])]
            lines.append(
                f"plan {plan}: {r['system']} vs {ref['system']}: |dloss| step 1 {d[0]:.4f}, "
                f"step {n} {d[-1]:.4f}, max {max(d):.4f}"
            )
    for r in rows.values():
        if r.get("status") == "ok" and "hf_unpacked_loss_step1" in r:
            a, b = r["losses"][0], r["hf_unpacked_loss_step1"]
            lines.append(f"{r['system']} step-1 loss {a:.4f} vs HF unpacked on the same examples {b:.4f} "
                         f"(|d| {abs(a - b):.4f})")  # fmt: skip
    return lines


def targets(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets for padless, checked against this run's rows (meaningful on the 8B shapes only)."""
    ok = {k: r for k, r in rows.items() if r.get("status") == "ok"}
    pad = [r for r in ok.values() if r["spec"]["family"] == "padless"]
    peers = [r for r in ok.values() if r["spec"]["family"] != "padless"]
    hf_padded = [r for r in peers if r["spec"]["family"] == "hf" and r["spec"]["layout"] == "padded"]
    lines = []
    if pad:
        best = max(pad, key=lambda r: r["tokens_per_s"])
        lines.append(f"padless best: {best['tokens_per_s']:,.0f} real tok/s ({best['system']}); target >= 10,500")
        if peers:
            bp = max(peers, key=lambda r: r["tokens_per_s"])
            lines.append(f"  vs best peer {bp['system']} {bp['tokens_per_s']:,.0f}: "
                         f"{best['tokens_per_s'] / bp['tokens_per_s']:.2f}x (target 1.5x)")  # fmt: skip
        if hf_padded:
            bh = max(hf_padded, key=lambda r: r["tokens_per_s"])
            lines.append(f"  vs HF+peft padded best {bh['system']} {bh['tokens_per_s']:,.0f}: "
                         f"{best['tokens_per_s'] / bh['tokens_per_s']:.2f}x (target 3x)")  # fmt: skip
    for r in pad:
        if r["spec"]["plan_tokens"] == 16 * 1024 and r.get("peak_gib") is not None:
            lines.append(f"{r['system']} peak {r['peak_gib']:.1f} GiB; target <= 20 GiB")
    if "padless-1k" in ok:
        lines.append(f"padless-1k step {ok['padless-1k']['step_s_median']:.3f} s (median); target <= 0.15 s")
    return lines


def render_table(rows: dict[str, dict[str, Any]], env: dict[str, Any]) -> str:
    cells = [_HEAD] + [_cells(r) for r in rows.values()]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_HEAD))]
    fmt = lambda c: "  ".join(x.ljust(w) if i in (0, 2, 12) else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))
    head = f"bench_train: {env['model']['shape']} on {_gpu(rows, env)}, {env['flops_per_token'] / 1e9:.1f} GFLOP/token"
    out = [head, fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(c) for c in cells[1:]]
    extra = loss_agreement(rows) + targets(rows)
    return "\n".join(out + (["", *extra] if extra else []))


def render_markdown(rows: dict[str, dict[str, Any]], env: dict[str, Any]) -> str:
    v = env["versions"]
    sh = env["shards"]
    lines = [
        f"# bench_train: {env['model']['shape']} LoRA, {env['date']}",
        "",
        f"- GPU: {_gpu(rows, env)}; Python {env['python']}; " + ", ".join(f"{k} {x}" for k, x in v.items()),
        f"- command: `{env['command']}`",
        f"- shards: `{sh['path']}` (max_len {sh['max_len']}, {sh['packs']} packs, tokenizer {sh['tokenizer']}, "
        f"fingerprint {str(sh['fingerprint'])[:16]}) from {sh.get('inputs')}; prep options {sh.get('prep_options')}",
        f"- the benchmark's shards are built with `{env['prep_command']}`",
        "- model: "
        + ", ".join(f"{k} {x}" for k, x in env["model"].items() if k != "notes")
        + "".join(f"; note: {n}" for n in env["model"]["notes"]),
        f"- MFU = (FLOPs/token x real tokens + attention FLOPs) / time / {env['peak_tflops']} TFLOP/s; "
        f"{env['flops_per_token'] / 1e9:.2f} GFLOP/token (decoder matmuls 6N with recompute, head 4N), "
        "padding never counted.",
        "- LoRA r 16, alpha 16, dropout 0 on q,k,v,o,gate,up,down; AdamW lr 2e-4; clip 1.0; gradient checkpointing.",
        "",
        "| " + " | ".join(_HEAD) + " |",
        "|" + "---|" * len(_HEAD),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows.values()]
    lines += ["", "## Same examples, same loss", ""] + [f"- {x}" for x in loss_agreement(rows)]
    lines += ["", "## Targets", ""] + [f"- {x}" for x in targets(rows)]
    lines += ["", "## Step losses", ""]
    for r in rows.values():
        if r.get("losses"):
            lines.append(f"- {r['system']}: " + " ".join(f"{x:.4f}" for x in r["losses"]))
    return "\n".join(lines) + "\n"
