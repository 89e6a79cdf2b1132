"""Checkpoints: everything an exact ``--resume`` needs.

A checkpoint is a folder ``OUTPUT/checkpoints/step-00000010/`` holding the trainable parameters
(``trainable.safetensors``: the LoRA weights, or every weight under ``--full``), ``optimizer.pt`` (tensors,
numbers and strings only: it loads with ``torch.load(weights_only=True)``, never unpickling code),
``scheduler.json``, ``rng-rank{r}.json`` (Python, numpy, torch CPU and CUDA generators of each rank) and
``state.json`` (step, data position = epoch and micro-batch index, the run's settings, the config). Nothing in
it needs pickle to load. It is written into a temp folder and renamed into place with ``os.replace``, then
``checkpoints/latest`` (a one-line file, also replaced atomically) names it: a crash or a full disk mid-write
leaves the previous checkpoint intact and current. With ``--keep-last N`` older whole checkpoints are deleted
once a new one is in place and named by ``latest``, never the one ``latest`` names. A checkpoint that is
incomplete, unreadable, holding other contents than padless writes, or written by another kind of run raises
:class:`TrainError` naming the file and the fix.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from padless.shards.cli_config import one_line

from .config import TrainConfig, TrainError

__all__ = [
    "Position",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_checkpoint_settings",
    "read_checkpoint_step",
    "save_checkpoint",
    "trainable_state",
]


@dataclass(frozen=True)
class Position:
    """Where training stands: ``step`` optimizer steps done; the next micro-batch is ``micro_batch`` of ``epoch``."""

    step: int
    epoch: int
    micro_batch: int


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors: gather the full value before saving.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _is_sharded(model: torch.nn.Module) -> bool:
    """True when FSDP2 has turned the parameters into DTensor shards."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with full (unsharded) tensors keyed by parameter name: a collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name, detached, contiguous, on the CPU."""
    return {
        name: _full(p.detach()).to("cpu", copy=True).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _rng_state() -> dict[str, Any]:
    """Every generator's state as JSON values (torch's byte states in base64)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [name, np_keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


# state.json's "checkpoint_format": 2 = no pickle anywhere (JSON scheduler and RNG, weights-only optimizer file).
CHECKPOINT_FORMAT = 2


def _write_error_types() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


def save_checkpoint(
    output: str | os.PathLike,
    position: Position,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    *,
    rank: int = 0,
    barrier: Any = None,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step-{position.step}`` atomically; every rank calls it (rank 0 writes the shared parts).

    ``settings``: the run's settings (``run_folder.run_settings``) that ``--resume`` compares. A write that fails
    (a full disk) removes the partial temp folder and raises :class:`TrainError`; the previous checkpoint stays
    current.
    """
    from safetensors.torch import save_file

    root = Path(output) / "checkpoints"
    final = root / f"step-{position.step:08d}"
    tmp = root / f".tmp-step-{position.step:08d}"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if barrier:
            barrier()
        state = trainable_state(model)  # collective under FSDP: every rank takes part
        sharded = _is_sharded(model)
        # FSDP2's optimizer state is sharded like the parameters: gather it by parameter name (also a collective).
        optim_state = _full_optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
        _write_json(tmp / f"rng-rank{rank}.json", _rng_state())
        if rank == 0:
            save_file(state, str(tmp / "trainable.safetensors"))
            torch.save(optim_state, tmp / "optimizer.pt")
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
            meta = {
                **dataclasses.asdict(position),
                "checkpoint_format": CHECKPOINT_FORMAT,
                "optimizer_format": _OPTIM_FSDP if sharded else _OPTIM_PLAIN,
                "settings": settings or {},
                "config": dataclasses.asdict(cfg),
            }
            _write_json(tmp / "state.json", meta)  # last: a folder with state.json is complete
        if barrier:
            barrier()
        if rank == 0:
            old = root / f".old-step-{position.step:08d}"
            if final.exists():  # the same step again: keep it until its replacement is in place
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)  # the checkpoint appears whole or not at all
            _atomic_write_text(root / "latest", final.name + "\n")
            shutil.rmtree(old, ignore_errors=True)
    except _write_error_types() as error:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(output)
        kept = (
            f"the previous checkpoint {previous.name} is intact (continue from it with --resume)"
            if previous is not None
            else "no earlier checkpoint exists"
        )
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise TrainError(
            f"cannot write checkpoint {final.name} into {str(root)!r} ({reason}); {kept}. Free disk space, or "
            "write checkpoints less often (--save-every)"
        ) from error
    if rank == 0:
        prune_checkpoints(output, keep=cfg.keep_last)
    if barrier:
        barrier()
    return final


def prune_checkpoints(output: str | os.PathLike, *, keep: int) -> list[Path]:
    """Delete the whole ``step-*`` checkpoints older than the newest ``keep`` (0 = keep all); the one ``latest``
    names is always kept, and temp or incomplete folders are left alone. Returns the deleted folders."""
    root = Path(output) / "checkpoints"
    if keep <= 0 or not root.is_dir():
        return []
    current = latest_checkpoint(output)
    whole = sorted(p for p in root.iterdir() if _STEP_NAME.fullmatch(p.name) and (p / "state.json").is_file())
    doomed = [p for p in whole[:-keep] if p != current]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


_STEP_NAME = re.compile(r"step-(\d{8})")


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names; without a usable pointer, the highest complete ``step-*``.

    Only whole checkpoints count: they appear by renaming a finished temp folder, and hold ``state.json``.
    """
    root = Path(output) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if _STEP_NAME.fullmatch(name) and (root / name / "state.json").is_file():
            return root / name
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.iterdir() if _STEP_NAME.fullmatch(p.name) and (p / "state.json").is_file())
    return steps[-1] if steps else None


_OPTIM_PLAIN, _OPTIM_FSDP = "torch", "full-by-name"


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no pickle


def _json_load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _read(path: Path, load: Callable[[Path], Any]) -> Any:
    """``load(path)``; a file that cannot be read back (truncated, corrupted) is a TrainError naming it."""
    from safetensors import SafetensorError

    try:
        return load(path)
    except (
        OSError,
        EOFError,
        RuntimeError,
        pickle.UnpicklingError,
        ValueError,
        UnicodeDecodeError,
        SafetensorError,
    ) as error:
        raise TrainError(
            f"checkpoint file {str(path)!r} cannot be read ({one_line(error)}); it is damaged. Remove its checkpoint "
            "folder and point checkpoints/latest at an earlier one, or start without --resume"
        ) from error


def _damaged(path: Path, what: str, error: BaseException | str) -> TrainError:
    """The error for a checkpoint file that reads but does not hold what padless wrote there."""
    if isinstance(error, KeyError):
        detail = f"no {error.args[0]!r}"
    else:
        detail = error if isinstance(error, str) else one_line(error)
    return TrainError(
        f"checkpoint file {str(path)!r} does not hold {what} ({detail}); it is damaged. Remove its checkpoint folder "
        "and point checkpoints/latest at an earlier one, or start without --resume"
    )


def _read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, checked to be one this padless writes."""
    meta = _read(path / "state.json", _json_load)
    if not isinstance(meta, dict) or not {"step", "epoch", "micro_batch"} <= set(meta):
        raise TrainError(
            f"checkpoint {str(path)!r}: state.json lacks step/epoch/micro_batch; it is damaged or not a padless one"
        )
    bad = {k: meta[k] for k in ("step", "epoch", "micro_batch") if type(meta[k]) is not int or meta[k] < 0}
    if bad:
        raise _damaged(path / "state.json", "a training position", f"expected counts >= 0, got {bad}")
    if meta.get("checkpoint_format") != CHECKPOINT_FORMAT:
        raise TrainError(
            f"checkpoint {str(path)!r} is of format {meta.get('checkpoint_format', 1)}, this padless reads format "
            f"{CHECKPOINT_FORMAT} (earlier checkpoints keep optimizer and RNG state as pickle, which is not loaded); "
            "finish the run with the padless that wrote it, or start again with --overwrite"
        )
    return meta


def read_checkpoint_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The run settings a checkpoint was written with (what ``--resume`` compares)."""
    settings = _read_state(Path(path)).get("settings")
    return settings if isinstance(settings, dict) else {}


def read_checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer steps done when the checkpoint was written: a resumed run continues after this step."""
    return int(_read_state(Path(path))["step"])


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, rank: int = 0
) -> Position:
    """Restore parameters, optimizer, scheduler and RNG from ``path``; return the data position to continue at."""
    from safetensors.torch import load_file

    path = Path(path)
    needed = ["trainable.safetensors", "optimizer.pt", "scheduler.json", "state.json"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise TrainError(
            f"checkpoint {str(path)!r} lacks {missing}; it is incomplete. Remove it and resume from another"
        )
    saved = _read(path / "trainable.safetensors", lambda p: load_file(str(p)))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    shapes = {name: tuple(p.shape) for name, p in params.items()}  # a DTensor's shape is the full shape
    if set(saved) != set(params) or any(tuple(t.shape) != shapes[name] for name, t in saved.items()):
        diff = (
            sorted(set(saved) ^ set(params))[:5]
            or [
                f"{name} {tuple(t.shape)} vs {shapes[name]}"
                for name, t in saved.items()
                if tuple(t.shape) != shapes[name]
            ][:3]
        )
        raise TrainError(
            f"checkpoint {str(path)!r} does not fit this model (parameters differ, e.g. {diff}); resume with the "
            "same --model, mode, --lora-r and --target-modules as the run that wrote it"
        )
    meta = _read_state(path)
    sharded = _is_sharded(model)
    fmt = meta.get("optimizer_format", _OPTIM_PLAIN)
    if (fmt == _OPTIM_FSDP) != sharded:
        raise TrainError(
            f"checkpoint {str(path)!r} was written {'with' if fmt == _OPTIM_FSDP else 'without'} --fsdp; resume "
            f"it the same way (this run is {'with' if sharded else 'without'} --fsdp)"
        )
    optim_state = _read(path / "optimizer.pt", _torch_load)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, saved, options=full)  # every rank keeps its own shard of the full tensors
        set_optimizer_state_dict(model, optimizer, optim_state, options=full)
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name].to(p.device, p.dtype))
        if not isinstance(optim_state, dict) or not {"state", "param_groups"} <= set(optim_state):
            raise _damaged(path / "optimizer.pt", "an optimizer state", "no 'state' and 'param_groups'")
        try:
            optimizer.load_state_dict(optim_state)
        except ValueError as error:  # torch: the saved parameter groups do not match this optimizer's
            raise TrainError(
                f"checkpoint {str(path)!r} holds optimizer state of another set-up ({error}); resume with the same "
                "--optimizer and --weight-decay as the run that wrote it"
            ) from error
        except (KeyError, TypeError, AttributeError, IndexError) as error:  # the right keys, wrong contents
            raise _damaged(path / "optimizer.pt", "an optimizer state", error) from error
    schedule = _read(path / "scheduler.json", _json_load)
    # LambdaLR.load_state_dict copies any dict into the scheduler's attributes: check the fields the schedule uses.
    if not isinstance(schedule, dict) or type(schedule.get("last_epoch")) is not int:
        raise _damaged(path / "scheduler.json", "a learning-rate schedule", "no int last_epoch")
    try:
        scheduler.load_state_dict(schedule)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _damaged(path / "scheduler.json", "a learning-rate schedule", error) from error
    rng = path / f"rng-rank{rank}.json"
    if rng.is_file():
        state = _read(rng, _json_load)
        try:
            _set_rng_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise _damaged(rng, "generator states", error) from error
    return Position(step=int(meta["step"]), epoch=int(meta["epoch"]), micro_batch=int(meta["micro_batch"]))
