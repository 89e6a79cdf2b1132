"""``train run --output``: where a run may write, what it may replace, and what ``--resume`` may continue.

A run folder is marked by ``padless-run.json``, written before anything else of the run; it lists the output
files the run saved (adapter or model, tokenizer), next to the fixed names a run writes (``config.yaml``,
``metrics.jsonl``, ``summary.json``, ``checkpoints/``, ``base_model/`` and their temp names, the report and the
trackers' files). ``config.yaml`` (:func:`save_run_config`) is the run's resolved settings, written right after the
marker: ``train run --config OUTPUT/config.yaml --output NEW`` trains the same run again. The rules, checked on every
rank before anything is written or deleted (:func:`plan_output`), applied by rank 0 (:func:`apply_output_plan`):

- The output is a new or empty folder, or a padless run folder. A non-empty folder without the marker is
  refused; so are the working directory, any folder holding it, and any folder that is or holds an input (the
  shard sets, the model folder, the --model-overrides file).
- A run folder in which no step was ever logged (its set-up failed) is reused as it is.
- A run folder holding a run is continued with ``--resume`` or replaced with ``--overwrite``, never silently.
  ``--overwrite`` deletes only what a padless run wrote: a folder that also holds other files is refused,
  naming them, before anything is deleted.
- ``--resume`` continues from the latest checkpoint when the run's settings match (:func:`run_settings`;
  ``--resume-changed`` lists the few that may differ), and restarts from step 0 with a note when the run wrote
  no checkpoint. A finished run (``summary.json``) is not resumed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from padless.shards.cli_config import flag_name
from padless.shards.config_file import SAVED_CONFIG_NAME, write_config_file

from .checkpoint import latest_checkpoint, read_checkpoint_settings
from .config import RESUME_CHANGEABLE, TrainConfig, TrainError
from .prepare import parse_model_overrides

__all__ = [
    "MARKER",
    "OutputPlan",
    "apply_output_plan",
    "plan_output",
    "record_outputs",
    "refuse_under_file",
    "run_settings",
    "save_run_config",
    "settings_differences",
    "shards_identity",
]

MARKER = "padless-run.json"
# Top-level names a run writes besides the output files its marker lists.
_FIXED = (MARKER, "metrics.jsonl", "summary.json", "checkpoints", "base_model", "base_model.tmp", ".tmp-output",
          SAVED_CONFIG_NAME, SAVED_CONFIG_NAME + ".tmp")  # fmt: skip
# Settings that must match for --resume (RESUME_CHANGEABLE may differ when --resume-changed names them); the
# other TrainConfig fields (output, device, logging, evaluation, checkpoint cadence, ...) do not change what is
# trained. tests/train/test_bad_inputs.py checks that every field is in one of the groups.
RESUME_FIXED = (
    "shards",
    "model",
    "family",
    "model_overrides",
    "mode",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "tokens_per_micro_batch",
    "grad_accum",
    "world_size",
    "seed",
    "optimizer",
    "memory",
    "fsdp",
)
RESUME_FREE = (
    "output",
    "resume",
    "resume_changed",
    "overwrite",
    "force",
    "eval_shards",
    "eval_every",
    "save_every",
    "keep_last",
    "checkpointing",
    "checkpoint_gpu_gib",
    "checkpoint_layers",
    "host_mem_gib",
    "keep_attention",
    "mlp_tile_tokens",
    "max_memory_gib",
    "cuda_graphs",
    "device",
    "log_every",
    "progress",
    "report_to",
)
# What a run derives from its metrics: the report (train.report) and the trackers' local files (train.trackers).
_DERIVED = ("report.png", "report.txt", "tensorboard", "wandb", "mlflow.db", "mlruns", "trackers.json")


@dataclass(frozen=True)
class OutputPlan:
    """What this run does with its output folder: ``clear`` (padless entries to delete) then write the marker."""

    output: Path
    action: Literal["new", "overwrite", "resume", "restart"]
    checkpoint: Path | None = None  # the checkpoint to resume from
    clear: tuple[Path, ...] = ()
    changed: tuple[str, ...] = ()  # RESUME_CHANGEABLE settings that differ from the resumed run's
    notes: list[str] = field(default_factory=list)


def shards_identity(manifest: dict[str, Any]) -> str:
    """The shard set's identity for --resume: prep's fingerprint, else the shard files' checksums."""
    fingerprint = manifest.get("fingerprint")
    if isinstance(fingerprint, str) and fingerprint:
        return fingerprint
    import hashlib

    sums = [str(s.get("sha256")) for s in manifest.get("shards", []) if isinstance(s, dict)]
    return hashlib.sha256("\0".join(sums).encode()).hexdigest()


def _model_identity(model: str | None) -> str | None:
    if model is None:
        return None
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _overrides_identity(value: Any) -> Any:
    """``--model-overrides`` for --resume, by content: the fields as sorted JSON, whether given inline or as a file
    (another spelling of the same fields is the same model); the value as it is when it cannot be read."""
    if not isinstance(value, str):
        return value
    try:
        fields = parse_model_overrides(value, None)
    except TrainError:
        return value
    return json.dumps(fields, sort_keys=True)


def run_settings(
    cfg: TrainConfig, *, world_size: int, budget: int, manifest: dict[str, Any], dtype: str
) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (saved in every checkpoint)."""
    settings: dict[str, Any] = {name: getattr(cfg, name) for name in (*RESUME_FIXED, *RESUME_CHANGEABLE)
                                if hasattr(cfg, name)}  # fmt: skip
    settings.update(
        shards=shards_identity(manifest),
        model=_model_identity(cfg.model),
        model_overrides=_overrides_identity(cfg.model_overrides),
        target_modules=sorted(cfg.target_module_list) if cfg.target_module_list else None,
        tokens_per_micro_batch=budget,
        world_size=world_size,
        dtype=dtype,
    )
    return settings


def _label(name: str) -> str:
    if name == "shards":
        return "SHARDS (fingerprint)"
    if name == "world_size":
        return "world size"
    fields = {f.name: f for f in TrainConfig.__dataclass_fields__.values()}
    return flag_name(TrainConfig, fields[name]) if name in fields else name


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    return "none" if value is None else str(value) if not isinstance(value, list) else ",".join(map(str, value))


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str]]:
    """``(setting, "old -> new")`` for every setting of ``current`` whose saved value differs."""
    out = []
    if "model_overrides" in saved:
        saved = {**saved, "model_overrides": _overrides_identity(saved["model_overrides"])}
    for name in (*RESUME_FIXED, *RESUME_CHANGEABLE):
        if name in current and name in saved and saved[name] != current[name]:
            out.append((name, f"{_label(name)} {_show(saved[name])} -> {_show(current[name])}"))
    return out


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_under_file(folder: Path, flag: str) -> None:
    """A TrainError when the nearest existing parent of ``folder`` (the value of ``flag``) is a file, so the folder
    can never be made; checked before any work, not at the mkdir after it."""
    parent = next((p for p in folder.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise TrainError(f"{flag} {str(folder)!r} lies under {str(parent)!r}, which is a file; expected a folder path")


def _check_place(output: Path, inputs: Sequence[tuple[str, str | None]]) -> None:
    where = output.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, where):
        what = "the working directory" if where == cwd else "a folder holding the working directory"
        raise TrainError(
            f"--output {str(output)!r} is {what}; a run owns its output folder (--overwrite replaces it), so give "
            "it a folder of its own, e.g. --output runs/NAME"
        )
    for label, value in inputs:
        if value is None:
            continue
        source = Path(value).expanduser()
        if not source.exists():
            continue
        if _is_within(source.resolve(), where):
            what = "is" if source.resolve() == where else "holds"
            raise TrainError(
                f"--output {str(output)!r} {what} the {label} {value!r}; a run owns its output folder (--overwrite "
                "replaces it), so give it a folder of its own, e.g. --output runs/NAME"
            )
    if output.exists() and not output.is_dir():
        raise TrainError(f"--output {str(output)!r} is a file; expected a folder (new, empty, or a padless run)")
    refuse_under_file(output, "--output")  # mkdir would fail there, after the model has loaded


def read_marker(output: Path) -> dict[str, Any] | None:
    """The run folder's marker (None when there is none); a damaged one is a TrainError."""
    path = output / MARKER
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainError(f"{str(path)!r} cannot be read ({error}); it is damaged. Choose a new --output") from error
    if not isinstance(value, dict) or not isinstance(value.get("outputs", []), list):
        raise TrainError(f"{str(path)!r} is not a padless run marker; choose a new --output")
    return value


def _write_marker(output: Path, marker: dict[str, Any]) -> None:
    tmp = output / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, output / MARKER)


def record_outputs(output: str | os.PathLike, names: Iterable[str]) -> None:
    """Add ``names`` (top-level output files about to be written) to the run folder's marker."""
    output = Path(output)
    marker = read_marker(output) or {"format": "padless-run", "version": 1, "outputs": []}
    marker["outputs"] = sorted(set(marker.get("outputs", [])) | set(names))
    _write_marker(output, marker)


def _entries(output: Path, marker: dict[str, Any] | None) -> tuple[list[Path], list[Path]]:
    """(entries a padless run wrote, other entries) at the top of ``output``."""
    ours = set(_FIXED) | set(_DERIVED) | {str(n) for n in (marker or {}).get("outputs", [])}
    mine, other = [], []
    for entry in sorted(output.iterdir()):
        (mine if entry.name in ours else other).append(entry)
    return mine, other


def _steps_logged(output: Path) -> int:
    path = output / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            steps = max(steps, record["step"])
    return steps


def plan_output(
    cfg: TrainConfig, output: Path, settings: dict[str, Any], *, inputs: Sequence[tuple[str, str | None]]
) -> OutputPlan:
    """Decide what this run does with ``output`` (read-only: every rank calls it); TrainError when it may not."""
    _check_place(output, inputs)
    name = repr(str(output))
    if not output.exists() or not any(output.iterdir()):
        if cfg.resume:
            raise TrainError(f"--resume: {name} holds no run (no checkpoint); start without --resume")
        return OutputPlan(output, "new")
    marker = read_marker(output)
    mine, other = _entries(output, marker)
    checkpoint = latest_checkpoint(output)
    steps = _steps_logged(output)
    finished = (output / "summary.json").is_file()

    def shown(entries: list[Path]) -> str:
        return ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")

    if marker is None and not (cfg.resume and checkpoint is not None and not finished):
        flag = "--overwrite: " if cfg.overwrite else ""
        raise TrainError(
            f"{flag}--output {name} is not empty and is not a padless run folder (no {MARKER}; it holds "
            f"{shown(sorted(output.iterdir()))}); "
            "padless writes a run only into a new or empty folder or its own run folder, and replaces nothing "
            "else: choose a new --output"
        )
    if cfg.overwrite:
        if other:
            raise TrainError(
                f"--overwrite: {name} also holds files a padless run did not write ({shown(other)}); nothing was "
                "deleted. Move them out of the folder or choose a new --output"
            )
        return OutputPlan(output, "overwrite", clear=tuple(mine))
    if finished:
        if cfg.resume:
            raise TrainError(
                f"--resume: the run in {name} is finished ({steps} steps; summary.json); nothing to continue. "
                "Choose a new --output to train again, or --overwrite to replace it"
            )
        raise TrainError(
            f"--output {name} holds a finished run ({steps} steps); pass --overwrite to replace it, or choose a "
            "new --output"
        )
    if checkpoint is None and steps == 0:  # a run whose set-up failed: nothing in it is worth keeping
        return OutputPlan(output, "new", clear=tuple(mine))
    if not cfg.resume:
        last = f"last checkpoint {checkpoint.name}" if checkpoint is not None else "no checkpoint"
        raise TrainError(
            f"--output {name} holds an unfinished run ({steps} steps logged, {last}); pass --resume to continue "
            "it, --overwrite to replace it, or choose a new --output"
        )
    if checkpoint is None:
        note = (
            f"note: --resume: {name} holds no checkpoint ({steps} steps were logged before it stopped); starting "
            "again from step 0"
        )
        return OutputPlan(output, "restart", clear=tuple(mine), notes=[note])
    saved = read_checkpoint_settings(checkpoint)
    differences = settings_differences(saved, settings)
    refused = [(setting, text) for setting, text in differences if setting not in cfg.resume_changed_set]
    if refused:
        names = [setting for setting, _ in refused]
        if all(setting in RESUME_CHANGEABLE for setting in names):
            fix = f"pass --resume-changed {','.join(names)} to continue with the new values, or resume with the run's"
        else:
            fix = "resume with the run's"
        raise TrainError(
            f"--resume: this run's settings differ from those of the run in {name} ({checkpoint.name}): "
            f"{'; '.join(text for _, text in refused)}. {fix[0].upper() + fix[1:]} settings, or choose a new --output"
        )
    changed = tuple(setting for setting, _ in differences)
    notes = [f"note: --resume with changed settings: {'; '.join(text for _, text in differences)}"] if changed else []
    return OutputPlan(output, "resume", checkpoint=checkpoint, changed=changed, notes=notes)


def apply_output_plan(plan: OutputPlan) -> None:
    """Rank 0: delete the planned padless entries, create the folder, write (or keep) the marker."""
    import shutil

    for entry in plan.clear:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    plan.output.mkdir(parents=True, exist_ok=True)
    if plan.action == "resume" and read_marker(plan.output) is not None:
        return
    _write_marker(plan.output, {"format": "padless-run", "version": 1, "outputs": []})


# How this invocation treated an existing folder, not what it trains: a replay starts a new run, and replaces or
# continues a folder only when asked to.
_NOT_REPLAYED = ("resume", "resume_changed", "overwrite")


def save_run_config(cfg: TrainConfig, plan: OutputPlan) -> Path:
    """Rank 0, before the first step: the resolved settings as ``OUTPUT/config.yaml`` (every field; ``output`` the
    folder actually used; ``resume``, ``resume_changed`` and ``overwrite`` off). Paths are kept as given, so a
    replay runs from the same working directory. Returns the file's path."""
    saved = dataclasses.replace(cfg, output=str(plan.output))
    path = plan.output / SAVED_CONFIG_NAME
    header = [
        "The train run settings of this run (defaults, --config file and options, resolved).",
        "Replay from the same working directory (relative paths are relative to it):",
        f"  train run --config {path} --output NEW_FOLDER",
    ]
    if plan.changed:
        header.append(
            f"This run was resumed from {plan.checkpoint.name if plan.checkpoint else 'a checkpoint'} with changed "
            f"settings ({', '.join(plan.changed)}); a replay trains every step with the values below."
        )
    return write_config_file(saved, path, header=header, reset=_NOT_REPLAYED)
