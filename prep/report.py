"""What ``prep`` prints: the pack summary, ``prep stats`` (with a GPU cost estimate) and ``prep show``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .config import GPUS, CostConfig, parse_param_count
from .errors import PrepError

__all__ = ["GPUS", "CostConfig", "format_pack_summary", "format_stats", "model_params_from_config", "shard_stats",
           "show_pack"]  # fmt: skip


def format_pack_summary(s: dict[str, Any]) -> str:
    lines = [f"packed -> {s['out']}  (fingerprint {s['fingerprint'][:16]})"]
    if s.get("mix"):
        parts = [f"{m['input']} (weight {m['weight']:g}) {m['drawn']:,} drawn from {m['rows']:,}"
                 + (", repeated" if m["repeated"] else "") for m in s["mix"]["sources"]]  # fmt: skip
        lines.append(f"  mix of {s['mix']['examples']:,} rows: " + "; ".join(parts))
    for name in ("train", "eval"):
        if name not in s:
            continue
        t = s[name]
        lines.append(
            f"  {name:5s}: rows {t['rows']:,} -> examples {t['examples']:,} (truncated {t['truncated']:,}, split "
            f"{t['split']:,}, dropped {t['dropped']:,}, empty {t['empty']:,}); packs {t['packs']:,} (lower bound "
            f"{t['lower_bound_packs']:,}); tokens {t['tokens']:,}, trainable {t['trainable']:,}; fill {t['fill']:.2%}"
            + (f"; examples with no trained token {t['untrained']:,}" if t.get("untrained") else "")
        )
    if s.get("bad_rows_skipped"):
        first = "; ".join(s["bad_rows_first"])
        more = ", ..." if s["bad_rows_skipped"] > len(s["bad_rows_first"]) else ""
        lines.append(f"  skipped {s['bad_rows_skipped']:,} bad rows (--skip-bad-rows): {first}{more}")
    stages = "  ".join(f"{k} {v:.2f}s" for k, v in s["stages"].items())
    lines.append(f"  time: {stages}  | total {s['wall_s']:.2f}s")
    return "\n".join(lines)


def _read_model_config(path: str) -> dict[str, Any]:
    """The JSON object of ``--model-config`` (a config.json or its folder), its ``text_config`` for multimodal ones."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        c = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepError(f"--model-config {path!r}: cannot read a config.json ({e})") from e
    c = c.get("text_config", c) if isinstance(c, dict) else c
    if not isinstance(c, dict):
        raise PrepError(f"--model-config {path!r} is a JSON {type(c).__name__}; expected a Hugging Face config object")
    return c


def _positive_int(c: dict[str, Any], key: str, path: str, default: int | None = None) -> int:
    """``c[key]`` (or ``default`` when absent or null), checked to be a positive integer."""
    v = c.get(key)
    v = default if v is None else v
    if v is None:
        raise PrepError(f"--model-config {path!r} lacks {key!r}; expected a decoder-only Hugging Face config")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise PrepError(f"--model-config {path!r}: {key} is {v!r}; expected a positive integer")
    return v


def model_params_from_config(path: str) -> float:
    """Approximate parameter count of a decoder-only HF config (embeddings, attention, gated MLP, norms).

    Every size it reads must be a positive integer: a config with a string, null or zero there is one
    :class:`PrepError` naming the key, never a wrong count."""
    c = _read_model_config(path)
    e, n_layer, v = (_positive_int(c, k, path) for k in ("hidden_size", "num_hidden_layers", "vocab_size"))
    inter = _positive_int(c, "intermediate_size", path, 4 * e)
    heads = _positive_int(c, "num_attention_heads", path, 1)
    hd = _positive_int(c, "head_dim", path, e // heads or 1)
    kv = _positive_int(c, "num_key_value_heads", path, heads)
    attn = e * heads * hd * 2 + e * kv * hd * 2
    mlp = 3 * e * inter
    emb = v * e * (1 if c.get("tie_word_embeddings", False) else 2)
    return float(emb + n_layer * (attn + mlp + 2 * e) + e)


def _cost(tokens: int, padded: int, c: CostConfig) -> dict[str, Any] | None:
    if c.model_params is None and c.model_config is None:
        return None
    n = parse_param_count(c.model_params) if c.model_params else model_params_from_config(c.model_config)
    gpu = c.gpu
    peak, price = GPUS[gpu]
    price = c.price_per_hour if c.price_per_hour is not None else price
    rate = peak * 1e12 * c.mfu
    out: dict[str, Any] = {"params": n, "gpu": gpu, "peak_tflops": peak, "mfu": c.mfu, "epochs": c.epochs,
                           "price_per_hour": price}  # fmt: skip
    # Full fine-tuning ~6N FLOPs per token (forward 2N, backward 4N); LoRA ~4N (no weight gradients of the
    # frozen base). Attention FLOPs are left out: small next to 6N at these lengths.
    for mode, k in (("full", 6.0), ("lora", 4.0)):
        for what, t in (("packed", tokens), ("padded_b8", padded)):
            hours = k * n * t * c.epochs / rate / 3600
            out[f"{mode}_{what}_gpu_hours"] = hours
            out[f"{mode}_{what}_cost"] = hours * price
    return out


def length_histogram(lens: np.ndarray, max_bins: int = 20) -> dict[str, list[int]]:
    """Example lengths in at most ``max_bins`` bins of equal integer width from the shortest to the longest.

    Bin i holds lengths in [edges[i], edges[i + 1]); integer edges keep every label a real range of lengths (a
    set where all examples are 4,096 tokens long is one bin, not twenty slivers of one token).
    """
    if len(lens) == 0:
        return {"counts": [], "edges": []}
    lo, hi = int(lens.min()), int(lens.max())
    width = -(-(hi - lo + 1) // max_bins)
    n_bins = -(-(hi - lo + 1) // width)
    edges = lo + width * np.arange(n_bins + 1, dtype=np.int64)
    counts = np.bincount((np.asarray(lens, dtype=np.int64) - lo) // width, minlength=n_bins)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def shard_stats(path: str, cost: CostConfig) -> dict[str, Any]:
    """Everything ``prep stats`` shows, as a dict (``--json`` prints it)."""
    from padless.shards.reader import open_shards
    from padless.shards.stats import example_lengths, set_stats

    ss = open_shards(path)
    st = set_stats(ss)
    st["prep"] = ss.manifest.get("prep", {})
    st["tokenizer"] = ss.manifest.get("tokenizer", {})
    lens = example_lengths(ss)
    st["histogram"] = length_histogram(lens)
    st["speedup_vs_padded"] = {b: v / st["tokens"] for b, v in st["padded_tokens"].items()}
    st["cost"] = _cost(st["tokens"], st["padded_tokens"][8], cost)
    return st


def format_stats(st: dict[str, Any]) -> str:
    p = st["prep"]
    lines = [
        f"packs {st['packs']:,}  examples {st['examples']:,}  tokens {st['tokens']:,}  trainable {st['trainable']:,}"
        f"  max_len {st['max_len']}  fill {st['fill']:.2%}  (lower bound {st['lower_bound_packs']:,} packs)",
    ]
    if p:
        lines.append(
            f"rows {p.get('rows', 0):,}: truncated {p.get('truncated', 0):,}, split {p.get('split', 0):,}, dropped "
            f"{p.get('dropped', 0):,}, empty {p.get('empty', 0):,}"
            + (f", with no trained token {p['untrained']:,}" if p.get("untrained") else "")
            + (f"; bad rows skipped {p['bad_rows_skipped']:,}" if p.get("bad_rows_skipped") else "")
        )
    pc = st["length_percentiles"]
    lines.append(
        "example length: " + "  ".join(f"p{k} {v:.0f}" for k, v in pc.items()) + f"  mean {st['length_mean']:.1f}"
    )
    h = st["histogram"]
    top = max(h["counts"], default=0) or 1
    for c, lo, hi in zip(h["counts"], h["edges"][:-1], h["edges"][1:]):
        span = f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"
        lines.append(f"  {span:>15} {'#' * round(40 * c / top):40s} {c:,}")
    lines.append("padded batching (random order, pad to longest in batch) vs packed tokens:")
    for b in (1, 2, 4, 8, 16, 32):
        v = st["padded_tokens"][b]
        lines.append(f"  batch {b:2d}: {v:>14,} tokens  -> packing is {v / st['tokens']:.2f}x less compute")
    c = st["cost"]
    if c:
        lines.append(
            f"cost estimate: {c['params'] / 1e9:.2f}B params on {c['gpu']} ({c['peak_tflops']:.0f} TFLOP/s bf16, "
            f"MFU {c['mfu']:.0%}), {c['epochs']:g} epoch(s), ${c['price_per_hour']:.2f}/h"
        )
        for mode in ("full", "lora"):
            lines.append(
                f"  {mode:4s}: packed {c[f'{mode}_packed_gpu_hours']:.3f} GPU-h (${c[f'{mode}_packed_cost']:.2f});"
                f" padded batch 8 {c[f'{mode}_padded_b8_gpu_hours']:.3f} GPU-h (${c[f'{mode}_padded_b8_cost']:.2f})"
            )
    return "\n".join(lines)


def show_pack(path: str, i: int, tokenizer: str | None, color: bool = False) -> str:
    """One pack decoded: a header per example, trained text [[in double brackets]] (or green)."""
    from padless.shards.reader import open_shards
    from padless.shards.tokenizer_identity import manifest_difference

    from .tokenizer import load_tokenizer

    ss = open_shards(path)
    if not 0 <= i < len(ss):
        raise PrepError(f"--pack {i} out of range: {path!r} holds packs 0..{len(ss) - 1}")
    source = ss.manifest.get("tokenizer_source")
    if tokenizer is None and source and Path(source).is_dir():
        try:
            tk = load_tokenizer(source)
        except PrepError as e:
            raise PrepError(
                f"the shards' manifest names the tokenizer folder {source!r}, which cannot be loaded now ({e}); pass "
                "--tokenizer with the tokenizer the shards were made with"
            ) from e
    else:
        tk = load_tokenizer(tokenizer)
    man_tok = ss.manifest.get("tokenizer", {})
    p = ss[i]
    lines = [
        f"pack {i}: {p.num_tokens} tokens, {p.num_trainable} trained, {p.num_examples} examples, max_seqlen "
        f"{p.max_seqlen} (decoded with {tk.name}; manifest tokenizer {man_tok.get('name')})"
    ]
    # Compared as `train run` compares: by what decides the token ids, so a re-saved copy is the same tokenizer.
    difference = manifest_difference(ss.manifest, {"tokenizer": tk.identity()}, ("the shards", "this one"))
    if difference is not None:
        lines.append(f"warning: this is not the tokenizer the shards were made with ({difference}); pass --tokenizer")
    on, off = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    for k in range(p.num_examples):
        a, b = int(p.cu_seqlens[k]), int(p.cu_seqlens[k + 1])
        ids, mask = p.input_ids[a:b], p.loss_mask[a:b]
        lines.append(f"--- example {k} (source row {int(p.example_index[k])}, tokens {a}..{b - 1}, "
                     f"{int(mask.sum())} trained) ---")  # fmt: skip
        out, t = [], 0
        while t < len(ids):  # runs of equal mask, decoded together so multi-byte characters survive
            u = t
            while u < len(ids) and mask[u] == mask[t]:
                u += 1
            text = tk.tok.decode(ids[t:u].tolist(), skip_special_tokens=False)
            out.append(f"{on}{text}{off}" if mask[t] else text)
            t = u
        lines.append("".join(out))
    lines.append(f"legend: {on}trained{off}, plain = masked (no loss)")
    return "\n".join(lines)
