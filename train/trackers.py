"""``--report-to``: the scalars of ``metrics.jsonl`` and the run config, also sent to TensorBoard, W&B or MLflow.

Each tracker goes through its own maintained library, imported only when asked (none is imported on the default
path). Only rank 0 logs. Every record that ``metrics.jsonl`` gets is logged at its ``step``: a training step's
``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``trainable_tokens_per_s``, ``mfu``, ``peak_mem_gib``,
``step_time_s``, ... as ``train/<name>``, an evaluation's ``eval_loss`` as ``eval/loss`` (``None`` values, such as
MFU on a CPU, are left out). The resolved config is logged once as hyperparameters.

Where each writes, by default inside the run folder (``train.run_folder`` counts these names as the run's own):

- ``tensorboard``: event files in ``OUTPUT/tensorboard/`` (``torch.utils.tensorboard``, needs ``tensorboard``);
- ``wandb``: ``wandb.init(dir=OUTPUT)``, so ``OUTPUT/wandb/``; the project is ``WANDB_PROJECT`` or ``padless``,
  ``WANDB_MODE=offline`` keeps the run local (``wandb sync`` uploads it later);
- ``mlflow``: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///OUTPUT/mlflow.db`` (``mlflow ui`` in OUTPUT opens
  it); experiment ``MLFLOW_EXPERIMENT_NAME`` or ``padless``.

``OUTPUT/trackers.json`` keeps the W&B and MLflow run ids, so ``--resume`` continues the same tracker runs; the
TensorBoard writer purges the events past the checkpoint it resumes from. MLflow and W&B cannot drop logged points:
for the steps an interrupted run logged past its checkpoint, MLflow keeps both runs' values and W&B online the
interrupted run's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from padless.shards.cli_config import one_line

from .config import TrainError

__all__ = ["INSTALL_HINT", "Trackers", "check_installed", "scalars", "start_trackers"]

INSTALL_HINT = "pip install 'padless[trackers]'"
_IDS = "trackers.json"
# The import names each tracker needs, and the package that provides each.
_NEEDS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "mlflow": ("mlflow",)}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "sqlalchemy": "sqlalchemy",
             "alembic": "alembic"}  # fmt: skip


def _mlflow_default_store() -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI")


def check_installed(names: Sequence[str]) -> None:
    """Raise one TrainError naming the pip install when a tracker's library is not importable (no import here)."""
    missing = []
    for name in names:
        needed = list(_NEEDS[name])
        if name == "mlflow" and _mlflow_default_store():
            needed += ["sqlalchemy", "alembic"]  # the default sqlite store (full mlflow has them; mlflow-skinny not)
        missing += [module for module in needed if importlib.util.find_spec(module) is None]
    if missing:
        packages = " ".join(dict.fromkeys(_PACKAGES[m] for m in missing))
        raise TrainError(
            f"--report-to {','.join(names)}: {', '.join(missing)} is not installed; run `{INSTALL_HINT}` (or "
            f"`pip install {packages}`), or leave it out of --report-to"
        )


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` record as tracker scalars: ``eval_x`` -> ``eval/x``, anything else -> ``train/x``."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            continue
        out["eval/" + key[5:] if key.startswith("eval_") else "train/" + key] = float(value)
    return out


def _flat(value: Any) -> str | int | float | bool:
    """A hyperparameter value the trackers' param stores take (None and containers as text)."""
    if isinstance(value, bool | int | float | str):
        return value
    return "none" if value is None else json.dumps(value)


class _TensorBoard:
    def __init__(self, output: Path, hyperparameters: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: a resumed run drops the events the interrupted one wrote after its checkpoint.
        self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if not resume_step:
            # The hparams plugin's summaries go into this run's own event file (add_hparams would start a sub-run).
            for summary in hparams({k: _flat(v) for k, v in hyperparameters.items()}, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(hyperparameters, indent=2, default=str) + "\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output: Path, hyperparameters: dict[str, Any], ids: dict[str, Any]) -> None:
        import wandb

        run_id = ids.get("wandb_run_id")
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "padless",
                name=output.resolve().name,
                dir=str(output),
                config=hyperparameters,
                id=run_id,
                resume="allow" if run_id else None,
            )
        except (wandb.errors.Error, OSError) as error:
            raise TrainError(
                f"--report-to wandb: W&B could not start a run ({one_line(error)}); log in with `wandb login`, or set "
                "WANDB_MODE=offline to keep the run in the output folder"
            ) from error
        ids["wandb_run_id"] = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, output: Path, hyperparameters: dict[str, Any], ids: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str((output / "mlflow.db").resolve())
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "padless"
        try:
            self.client = MlflowClient(tracking_uri=uri)
            run_id = ids.get("mlflow_run_id") if ids.get("mlflow_tracking_uri") == uri else None
            if run_id is None:
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = (
                    experiment.experiment_id
                    if experiment is not None
                    else self.client.create_experiment(name, artifact_location=(output / "mlruns").resolve().as_uri())
                )
                run_id = self.client.create_run(experiment_id, run_name=output.resolve().name).info.run_id
                params = [Param(k, str(_flat(v))) for k, v in hyperparameters.items()]
                self.client.log_batch(run_id, params=params)
            else:
                self.client.update_run(run_id, status="RUNNING")
        except MlflowException as error:
            raise TrainError(
                f"--report-to mlflow: MLflow cannot log to {uri!r} ({one_line(error)}); set MLFLOW_TRACKING_URI to a "
                "store you can reach, or unset it to log into the output folder"
            ) from error
        self.run_id = run_id
        ids.update(mlflow_run_id=run_id, mlflow_tracking_uri=uri)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """The started trackers of this process (none on ranks other than 0, or without ``--report-to``)."""

    def __init__(self, backends: Sequence[Any] = ()) -> None:
        self.backends = list(backends)

    def log(self, record: dict[str, Any]) -> None:
        """Log one ``metrics.jsonl`` record at its step."""
        values = scalars(record)
        if values:
            for backend in self.backends:
                backend.log(values, int(record["step"]))

    def close(self) -> None:
        """Flush and finish every tracker run (also after a failed run, so its data is kept)."""
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()


def start_trackers(
    names: Sequence[str], output: Path, *, hyperparameters: dict[str, Any], resume_step: int | None = None
) -> Trackers:
    """Start the trackers ``names`` writing for the run in ``output`` (rank 0 only; ``resume_step``: the step a
    resumed run continues from). The run ids go to ``output/trackers.json`` so a resumed run continues them."""
    if not names:
        return Trackers()
    check_installed(names)
    ids_path = output / _IDS
    ids: dict[str, Any] = {}
    if resume_step and ids_path.is_file():
        try:
            ids = json.loads(ids_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            ids = {}  # damaged: start new tracker runs rather than refuse to resume the training
        ids = ids if isinstance(ids, dict) else {}
    started = Trackers()
    try:
        for name in names:
            if name == "tensorboard":
                started.backends.append(_TensorBoard(output, hyperparameters, resume_step))
            elif name == "wandb":
                started.backends.append(_WandB(output, hyperparameters, ids))
            else:
                started.backends.append(_MLflow(output, hyperparameters, ids))
    except BaseException:
        started.close()
        raise
    tmp = ids_path.with_name(_IDS + ".tmp")
    tmp.write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, ids_path)
    return started
