"""``train run --config``: every run saves its resolved settings as ``OUTPUT/config.yaml`` (an interrupted run
too), and a run from that file alone, into another folder, logs the same losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from padless.train.cli import main
from padless.train.config import TrainConfig
from tests.user_errors import assert_one_line_error

from .runs import CLI_FAST, base_config, run_interrupted

# Settings unlike the defaults, so a replay that dropped any of them would log other losses.
FLAGS = ["--max-steps", "2", "--lr", "5e-3", "--seed", "3", "--lora-r", "4", "--lora-alpha", "8", "--grad-accum",
         "2", "--tokens-per-micro-batch", "200", "--warmup-steps", "1", "--weight-decay", "0.1"]  # fmt: skip


def _run(*args: str):
    r = CliRunner().invoke(main, ["run", *args])
    assert r.exit_code == 0, r.output
    return r


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_run_replayed_from_its_config_yaml_logs_the_same_losses(
    synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(synthetic_shards)
    _run("data", "--output", "a", *FLAGS, *CLI_FAST)
    text = (tmp_path / "a" / "config.yaml").read_text()
    assert "train run --config a/config.yaml --output NEW_FOLDER" in text
    saved = yaml.safe_load(text)
    assert set(saved) == {f for f in TrainConfig.__dataclass_fields__}
    assert (saved["shards"], saved["output"], saved["mode"], saved["lr"], saved["grad_accum"]) == (
        "data", "a", "lora", 5e-3, 2  # paths as given: relative stays relative
    )  # fmt: skip

    _run("--config", "a/config.yaml", "--output", "b")
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [1, 2]
    for key in ("loss", "lr", "grad_norm", "trainable_tokens"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # exact on CPU
    assert (tmp_path / "b" / "config.yaml").read_text() == text.replace("a/config.yaml", "b/config.yaml").replace(
        "output: a\n", "output: b\n"
    )

    # An option given with the file wins over it: another learning rate, other losses after step 1.
    _run("--config", "a/config.yaml", "--output", "c", "--lr", "1e-3", "--full")
    c = _metrics(tmp_path / "c")
    assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["mode"] == "full"
    assert c[0]["lr"] != a[0]["lr"] and c[1]["loss"] != a[1]["loss"]


def test_a_replay_into_the_run_s_own_folder_is_refused(synthetic_shards: Path, tmp_path: Path) -> None:
    _run(str(synthetic_shards), "--output", str(tmp_path / "a"), "--max-steps", "1", *CLI_FAST)
    r = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "a" / "config.yaml")])
    assert_one_line_error(r, r"holds a finished run \(1 steps\); pass --overwrite to replace it")


def test_an_interrupted_run_has_its_config_and_overwrite_owns_it(synthetic_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_interrupted(base_config(synthetic_shards, out, max_steps=3, save_every=1), after_step=1)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["max_steps"], saved["save_every"], saved["resume"]) == (3, 1, False)
    # --resume and --overwrite say how one invocation treats the folder; they are never saved on.
    _run("--config", str(out / "config.yaml"), "--resume", "--resume-changed", "max_steps", "--max-steps", "2")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["max_steps"], saved["resume"], saved["resume_changed"]) == (2, False, None)
    assert "was resumed from step-00000001 with changed settings (max_steps)" in (out / "config.yaml").read_text()
    _run("--config", str(out / "config.yaml"), "--overwrite", "--max-steps", "1")  # config.yaml is the run's own
    assert [r["step"] for r in _metrics(out)] == [1]
    assert yaml.safe_load((out / "config.yaml").read_text())["overwrite"] is False


def test_tokens_per_micro_batch_auto_in_a_file(tmp_path: Path) -> None:
    from padless.shards.config_file import read_config_file, write_config_file

    (tmp_path / "run.yaml").write_text("shards: s\ntokens_per_micro_batch: auto\nmax_memory_gib: 20\n")
    cfg = TrainConfig(**read_config_file(TrainConfig, tmp_path / "run.yaml"))
    assert (cfg.tokens_per_micro_batch, cfg.max_memory_gib) == ("auto", 20.0)
    assert TrainConfig(**read_config_file(TrainConfig, write_config_file(cfg, tmp_path / "back.yaml"))) == cfg
    (tmp_path / "run.yaml").write_text("shards: s\ntokens_per_micro_batch: some\n")
    r = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "run.yaml")])
    assert_one_line_error(r, r"tokens_per_micro_batch='some' \(--tokens-per-micro-batch\): expected an int or 'auto'$")


def test_lists_and_mappings_in_a_file_equal_the_command_line_strings(tmp_path: Path) -> None:
    """target_modules / report_to / resume_changed as YAML lists and model_overrides as a mapping give the same config
    as the comma lists and JSON object of the command line, and the saved config reads back as that config."""
    from padless.shards.config_file import read_config_file, write_config_file

    (tmp_path / "run.yaml").write_text(
        "shards: s\ntarget_modules: [q_proj, v_proj]\nreport_to:\n  - tensorboard\nresume: true\n"
        "output: o\nresume_changed: [lr, max_steps]\n"
        "model_overrides: {num_hidden_layers: 010, rope_theta: 1e4, tie_word_embeddings: false, name: no, x: ~}\n"
    )
    cfg = TrainConfig(**read_config_file(TrainConfig, tmp_path / "run.yaml"))
    want = TrainConfig(shards="s", target_modules="q_proj,v_proj", report_to="tensorboard", resume=True, output="o",
                       resume_changed="lr,max_steps",
                       model_overrides=json.dumps({"num_hidden_layers": 10, "rope_theta": 1.0e4,
                                                   "tie_word_embeddings": False, "name": "no", "x": None}))  # fmt: skip
    assert cfg == want
    assert cfg.target_module_list == ["q_proj", "v_proj"]
    assert TrainConfig(**read_config_file(TrainConfig, write_config_file(cfg, tmp_path / "back.yaml"))) == cfg
    for text, message in [
        ("target_modules: [q_proj, [v_proj]]", r"target_modules=\['q_proj', \['v_proj'\]\] \(--target-modules\): exp"),
        ("target_modules: ['q_proj,k_proj', v_proj]", r"target_modules=\['q_proj,k_proj', 'v_proj'\]"),
        ("report_to: {tensorboard: 1}", r"report_to=\{'tensorboard': 1\} \(--report-to\): expected a string"),
        ("model_overrides: [1, 2]", r"model_overrides=\[1, 2\] \(--model-overrides\): expected a string"),
    ]:
        (tmp_path / "bad.yaml").write_text(f"shards: s\n{text}\n")
        r = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "bad.yaml")])
        assert_one_line_error(r, message)


def test_the_readme_example_is_a_valid_config(tmp_path: Path) -> None:
    from padless.shards.config_file import read_config_file

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("`train run --config run.yaml`", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "run.yaml").write_text(block)
    values = read_config_file(TrainConfig, tmp_path / "run.yaml")
    assert (values["lr"], values["grad_accum"], values["checkpointing"]) == (1e-4, 4, "on")
    assert TrainConfig(**values).shards == "packed/"
    assert TrainConfig(**values).target_module_list == ["q_proj", "v_proj"]
