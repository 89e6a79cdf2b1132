"""``prep pack`` as a library call: load -> render/tokenize -> overlong -> split -> pack -> write, timed per stage.

``PackConfig`` (``prep.config``) is the one typed config (the CLI builds it; it checks its own fields);
``run_pack`` checks the output folder before reading or writing anything (``prep.output``: nothing is deleted that
padless did not write), checks every row (``prep.validate``), and refuses a set with no trainable token. It writes
the shard set(s) into a hidden staging folder and swaps it into place at the end, so a failure at any stage (a bad
row, a full disk) leaves the previous output as it was and nothing else behind. The set holds its resolved
settings as ``config.yaml`` (``prep pack --config OUT/config.yaml --out NEW`` writes the same shards again).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .config import MIN_MAX_LEN, PackConfig
from .errors import PrepError

__all__ = ["MIN_MAX_LEN", "PackConfig", "run_pack"]


# How many bad-row reasons the summary and the manifest keep (the count covers all of them).
BAD_ROW_EXAMPLES = 5


def _local_inputs(cfg: PackConfig) -> list[Path]:
    """The input paths on this machine: dataset files / folders and the tokenizer folder."""
    from .load import DEMO_DATASETS
    from .tokenizer import DEFAULT_TOKENIZER

    paths = [DEMO_DATASETS.get(d, Path(d).expanduser()) for d in cfg.datasets]
    tok = Path(cfg.tokenizer).expanduser() if cfg.tokenizer is not None else DEFAULT_TOKENIZER
    paths.append(tok.parent if tok.is_file() else tok)
    return [p for p in paths if p.exists()]


def _validate(cfg: PackConfig) -> None:
    """What the config cannot check by itself: the output folder on disk, against the inputs."""
    from .output import check_out, remove_stale_staging

    try:
        # First the leftovers of killed runs into this --out (an old set a crash left aside goes back in place, so
        # the check below sees it), then the checks.
        remove_stale_staging(Path(cfg.out).expanduser())
        check_out(cfg.out, _local_inputs(cfg), cfg.overwrite)
    except OSError as e:  # e.g. a folder on the way that cannot be listed
        raise PrepError(f"cannot check --out {cfg.out!r}: {e}") from e


class _Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        yield
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t


def _bar(total: int, desc: str, enabled: bool, unit: str = "ex"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False, dynamic_ncols=True)


def _overlong(tok, mask, lengths, index, max_len: int, mode: str):
    """Apply --overlong to flat arrays; returns new arrays and counts."""
    counts = {"empty": int((lengths == 0).sum()), "overlong": int((lengths > max_len).sum())}
    keep_ex = lengths > 0
    if mode == "drop":
        keep_ex &= lengths <= max_len
    if not keep_ex.all():
        keep_tok = np.repeat(keep_ex, lengths)
        tok, mask, lengths, index = tok[keep_tok], mask[keep_tok], lengths[keep_ex], index[keep_ex]
    if mode != "drop" and counts["overlong"]:  # position of every token inside its example
        starts = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        pos = np.arange(len(tok), dtype=np.int64) - np.repeat(starts, lengths)
    if mode == "truncate" and counts["overlong"]:
        keep_tok = pos < max_len
        tok, mask, lengths = tok[keep_tok], mask[keep_tok], np.minimum(lengths, max_len)
    elif mode == "split" and counts["overlong"]:
        mask = mask.copy()
        mask[pos % max_len == 0] = False  # every piece is its own example: no target on its first token
        pieces = (lengths + max_len - 1) // max_len
        new_len = np.full(int(pieces.sum()), max_len, np.int64)
        last = np.cumsum(pieces) - 1
        new_len[last] = lengths - (pieces - 1) * max_len
        lengths, index = new_len, np.repeat(index, pieces)
    counts["truncated"] = counts["overlong"] if mode == "truncate" else 0
    counts["split"] = counts["overlong"] if mode == "split" else 0
    counts["dropped"] = counts["overlong"] if mode == "drop" else 0
    return tok, mask, lengths, index, counts


def _gather(tok, mask, lengths, order):
    """Tokens / mask of examples ``order`` laid end to end."""
    starts = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    ol = lengths[order]
    new_starts = np.zeros(len(order), np.int64)
    np.cumsum(ol[:-1], out=new_starts[1:])
    idx = np.repeat(starts[order] - new_starts, ol) + np.arange(int(ol.sum()), dtype=np.int64)
    return tok[idx], mask[idx], ol


def _check_rows(sources, formats: list[str], labels: list, maps: dict[str, str], skip: bool) -> list[tuple[int, str]]:
    """Check every row of every source: an error naming the first bad row, or with ``skip`` the bad rows' (global
    index, reason), each replaced by None in its source (tokenized as an empty example, then left out)."""
    from .validate import row_name, row_problem

    bad, offset = [], 0
    for s, f, label in zip(sources, formats, labels):
        for i, row in enumerate(s.rows):
            why = row_problem(row, f, maps)
            if why is None:
                continue
            if not skip:
                raise PrepError(
                    f"{row_name(i, label)}: {why}; fix the row, or pass --skip-bad-rows to leave out such rows"
                )
            bad.append((offset + i, f"{row_name(i, label)}: {why}"))
            s.rows[i] = None
        offset += len(s.rows)
    return bad


def _untrained(mask: np.ndarray, lengths: np.ndarray) -> int:
    """Examples without a trained token."""
    starts = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return int((np.add.reduceat(mask.astype(np.int64), starts) == 0).sum()) if len(lengths) else 0


def _no_trainable(split: str, cfg: PackConfig, formats: list[str], before: int, examples: int) -> str:
    """The error for a split whose examples hold no trained token: why, and what to change."""
    head = f"the {split} set has no trainable token ({examples} examples)"
    if before:
        return (
            f"{head}: --overlong {cfg.overlong} at --max-len {cfg.max_len} cut every trained token (the responses "
            "sit after the prompts); raise --max-len, or use --overlong split"
        )
    chat = any(f in ("chat", "sharegpt") for f in formats)
    if cfg.train_on == "completion" and chat:
        why = "no conversation has an assistant turn (only assistant turns are trained)"
    elif cfg.train_on == "completion":
        why = "every response (output / completion) is empty and the tokenizer has no EOS token to train"
    else:
        why = "every example is a single token (the first token of an example has no target)"
    fix = "use --train-on all, or " if cfg.train_on == "completion" else ""
    return f"{head}: {why}; {fix}check the data"


def _save_config(cfg: PackConfig, folder: Path) -> None:
    """The resolved settings as ``folder/config.yaml``: ``prep pack --config`` on it writes the same set again.

    Paths are kept as given, so a replay runs from the same working directory. ``overwrite`` is saved off: a replay
    replaces a folder only when asked to."""
    from padless.shards.config_file import SAVED_CONFIG_NAME, write_config_file

    header = [
        "The prep pack settings that wrote this shard set (defaults, --config file and options, resolved).",
        "Replay from the same working directory (relative paths are relative to it):",
        f"  prep pack --config {Path(cfg.out) / SAVED_CONFIG_NAME} --out NEW_FOLDER",
    ]
    write_config_file(cfg, folder / SAVED_CONFIG_NAME, header=header, reset=("overwrite",))


def run_pack(cfg: PackConfig) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary (also stored, minus timings, in the manifest)."""
    _validate(cfg)
    timer = _Timer()
    t_start = time.perf_counter()
    from .load import load_sources
    from .render import apply_maps, detect_format, parse_maps
    from .tokenize import tokenize_rows
    from .tokenizer import load_tokenizer
    from .validate import row_name

    maps = parse_maps(cfg.maps)
    with timer.stage("load tokenizer"):
        tk = load_tokenizer(cfg.tokenizer)
    with timer.stage("load data"):
        sources = load_sources(list(cfg.datasets))
        formats = []
        for s in sources:
            s.rows = apply_maps(s.rows, maps, s.name)
            if not s.rows:
                raise PrepError(f"dataset {s.name!r} is empty: no rows found; expected at least one example")
            formats.append(detect_format(s.rows, s.name, cfg.format))
        if any(f in ("chat", "sharegpt") for f in formats):
            _ = tk.chat  # the clear "no chat template" error, before any work
    with timer.stage("check rows"):
        labels = [s.name if len(sources) > 1 else None for s in sources]
        bad = _check_rows(sources, formats, labels, maps, cfg.skip_bad_rows)
    n_rows = sum(len(s.rows) for s in sources)
    with timer.stage("tokenize"):
        bar = _bar(n_rows, "tokenize", cfg.progress)
        parts, offset = [], 0
        for s, f, label in zip(sources, formats, labels):
            part = tokenize_rows(
                s.rows,
                f,
                cfg.train_on,
                tk,
                cfg.num_proc,
                bar.update,
                separator=" " if cfg.prompt_separator is None else cfg.prompt_separator,
                skip_bad_rows=cfg.skip_bad_rows,
                source=label,
            )
            bad += [(offset + i, f"{row_name(i, label)}: {why}") for i, why in part.bad]
            parts.append(part)
            offset += len(s.rows)
        bar.close()
        tok = np.concatenate([p.tokens for p in parts])
        mask = np.concatenate([p.mask for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        source_fp = hashlib.sha256("\n".join(s.fingerprint for s in sources).encode()).hexdigest()
        del sources
    bad.sort()
    skipped = {"bad_rows_skipped": len(bad), "bad_rows_first": [why for _, why in bad[:BAD_ROW_EXAMPLES]]}
    good = np.ones(n_rows, bool)
    good[[i for i, _ in bad]] = False
    if not good.any():
        raise PrepError(f"all {n_rows} rows are bad ({skipped['bad_rows_first'][0]}, ...); nothing left to pack")
    # Skipped rows leave (their length is 0: no tokens to drop); example_index keeps the source row numbers.
    index = np.flatnonzero(good).astype(np.int64)
    lengths = lengths[good]
    n_good = len(index)
    # Held-out split over source rows, seeded, before overlong handling (so split pieces stay together).
    n_eval = cfg.eval_examples or round(cfg.eval_fraction * n_good)
    if n_eval >= n_good:
        raise PrepError(f"the eval split takes {n_eval} of {n_good} rows; leave at least one for training")
    is_eval = np.zeros(n_good, bool)
    if n_eval:
        is_eval[np.random.default_rng([cfg.seed, 1]).permutation(n_good)[:n_eval]] = True
    sets: dict[str, tuple] = {}
    counts_all: dict[str, dict[str, int]] = {}
    with timer.stage("overlong"):
        for name, sel in (("train", ~is_eval), ("eval", is_eval)):
            if not sel.any():
                continue
            if sel.all():  # no eval split: skip copying every token
                t, m, ln, ix = tok, mask, lengths, index
            else:
                tsel = np.repeat(sel, lengths)
                t, m, ln, ix = tok[tsel], mask[tsel], lengths[sel], index[sel]
            trainable_before = int(m.sum())
            t, m, ln, ix, counts = _overlong(t, m, ln, ix, cfg.max_len, cfg.overlong)
            if len(ln) == 0:
                raise PrepError(
                    f"no {name} examples left after --overlong {cfg.overlong} (all {int(sel.sum())} rows empty or "
                    f"longer than --max-len {cfg.max_len}); raise --max-len or use --overlong truncate"
                )
            if not m.any():
                raise PrepError(_no_trainable(name, cfg, formats, trainable_before, len(ln)))
            counts["untrained"] = _untrained(m, ln)
            sets[name], counts_all[name] = (t, m, ln, ix), counts
    del tok, mask
    from .pack import plan_packs

    plans = {}
    with timer.stage("pack"):
        for name, (t, m, ln, ix) in sets.items():
            plan = plan_packs(ln, cfg.max_len, max_examples_per_pack=cfg.max_examples_per_pack, seed=cfg.seed)
            pt, pm, pl = _gather(t, m, ln, plan.example_order)
            plans[name] = (pt, pm, pl, plan.examples_per_pack, ix[plan.example_order])
    identity = tk.identity()
    from .output import staged_output

    options = cfg.output_options()
    options["formats"] = formats
    fingerprint = hashlib.sha256(
        json.dumps({"source": source_fp, "options": options, "tokenizer": identity}, sort_keys=True).encode()
    ).hexdigest()
    out = Path(cfg.out).expanduser()
    summary: dict[str, Any] = {}
    from padless.shards.writer import ShardWriter

    kw = {}
    if cfg.zstd_level is not None:
        kw["zstd_level"] = cfg.zstd_level
    if cfg.tokens_per_batch is not None:
        kw["tokens_per_batch"] = cfg.tokens_per_batch
    with timer.stage("write"), staged_output(out) as new:
        for name, (pt, pm, pl, per, ix) in plans.items():
            c = counts_all[name]
            rows_in = int((~is_eval).sum()) if name == "train" else n_eval
            stats = {
                "set": name,  # "train" or "eval" (the "split" key counts examples split by --overlong split)
                "rows": rows_in,
                "examples": len(pl),
                **c,
                "packs": len(per),
                "tokens": len(pt),
                "trainable": int(pm.sum()),
                "fill": float(len(pt) / (len(per) * cfg.max_len)),
                "lower_bound_packs": int(-(-len(pt) // cfg.max_len)),
                **skipped,
            }
            meta = {
                "tokenizer": identity,
                # Where it was loaded from (for `prep show`); not part of the fingerprint, paths differ by machine.
                "tokenizer_source": str(tk.folder),
                "options": options,
                "source": {"inputs": list(cfg.datasets), "fingerprint": source_fp, "rows": n_rows},
                "fingerprint": fingerprint,
                "prep": stats,
            }
            bar = _bar(len(per), f"write {name}", cfg.progress, unit="pack")
            with ShardWriter(new if name == "train" else new / "eval", max_len=cfg.max_len, metadata=meta, **kw) as w:
                w.add_packs(pt, pm, pl, per, ix, progress=bar.update)
            bar.close()
            summary[name] = stats
        _save_config(cfg, new)
    summary.update(skipped)
    summary["fingerprint"] = fingerprint
    summary["out"] = str(out)
    summary["stages"] = timer.stages
    summary["wall_s"] = time.perf_counter() - t_start
    return summary
