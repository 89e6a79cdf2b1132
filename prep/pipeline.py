"""``prep pack`` as a library call: load -> render/tokenize -> overlong (streamed) -> mix -> split -> pack -> write,
timed per stage.

``PackConfig`` (``prep.config``) is the one typed config (the CLI builds it; it checks its own fields);
``run_pack`` checks the output folder before reading or writing anything (``prep.output``: nothing is deleted that
padless did not write), opens every input and checks its format first, then streams the rows through checks
(``prep.validate``), tokenization and ``--overlong`` in chunks (``prep.stream``: only token arrays are kept, spilled
to the staging folder), draws the ``--mix`` (``prep.mix``) and the held-out split, refuses a set with no trainable
token, packs and writes. The shard set(s) go into a hidden staging folder swapped into place at the end, so a
failure at any stage (a bad row, a full disk) leaves the previous output as it was and nothing else behind. The set
holds its resolved settings as ``config.yaml`` (``prep pack --config OUT/config.yaml --out NEW`` writes the same
shards again).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .config import MIN_MAX_LEN, PackConfig
from .errors import PrepError

__all__ = ["MIN_MAX_LEN", "PackConfig", "run_pack"]


def _local_inputs(cfg: PackConfig) -> list[Path]:
    """The input paths on this machine: dataset files / folders and the tokenizer folder."""
    from .load import parse_spec
    from .tokenizer import DEFAULT_TOKENIZER

    paths = []
    for d in cfg.inputs():
        try:
            spec = parse_spec(d)
        except PrepError:  # reported when the inputs are opened
            continue
        if spec.path is not None:
            paths.append(spec.path)
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


def _no_trainable(split: str, cfg: PackConfig, formats: list[str], before: int, examples: int) -> str:
    """The error for a split whose examples hold no trained token: why, and what to change."""
    head = f"the {split} set has no trainable token ({examples} examples)"
    if before:
        return (
            f"{head}: --overlong {cfg.overlong} at --max-len {cfg.max_len} cut every trained token (the responses "
            "sit after the prompts); raise --max-len, or use --overlong split"
        )
    chat = any(f in ("chat", "sharegpt") for f in formats)
    masked = cfg.train_on == "completion" and any(f != "text" for f in formats)  # text trains every token anyway
    if masked and chat:
        why = "no conversation has an assistant turn (only assistant turns are trained)"
    elif masked:
        why = "every response (output / completion) is empty and the tokenizer has no EOS token to train"
    else:
        why = "every example is a single token (the first token of an example has no target)"
    fix = "use --train-on all, or " if masked else ""
    return f"{head}: {why}; {fix}check the data"


def _select(st: Any, cfg: PackConfig, names: list[str]) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The rows to pack (global row ids, sorted, a row repeated once per copy) and the mix's record: every usable
    row without --mix, else each source's draw (``prep.mix``)."""
    if not cfg.mix:
        return np.flatnonzero(st.good).astype(np.int64), None
    from .mix import check_mix_size, draw, mix_counts

    entries = cfg.mix_entries()
    offsets = np.concatenate([[0], np.cumsum(st.source_rows)]).astype(np.int64)
    usable = [np.flatnonzero(st.good[a:b]).astype(np.int64) + a for a, b in itertools.pairwise(offsets)]
    total = cfg.mix_examples or sum(len(u) for u in usable)
    check_mix_size(total)
    counts = mix_counts([e.weight for e in entries], total)
    drawn, record = [], []
    for i, (e, rows, count) in enumerate(zip(entries, usable, counts)):
        if count and not len(rows):
            raise PrepError(f"--mix: {e.dataset!r} has no usable rows, but its weight asks for {count} of the mix")
        drawn.append(draw(rows, count, np.random.default_rng([cfg.seed, 2, i])))
        record.append({"input": names[i], "weight": e.weight, "rows": len(rows), "drawn": count,
                       "repeated": count > len(rows)})  # fmt: skip
    return np.concatenate(drawn), {"examples": total, "sources": record}


def _eval_rows(selected: np.ndarray, n_rows: int, cfg: PackConfig) -> np.ndarray:
    """bool (n_rows,): the held-out rows, a seeded sample of the selected rows' distinct ids (so every copy of a
    repeated row is on one side). A held-out set asked for is never empty: a fraction that rounds to no row is an
    error, as is one that leaves no row to train on."""
    distinct = np.unique(selected) if cfg.mix else selected  # without a mix every row is there once, in order
    n_eval = cfg.eval_examples or round(cfg.eval_fraction * len(distinct))
    if cfg.eval_fraction and not n_eval:
        raise PrepError(
            f"--eval-fraction {cfg.eval_fraction} of {len(distinct)} rows rounds to no row, so there would be no "
            "held-out set; raise it, or give the number of rows with --eval-examples N"
        )
    if n_eval >= len(distinct):
        raise PrepError(f"the eval split takes {n_eval} of {len(distinct)} rows; leave at least one for training")
    is_eval = np.zeros(n_rows, bool)
    if n_eval:
        is_eval[distinct[np.random.default_rng([cfg.seed, 1]).permutation(len(distinct))[:n_eval]]] = True
    return is_eval


def _set_examples(st: Any, rows: np.ndarray, name: str, cfg: PackConfig) -> tuple[np.ndarray, dict[str, int]]:
    """The examples (ids into ``st.ex_*``, with a row's pieces in order) of one set's ``rows``, and its counts."""
    from .stream import ranges

    raw = st.row_tokens[rows]
    over = int((raw > cfg.max_len).sum())
    counts = {"empty": int((raw == 0).sum()), "overlong": over}
    counts.update({key: over if cfg.overlong == mode else 0
                   for key, mode in (("truncated", "truncate"), ("split", "split"), ("dropped", "drop"))})  # fmt: skip
    per_row = np.bincount(st.ex_row, minlength=len(st.row_tokens))
    first = np.zeros(len(per_row), np.int64)
    np.cumsum(per_row[:-1], out=first[1:])
    ex = ranges(first[rows], per_row[rows])
    if len(ex) == 0:
        raise PrepError(
            f"no {name} examples left after --overlong {cfg.overlong} (all {len(rows)} rows empty or longer than "
            f"--max-len {cfg.max_len}); raise --max-len or use --overlong truncate"
        )
    trained = st.ex_trained[ex]
    if not trained.any():
        raise PrepError(_no_trainable(name, cfg, st.formats, int(st.row_trained[rows].sum()), len(ex)))
    counts["untrained"] = int((trained == 0).sum())
    return ex, counts


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
    from padless.shards.schema import FORMAT_VERSION
    from padless.shards.writer import ShardWriter

    from .config import parse_template_kwargs
    from .output import staged_output
    from .pack import plan_packs
    from .render import parse_maps
    from .stream import Spill, open_inputs, stream_inputs, write_packs
    from .tokenizer import load_tokenizer

    maps = parse_maps(cfg.maps)
    with timer.stage("load tokenizer"):
        kwargs = parse_template_kwargs(cfg.chat_template_kwargs)
        tk = load_tokenizer(cfg.tokenizer, template_kwargs=kwargs, template_date=cfg.template_date)
    with timer.stage("load data"):
        inputs = open_inputs(cfg, maps)
        if any(i.fmt in ("chat", "sharegpt") for i in inputs):
            _ = tk.chat  # the clear "no chat template" error, before any work
    names = list(cfg.inputs())
    out = Path(cfg.out).expanduser()
    summary: dict[str, Any] = {}
    with staged_output(out, overwrite=cfg.overwrite) as new:
        spill = Spill(new.parent / "spill")  # beside the new set, inside the staging folder
        bar = _bar(None, "tokenize", cfg.progress)
        st = stream_inputs(cfg, inputs, tk, maps, spill, timer.stage, bar.update)
        bar.close()
        n_rows = st.rows
        skipped = {"bad_rows_skipped": st.bad_count, "bad_rows_first": st.bad_first}
        if not st.good.any():
            raise PrepError(f"all {n_rows} rows are bad ({st.bad_first[0]}, ...); nothing left to pack")
        with timer.stage("mix and split"):
            selected, mix = _select(st, cfg, names)
            is_eval = _eval_rows(selected, n_rows, cfg)
            sets = {}
            for name, rows in (("train", selected[~is_eval[selected]]), ("eval", selected[is_eval[selected]])):
                if len(rows):
                    sets[name] = (len(rows), *_set_examples(st, rows, name, cfg))
        source_fp = hashlib.sha256("\n".join(i.source.fingerprint for i in inputs).encode()).hexdigest()
        identity = tk.identity()
        options = cfg.output_options()
        options["formats"] = st.formats
        what = {"source": source_fp, "options": options, "tokenizer": identity, "format_version": FORMAT_VERSION}
        fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
        source = {"inputs": names, "fingerprint": source_fp, "rows": n_rows, **({"mix": mix} if mix else {})}
        kw = {}
        if cfg.zstd_level is not None:
            kw["zstd_level"] = cfg.zstd_level
        if cfg.tokens_per_batch is not None:
            kw["tokens_per_batch"] = cfg.tokens_per_batch
        st.row_tokens = st.row_trained = st.good = None  # per-row arrays: not needed past the split
        for name, (rows_in, ex, counts) in sets.items():
            with timer.stage("pack"):
                lengths = st.ex_len[ex]
                tokens = int(lengths.sum())
                plan = plan_packs(lengths, cfg.max_len, max_examples_per_pack=cfg.max_examples_per_pack, seed=cfg.seed)
                del lengths
            stats = {
                "set": name,  # "train" or "eval" (the "split" key counts examples split by --overlong split)
                "rows": rows_in,
                "examples": len(ex),
                **counts,
                "packs": plan.num_packs,
                "tokens": tokens,
                "trainable": int(st.ex_trained[ex].sum()),
                "fill": float(tokens / (plan.num_packs * cfg.max_len)),
                "lower_bound_packs": int(-(-tokens // cfg.max_len)),
                **skipped,
            }
            meta = {
                "tokenizer": identity,
                # Where it was loaded from (for `prep show` and `train run`, from any working directory, so an
                # absolute path); not part of the fingerprint, paths differ by machine.
                "tokenizer_source": str(tk.folder.absolute()),
                "options": options,
                "source": source,
                "fingerprint": fingerprint,
                "prep": stats,
            }
            with timer.stage("write"):
                bar = _bar(plan.num_packs, f"write {name}", cfg.progress, unit="pack")
                with ShardWriter(new if name == "train" else new / "eval", max_len=cfg.max_len, metadata=meta,
                                 **kw) as w:  # fmt: skip
                    write_packs(w, st, ex, plan, progress=bar.update)
                bar.close()
            summary[name] = stats
        spill.remove()
        _save_config(cfg, new)
    summary.update(skipped)
    if mix:
        summary["mix"] = mix
    summary["fingerprint"] = fingerprint
    summary["out"] = str(out)
    summary["stages"] = timer.stages
    summary["wall_s"] = time.perf_counter() - t_start
    return summary
