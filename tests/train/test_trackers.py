"""``--report-to``: TensorBoard, W&B (offline) and MLflow receive what ``metrics.jsonl`` has, read back from the
files each library wrote; a resumed run continues them; a missing library is one error before any work."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from padless.train.cli import main
from padless.train.config import TrainConfig, TrainError
from padless.train.loop import train
from padless.train.trackers import start_trackers
from tests.user_errors import assert_one_line_error

from .runs import CLI_FAST, base_config, run_interrupted


def _metrics(run: Path) -> tuple[dict[int, dict], dict[int, float]]:
    """metrics.jsonl as {step: training record} and {step: eval_loss}."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return (
        {r["step"]: r for r in records if "loss" in r},
        {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r},
    )


def _tensorboard(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], set[str]]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, set(acc.PluginTagToContent("hparams"))


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (a LevelDB-style log: 7-byte file header, then 32 KiB blocks of
    records, each with a 7-byte header: CRC32C, little-endian length, type FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(run_file: Path) -> tuple[dict[str, dict[int, float]], dict[str, object]]:
    history: dict[str, dict[int, float]] = {}
    config: dict[str, object] = {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, {})[step] = json.loads(item.value_json)
        elif kind in ("run", "config"):  # the run record carries the config given to wandb.init
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    return history, config


def test_report_to_names_are_checked() -> None:
    assert TrainConfig(shards="x", report_to="TensorBoard, mlflow,none").report_to_list == ("tensorboard", "mlflow")
    assert TrainConfig(shards="x", report_to="none").report_to_list == ()
    with pytest.raises(TrainError, match=r"--report-to 'tensorboard,comet': unknown tracker 'comet'; expected"):
        TrainConfig(shards="x", report_to="tensorboard,comet")
    with pytest.raises(TrainError, match=r"--report-to ',': no tracker named; expected"):
        TrainConfig(shards="x", report_to=",")


def test_a_missing_tracker_library_is_one_error_naming_the_install(
    synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as when it is not installed
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(out), *CLI_FAST, "--report-to",
                                    "tensorboard,wandb"])  # fmt: skip
    line = assert_one_line_error(res, r"--report-to tensorboard,wandb: wandb is not installed")
    assert "pip install 'padless[trackers]'" in line and "pip install wandb" in line
    assert not out.exists()


def test_trackers_get_the_metrics_jsonl_scalars_and_continue_on_resume(
    synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    settings = dict(max_steps=4, save_every=2, eval_every=2, report_to="tensorboard,wandb,mlflow")
    # Stopped after step 3 (checkpoint at 2): the resumed run logs steps 3 and 4 again.
    run_interrupted(base_config(synthetic_shards, out, **settings), after_step=3)
    result = train(base_config(synthetic_shards, out, resume=True, **settings))
    steps, evals = _metrics(out)
    assert sorted(steps) == [1, 2, 3, 4] and sorted(evals) == [2, 4]
    assert any("will hold no tokenizer" in w for w in result.warnings)  # synthetic shards name no tokenizer

    # TensorBoard: one value per step (the interrupted run's step 3 was purged), equal to metrics.jsonl's.
    scalars, hparams = _tensorboard(out / "tensorboard")
    for name, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                      ("train/tokens_per_s", "tokens_per_s"), ("train/peak_mem_gib", "peak_mem_gib"),
                      ("train/trainable_tokens_per_s", "trainable_tokens_per_s"),
                      ("train/step_time_s", "step_time_s")]:  # fmt: skip
        assert [s for s, _ in scalars[name]] == [1, 2, 3, 4], name
        assert [v for _, v in scalars[name]] == pytest.approx([steps[s][key] for s in (1, 2, 3, 4)], rel=1e-6)
    assert scalars["eval/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in sorted(evals.items())]
    assert "train/mfu" not in scalars  # None on a CPU: left out, as in the summary
    assert "_hparams_/experiment" in hparams

    # W&B (offline): both runs share one run id; together their history is metrics.jsonl's.
    ids = json.loads((out / "trackers.json").read_text())
    run_files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and all(f.name == f"run-{ids['wandb_run_id']}.wandb" for f in run_files)
    history: dict[str, dict[int, float]] = {}
    for run_file in run_files:
        part, config = _wandb_history(run_file)
        assert config["lr"] == pytest.approx(3e-3) and config["tokens_per_micro_batch"] == 128
        for key, values in part.items():
            history.setdefault(key, {}).update(values)
    assert history["train/loss"] == pytest.approx({s: r["loss"] for s, r in steps.items()}, rel=1e-6)
    assert history["eval/loss"] == pytest.approx(evals, rel=1e-6)

    # MLflow (default store: sqlite in the run folder): one run, continued; the last value at each step.
    client = MlflowClient(tracking_uri=ids["mlflow_tracking_uri"])
    assert ids["mlflow_tracking_uri"] == f"sqlite:///{(out / 'mlflow.db').resolve()}"
    run = client.get_run(ids["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.003" and run.data.params["report_to"] == "tensorboard,wandb,mlflow"
    logged = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))
    last = {m.step: m.value for m in logged}
    assert last == pytest.approx({s: r["loss"] for s, r in steps.items()}, rel=1e-6)
    eval_logged = client.get_metric_history(run.info.run_id, "eval/loss")
    assert {m.step: m.value for m in eval_logged} == pytest.approx(evals, rel=1e-6)

    # --overwrite replaces the trackers' files as the run's own.
    train(base_config(synthetic_shards, out, overwrite=True, max_steps=1))
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists() and not (out / "mlflow.db").exists()


def test_mlflow_honours_a_given_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    out = tmp_path / "run"
    out.mkdir()
    trackers = start_trackers(["mlflow"], out, hyperparameters={"lr": 0.1, "model": None})
    trackers.log({"step": 1, "loss": 2.5, "mfu": None})
    trackers.log({"step": 1, "eval_loss": 2.75})
    trackers.close()
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert run.data.metrics == {"train/loss": 2.5, "eval/loss": 2.75}
    assert run.data.params == {"lr": "0.1", "model": "none"}
    assert not (out / "mlflow.db").exists()
