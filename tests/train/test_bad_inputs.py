"""``train run`` / ``train parity`` on bad input: each ends in exit status 2 and one ``error: ...`` line (or, where
the rule allows it, in a run that does the safe thing), and nothing that padless did not write is deleted.

Rules covered: the output folder (never the working directory, an input or a folder holding one; never a folder
that is not a padless run; ``--overwrite`` replaces only a run's own files), the data (something to learn, every
pack within the micro-batch budget), resuming (finished runs, runs without a checkpoint, changed settings,
checkpoints that need no pickle, a checkpoint killed or cut short by a full disk), the tokenizer (identity by
content, token ids inside the embedding even with ``--force``) and damaged shard sets.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from padless.shards.reader import open_shards
from padless.train.checkpoint import latest_checkpoint
from padless.train.cli import main
from padless.train.config import RESUME_CHANGEABLE, TrainConfig, TrainError
from padless.train.data import pack_sizes
from padless.train.optim import lr_factor
from padless.train.run_folder import MARKER, RESUME_FIXED, RESUME_FREE
from tests.user_errors import assert_one_line_error

from .runs import CLI_FAST, FAST_OVERRIDES, cli_equivalent, run_interrupted, write_synthetic_shards

STEP = "step-{:08d}".format


def _run(shards: Path, output: Path | str, *args: str, cli=main):
    return CliRunner().invoke(cli, ["run", str(shards), "--output", str(output), *CLI_FAST, *args])


def _ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with a hash of its bytes (to show nothing changed)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def _steps(output: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runs(synthetic_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run folders to copy: ``interrupted`` (stopped after step 2 of 3, checkpoints at 1 and 2), ``no_checkpoint``
    (stopped after step 1, none written) and ``finished`` (1 step, done)."""
    root = tmp_path_factory.mktemp("runs")
    run_interrupted(cli_equivalent(synthetic_shards, root / "interrupted", max_steps=3, save_every=1), after_step=2)
    run_interrupted(cli_equivalent(synthetic_shards, root / "no_checkpoint", max_steps=3), after_step=1)
    _ok(_run(synthetic_shards, root / "finished", "--max-steps", "1"))
    return {name: root / name for name in ("interrupted", "no_checkpoint", "finished")}


@pytest.fixture
def copy_run(runs: dict[str, Path], tmp_path: Path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(runs[name], tmp_path / name))

    return copy


# ------------------------------------------------------------------------------------------- the output folder
@pytest.mark.parametrize("where", ["cwd", "parent_of_cwd", "shards", "parent_of_shards", "eval_set", "model"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_is_never_the_working_directory_or_an_input(
    synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, overwrite: bool
) -> None:
    shards = Path(shutil.copytree(synthetic_shards, tmp_path / "data" / "shards"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    output = {"cwd": ".", "parent_of_cwd": "..", "shards": shards, "parent_of_shards": shards.parent,
              "eval_set": shards / "eval", "model": model}[where]  # fmt: skip
    before = _tree(tmp_path)
    extra = ["--model", str(model)] if where == "model" else []
    line = assert_one_line_error(_run(shards, output, *extra, *(["--overwrite"] if overwrite else [])), "^error: ")
    expected = {"cwd": "is the working directory", "parent_of_cwd": "is a folder holding the working directory",
                "shards": "is the shard set", "parent_of_shards": "holds the shard set", "eval_set": "is the eval set",
                "model": "is the model"}[where]  # fmt: skip
    assert expected in line and "give it a folder of its own" in line, line
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_folder_that_is_not_a_run_is_never_written(synthetic_shards: Path, tmp_path: Path, overwrite: bool) -> None:
    """A look-alike (metrics.jsonl and a checkpoints/ folder, but no marker) is someone else's folder."""
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = _tree(out)
    line = assert_one_line_error(
        _run(synthetic_shards, out, *(["--overwrite"] if overwrite else [])), r"is not a padless run folder"
    )
    assert f"no {MARKER}; it holds checkpoints, metrics.jsonl, notes.txt" in line
    assert line.startswith("error: --overwrite: ") == overwrite
    assert _tree(out) == before


def test_output_that_is_a_file(synthetic_shards: Path, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    assert_one_line_error(_run(synthetic_shards, tmp_path / "out"), r"--output '.*out' is a file; expected a folder")
    assert (tmp_path / "out").read_text() == "x"
    line = assert_one_line_error(_run(synthetic_shards, tmp_path / "out" / "run"), r"^error: --output '.*run' lies ")
    assert f"under {str(tmp_path / 'out')!r}, which is a file; expected a folder path" in line
    assert (tmp_path / "out").read_text() == "x"


def test_overwrite_replaces_only_a_run_that_holds_nothing_else(
    synthetic_shards: Path, copy_run, tmp_path: Path
) -> None:
    out = copy_run("interrupted")
    (out / "notes.txt").write_text("added by hand")
    before = _tree(out)
    line = assert_one_line_error(_run(synthetic_shards, out, "--overwrite", "--max-steps", "1"), r"^error: --overwrite")
    assert "also holds files a padless run did not write (notes.txt); nothing was deleted" in line
    assert _tree(out) == before

    (out / "notes.txt").unlink()
    _ok(_run(synthetic_shards, out, "--overwrite", "--max-steps", "1"))
    assert _steps(out) == [1] and not (out / "checkpoints").exists()  # the old run's files are gone
    assert (out / "adapter_config.json").is_file() and "adapter_config.json" in json.loads((out / MARKER).read_text())[
        "outputs"
    ]


def test_a_finished_run_is_replaced_only_with_overwrite(synthetic_shards: Path, copy_run) -> None:
    out = copy_run("finished")
    before = _tree(out)
    assert_one_line_error(_run(synthetic_shards, out, "--max-steps", "1"), r"holds a finished run \(1 steps\); pass -")
    assert _tree(out) == before
    _ok(_run(synthetic_shards, out, "--max-steps", "2", "--overwrite"))
    assert _steps(out) == [1, 2]


def test_a_run_whose_set_up_failed_is_reused(synthetic_shards: Path, tmp_path: Path) -> None:
    """A run that stops after marking its folder but before its first step (here: once the model is built) leaves
    a folder the next run takes without --overwrite."""
    from padless.train.loop import Callbacks, train

    out = tmp_path / "out"

    def fail(_model: torch.nn.Module) -> None:
        raise TrainError("set-up failed")

    with pytest.raises(TrainError, match="set-up failed"):
        train(cli_equivalent(synthetic_shards, out, max_steps=1), callbacks=Callbacks(on_model=fail))
    assert (out / MARKER).is_file() and not (out / "metrics.jsonl").exists()  # marked, but nothing trained
    _ok(_run(synthetic_shards, out, "--max-steps", "1"))
    assert _steps(out) == [1]


# -------------------------------------------------------------------------------------------------- the data
def test_a_shard_set_with_nothing_to_learn(tmp_path: Path) -> None:
    empty = write_synthetic_shards(tmp_path / "masked", examples=20, seed=3, targets=False)
    total = open_shards(empty).manifest["totals"]["tokens"]
    line = assert_one_line_error(_run(empty, tmp_path / "out"), r"has no trainable tokens")
    assert f"(0 of {total} tokens in" in line and "--train-on all" in line
    assert not (tmp_path / "out").exists()  # refused before the model is loaded or anything written


def test_an_eval_set_with_nothing_to_learn(synthetic_shards: Path, tmp_path: Path) -> None:
    empty = write_synthetic_shards(tmp_path / "masked", examples=8, seed=4, targets=False)
    args = ["--eval-shards", str(empty), "--eval-every", "0"]
    assert_one_line_error(_run(synthetic_shards, tmp_path / "out", *args), r"^error: eval set '.*masked' has no train")


def test_eval_every_without_an_eval_set(tmp_path: Path) -> None:
    shards = write_synthetic_shards(tmp_path / "no-eval", examples=20, seed=3)
    line = assert_one_line_error(
        _run(shards, tmp_path / "out", "--eval-every", "2"), r"^error: --eval-every 2 needs an"
    )
    assert "pass --eval-shards, re-run `prep pack` with --eval-fraction, or leave out --eval-every" in line
    assert not (tmp_path / "out").exists()


def test_an_eval_set_of_another_tokenizer(synthetic_shards: Path, tmp_path: Path) -> None:
    def run(eval_set: Path, *args: str):
        return _run(synthetic_shards, tmp_path / "out", "--eval-shards", str(eval_set), "--eval-every", "0", *args)

    # The tokenizers are compared from the manifests before the model loads; token ids past the embedding are
    # refused even with --force.
    wider = write_synthetic_shards(tmp_path / "wider", examples=8, seed=4, vocab=500)
    line = assert_one_line_error(run(wider), r"^error: ")
    assert f"eval set {str(wider)!r} was not tokenized like the training shards (the tokenizers differ" in line
    line = assert_one_line_error(run(wider, "--force"), r"^error: ")
    assert line.startswith(f"error: eval set {str(wider)!r} holds token id 499, but the model's embedding has 384 rows")
    narrower = write_synthetic_shards(tmp_path / "narrower", examples=8, seed=4, vocab=300)
    line = assert_one_line_error(run(narrower), r"^error: ")
    assert f"eval set {str(narrower)!r} was not tokenized like the training shards (the tokenizers differ" in line
    assert not (tmp_path / "out").exists()
    res = run(narrower, "--force", "--max-steps", "1")
    assert "tokenizer mismatch overridden by --force: the tokenizers differ in files" in _ok(res)


def test_a_micro_batch_budget_below_the_longest_pack(synthetic_shards: Path, tmp_path: Path) -> None:
    sizes = pack_sizes(open_shards(synthetic_shards)).num_tokens
    i, n = int(np.argmax(sizes)), int(sizes.max())
    line = assert_one_line_error(
        _run(synthetic_shards, tmp_path / "out", "--tokens-per-micro-batch", str(n - 1)), r"^error: "
    )
    assert f"--tokens-per-micro-batch {n - 1} is smaller than the longest pack" in line
    assert f"(pack {i}: {n} tokens)" in line and f"pass --tokens-per-micro-batch {n} or more" in line
    assert not (tmp_path / "out").exists()
    _ok(_run(synthetic_shards, tmp_path / "out", "--tokens-per-micro-batch", str(n), "--max-steps", "1"))


def test_examples_longer_than_the_model_s_positions(synthetic_shards: Path, tmp_path: Path) -> None:
    """A position table (GPT-2's learned one, GPT-J's precomputed sinusoids) has no row past its end: an error before
    anything is written, from run and parity. Computed (rotary) positions go on: a warning for a patched family and
    for an unpatched architecture (GPT-NeoX), which both train; none where rope scaling extends the positions past
    the example."""
    from transformers import AutoConfig, GPT2LMHeadModel, GPTJForCausalLM, GPTNeoXForCausalLM

    longest = pack_sizes(open_shards(synthetic_shards)).max_seqlen
    config = AutoConfig.for_model("gpt2", vocab_size=384, n_embd=16, n_layer=1, n_head=2, n_positions=longest - 1)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    fast = [a for a in CLI_FAST if a not in ("--model-overrides", FAST_OVERRIDES)]
    res = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(tmp_path / "out"), *fast,
                                    "--model", str(tmp_path / "gpt2"), "--max-steps", "1"])  # fmt: skip
    line = assert_one_line_error(res, r"^error: the shard set '.*shards' holds an example of ")
    assert f"of {longest} tokens, more than the model's {longest - 1} positions" in line
    assert "position table 'transformer.wpe' has no row" in line
    assert f"re-run `prep pack --max-len {longest - 1}`" in line
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(
        main, ["parity", str(synthetic_shards), "--model", str(tmp_path / "gpt2"), "--packs", "99"]
    )
    assert_one_line_error(res, rf"holds an example of {longest} tokens, more than the model's {longest - 1} positions")

    gptj = AutoConfig.for_model("gptj", vocab_size=384, n_embd=16, n_layer=1, n_head=2, rotary_dim=4,
                                n_positions=longest - 1)  # fmt: skip
    GPTJForCausalLM(gptj).save_pretrained(tmp_path / "gptj")  # sinusoids precomputed into a buffer
    res = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(tmp_path / "gptj-out"), *fast,
                                    "--model", str(tmp_path / "gptj"), "--max-steps", "1"])  # fmt: skip
    assert_one_line_error(res, r"position table '.*embed_positions' has no row past them")

    neox = AutoConfig.for_model("gpt_neox", vocab_size=384, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=longest - 1)  # fmt: skip
    GPTNeoXForCausalLM(neox).save_pretrained(tmp_path / "neox")
    res = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(tmp_path / "neox-out"), *fast,
                                    "--model", str(tmp_path / "neox"), "--max-steps", "1"])  # fmt: skip
    assert "warning: the shard set" in _ok(res) and f"positions past {longest - 1} were not seen" in res.stderr

    for extra, warned in [({}, True), ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, False)]:
        overrides = json.dumps({**json.loads(FAST_OVERRIDES), "max_position_embeddings": longest - 1, **extra})
        res = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(tmp_path / f"rope{warned}"),
                                        *fast, "--model-overrides", overrides, "--max-steps", "1"])  # fmt: skip
        assert ("were not seen in pretraining" in _ok(res) + res.stderr) is warned, res.stderr


# ------------------------------------------------------------------------------------------------- resuming
def test_resume_of_a_finished_run_changes_nothing(synthetic_shards: Path, copy_run) -> None:
    out = copy_run("finished")
    before = _tree(out)
    line = assert_one_line_error(_run(synthetic_shards, out, "--resume", "--max-steps", "1"), r"^error: --resume: ")
    assert "is finished (1 steps; summary.json); nothing to continue" in line
    assert _tree(out) == before


def test_a_run_stopped_before_its_first_checkpoint(
    synthetic_shards: Path, runs: dict[str, Path], copy_run, tmp_path: Path
) -> None:
    out = copy_run("no_checkpoint")
    before = _tree(out)
    line = assert_one_line_error(_run(synthetic_shards, out, "--max-steps", "3"), r"holds an unfinished run")
    assert "(1 steps logged, no checkpoint); pass --resume to continue it, --overwrite to replace it" in line
    assert _tree(out) == before

    res = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(out), *CLI_FAST, "--max-steps", "3",
                                    "--resume"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "holds no checkpoint (1 steps were logged before it stopped); starting again from step 0" in res.stderr
    assert _steps(out) == [1, 2, 3]

    again = Path(shutil.copytree(runs["no_checkpoint"], tmp_path / "again"))
    _ok(_run(synthetic_shards, again, "--max-steps", "2", "--overwrite"))
    assert _steps(again) == [1, 2]


def test_resume_with_other_settings_lists_every_difference(synthetic_shards: Path, copy_run, tmp_path: Path) -> None:
    out = copy_run("interrupted")
    other = write_synthetic_shards(tmp_path / "other", examples=120, seed=9)
    before = _tree(out)
    args = ["--max-steps", "3", "--resume", "--lr", "1e-3", "--grad-accum", "2", "--lora-r", "4", "--seed", "3",
            "--tokens-per-micro-batch", "256"]  # fmt: skip
    line = assert_one_line_error(_run(other, out, *args), r"^error: --resume: this run's settings differ")
    expected = [
        "SHARDS (fingerprint)",
        "--lr 0.0002 -> 0.001",
        "--grad-accum 1 -> 2",
        "--lora-r 16 -> 4",
        "--seed 0 -> 3",
        "--tokens-per-micro-batch 128 -> 256",
    ]
    for text in expected:
        assert text in line, (text, line)
    assert "(step-00000002)" in line and "Resume with the run's settings, or choose a new --output" in line
    line = assert_one_line_error(_run(synthetic_shards, out, "--max-steps", "3", "--resume", "--full"), r"^error: ")
    assert "--lora/--qlora/--full lora -> full" in line, line
    assert _tree(out) == before

    # Only changeable settings differ: the error says which --resume-changed would allow them.
    line = assert_one_line_error(_run(synthetic_shards, out, "--resume", "--max-steps", "4"), r"--max-steps 3 -> 4")
    assert "Pass --resume-changed max_steps to continue with the new values" in line


def test_resume_after_a_kill_that_cut_a_metrics_line_short(synthetic_shards: Path, copy_run) -> None:
    """A kill in the middle of a metrics.jsonl write leaves a torn last line: --resume drops it with the other lines
    past the checkpoint."""
    out = copy_run("interrupted")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "epoch": 0, "loss": 5.1')
    _ok(_run(synthetic_shards, out, "--resume", "--max-steps", "3"))
    assert _steps(out) == [1, 2, 3]


def test_resume_records_the_world_size(synthetic_shards: Path, copy_run) -> None:
    out = copy_run("interrupted")
    state = out / "checkpoints" / STEP(2) / "state.json"
    meta = json.loads(state.read_text())
    meta["settings"]["world_size"] = 2
    state.write_text(json.dumps(meta))
    assert_one_line_error(_run(synthetic_shards, out, "--resume", "--max-steps", "3"), r"world size 2 -> 1")


def test_resume_changed_applies_the_new_learning_rate_and_length(synthetic_shards: Path, copy_run) -> None:
    out = copy_run("interrupted")
    changed = ["--max-steps", "5", "--lr", "1e-3", "--resume-changed", "lr,max-steps"]
    res = _run(synthetic_shards, out, "--resume", *changed)
    _ok(res)
    assert "note: --resume with changed settings: --lr 0.0002 -> 0.001; --max-steps 3 -> 5" in res.stderr
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5]
    # Step 3 onwards: the new peak lr on the new 5-step schedule, at the step the checkpoint reached.
    for r in logged[2:]:
        assert r["lr"] == pytest.approx(1e-3 * lr_factor(r["step"] - 1, warmup_steps=0, total_steps=5))


def test_resume_at_the_last_step_writes_the_output_and_never_ends_before_it(synthetic_shards: Path, copy_run) -> None:
    out = copy_run("interrupted")  # its latest checkpoint is step 2
    before = _tree(out)
    shorter = ["--resume", "--max-steps", "1", "--resume-changed", "max_steps"]
    line = assert_one_line_error(_run(synthetic_shards, out, *shorter), r"checkpoint step-00000002 is at step 2, past")
    assert "resume with --max-steps 2 or more" in line
    assert _tree(out) == before

    # A checkpoint at the last step (a run stopped while writing its output): nothing to train, the output is written.
    res = _run(synthetic_shards, out, "--resume", "--max-steps", "2", "--resume-changed", "max_steps")
    _ok(res)
    assert _steps(out) == [1, 2]
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert res.stdout.startswith(f"done: 2 steps, final loss {last['loss']:.4f}, peak memory "), res.stdout
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["final_loss"] == last["loss"]


def test_resume_compares_model_overrides_by_content(synthetic_shards: Path, copy_run, tmp_path: Path) -> None:
    out = copy_run("interrupted")
    fields = json.loads(FAST_OVERRIDES)
    fast = [a for a in CLI_FAST if a not in ("--model-overrides", FAST_OVERRIDES)]
    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps({**fields, "hidden_size": 64}))
    before = _tree(out)
    res = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(out), *fast, "--resume",
                                    "--max-steps", "3", "--model-overrides", str(bigger)])  # fmt: skip
    assert_one_line_error(res, r"--model-overrides .*\"hidden_size\": 32.* -> .*\"hidden_size\": 64")
    assert _tree(out) == before

    # The same fields in another order and spacing, or from a file, are the same model.
    same = tmp_path / "same.json"
    same.write_text(json.dumps(dict(reversed(fields.items())), indent=4))
    res = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(out), *fast, "--resume",
                                    "--max-steps", "3", "--model-overrides", str(same)])  # fmt: skip
    _ok(res)
    assert _steps(out) == [1, 2, 3]


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(resume=True, overwrite=True), r"--resume continues the run in --output and --overwrite replaces it"),
        (dict(resume_changed="lr"), r"--resume-changed names settings a resumed run may change; it needs --resume"),
        (dict(resume=True, resume_changed="lr,seed"), r"--resume-changed seed: not a setting a resumed run may"),
    ],
)
def test_conflicting_resume_flags(tmp_path: Path, settings: dict, match: str) -> None:
    with pytest.raises(TrainError, match=match):
        TrainConfig(shards="x", output=str(tmp_path), **settings)


def test_every_setting_has_a_resume_rule() -> None:
    """A new TrainConfig field must be put in one group: fixed, changeable with --resume-changed, or free."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    groups = [set(RESUME_FIXED) - {"world_size"}, set(RESUME_CHANGEABLE), set(RESUME_FREE)]
    assert set.union(*groups) == fields
    assert sum(len(g) for g in groups) == len(fields)  # no field in two groups


_RAN: list[str] = []


def _mark_ran(path: str) -> None:
    _RAN.append(path)


class _Payload:
    """Unpickling this calls ``_mark_ran``: code that a checkpoint must never get to run."""

    def __reduce__(self):
        return (_mark_ran, ("optimizer.pt",))


def test_checkpoint_state_loads_without_pickle(synthetic_shards: Path, copy_run) -> None:
    out = copy_run("interrupted")
    ckpt = out / "checkpoints" / STEP(2)
    for name in ("state.json", "scheduler.json", "rng-rank0.json"):
        json.loads((ckpt / name).read_text())
    torch.load(ckpt / "optimizer.pt", weights_only=True)
    torch.save({"state": {}, "param_groups": [], "payload": _Payload()}, ckpt / "optimizer.pt")
    line = assert_one_line_error(_run(synthetic_shards, out, "--resume", "--max-steps", "3"), r"cannot be read")
    assert "optimizer.pt" in line and "it is damaged" in line
    assert _RAN == []  # refused, never executed


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("scheduler.json", {}, r"scheduler.json' does not hold a learning-rate schedule \(no int last_epoch\)"),
        ("scheduler.json", {"last_epoch": 2}, r"scheduler.json' does not hold a learning-rate schedule \(no 'lr_lambd"),
        ("optimizer.pt", {}, r"optimizer.pt' does not hold an optimizer state \(no 'state' and 'param_groups'\)"),
        ("optimizer.pt", {"state": {}, "param_groups": [1]}, r"optimizer.pt' does not hold an optimizer state \("),
        ("state.json", {"step": "2"}, r"state.json' does not hold a training position \(expected counts >= 0, got"),
        ("state.json", {"micro_batch": -1}, r"state.json' does not hold a training position"),
    ],
)
def test_a_checkpoint_file_with_the_wrong_contents(
    synthetic_shards: Path, copy_run, name: str, content: dict, match: str
) -> None:
    """A checkpoint file that reads but does not hold what padless wrote (edited, or another program's) is damaged:
    one error naming the file, and the checkpoints and the log are left as they were."""
    out = copy_run("interrupted")
    path = out / "checkpoints" / STEP(2) / name
    if name == "optimizer.pt":
        torch.save(content, path)
    else:
        base = json.loads(path.read_text()) if name == "state.json" else {}
        path.write_text(json.dumps({**base, **content}))
    before = _tree(out / "checkpoints"), (out / "metrics.jsonl").read_bytes()
    line = assert_one_line_error(_run(synthetic_shards, out, "--resume", "--max-steps", "3"), match)
    assert "it is damaged. Remove its checkpoint folder" in line
    assert (_tree(out / "checkpoints"), (out / "metrics.jsonl").read_bytes()) == before


def test_a_checkpoint_cut_short_is_never_the_latest(synthetic_shards: Path, copy_run) -> None:
    """Killed while writing step 3: a temp folder, and (worse) a step folder without state.json named by a stale
    pointer. The latest whole checkpoint is step 2, and the run continues from there."""
    out = copy_run("interrupted")
    root = out / "checkpoints"
    shutil.copytree(root / STEP(2), root / f".tmp-{STEP(3)}")
    shutil.copytree(root / STEP(2), root / STEP(3))
    (root / STEP(3) / "state.json").unlink()
    (root / "latest").write_text(STEP(3) + "\n")
    assert latest_checkpoint(out) == root / STEP(2)
    _ok(_run(synthetic_shards, out, "--resume", "--max-steps", "3", "--save-every", "1"))
    assert _steps(out) == [1, 2, 3] and latest_checkpoint(out) == root / STEP(3)


def test_disk_full_while_writing_a_checkpoint(synthetic_shards: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if STEP(2) in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    line = assert_one_line_error(_run(synthetic_shards, out, "--max-steps", "3", "--save-every", "1"), r"^error: ")
    assert f"cannot write checkpoint {STEP(2)} into" in line and "(No space left on device)" in line
    assert f"the previous checkpoint {STEP(1)} is intact (continue from it with --resume)" in line
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", STEP(1)]  # no partial folder left
    assert latest_checkpoint(out) == root / STEP(1)

    monkeypatch.setattr(torch, "save", real_save)
    _ok(_run(synthetic_shards, out, "--max-steps", "3", "--save-every", "1", "--resume"))
    assert _steps(out) == [1, 2, 3]


@pytest.mark.parametrize(
    ("code", "fix"),
    [(errno.ENOSPC, "free disk space and run again"), (errno.EACCES, "choose an --output you may write to")],
    ids=["disk_full", "no_access"],
)
def test_a_failed_write_of_the_run_log_is_one_line(
    synthetic_shards: Path, tmp_path: Path, monkeypatch, code: int, fix: str
) -> None:
    from padless.train.metrics import MetricsLog

    def write(self, record):
        raise OSError(code, errno.errorcode[code], str(self.path))

    monkeypatch.setattr(MetricsLog, "write", write)
    line = assert_one_line_error(_run(synthetic_shards, tmp_path / "out", "--max-steps", "1"), r"^error: cannot write")
    assert "metrics.jsonl" in line and fix in line


# ----------------------------------------------------------------------------------------------- the tokenizer
DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "prep" / "assets" / "demo_tokenizer"


def _model_folder(folder: Path, vocab: int, tokenizer: Path | None) -> Path:
    from padless.train.modeling import load_model

    overrides = json.loads(CLI_FAST[-1])
    load_model(None, vocab_size=vocab, config_overrides=overrides).save_pretrained(folder)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(folder))  # re-saved: other bytes
    return folder


def test_tokenizer_identity_by_content(demo_shards: Path, tmp_path: Path) -> None:
    vocab = open_shards(demo_shards).manifest["tokenizer"]["vocab_size"]
    same = _model_folder(tmp_path / "same", vocab, DEMO_TOKENIZER)
    assert (same / "tokenizer_config.json").read_bytes() != (DEMO_TOKENIZER / "tokenizer_config.json").read_bytes()
    fast = [a for a in CLI_FAST if a not in ("--model-overrides", CLI_FAST[-1])]
    args = ["run", str(demo_shards), *fast, "--max-steps", "1", "--tokens-per-micro-batch", "512"]
    res = CliRunner().invoke(main, [*args, "--model", str(same), "--output", str(tmp_path / "o1")])
    assert res.exit_code == 0 and "tokenizer mismatch" not in res.output, res.output

    other = Path(shutil.copytree(same, tmp_path / "other"))
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    line = assert_one_line_error(
        CliRunner().invoke(main, [*args, "--model", str(other), "--output", str(tmp_path / "o2")]), r"tokenizer mism"
    )
    assert "tokenizes differently from the model folder's (they differ in chat_templates)" in line
    res = CliRunner().invoke(main, [*args, "--model", str(other), "--output", str(tmp_path / "o3"), "--force"])
    assert res.exit_code == 0 and "warning: tokenizer mismatch overridden by --force" in res.stderr, res.output

    parity = ["parity", str(demo_shards), "--packs", "1", "--model", str(other)]
    assert_one_line_error(CliRunner().invoke(main, parity), r"differ in chat_templates.*or pass --force")
    res = CliRunner().invoke(main, [*parity, "--force"])
    assert res.exit_code == 0 and "warning: tokenizer mismatch overridden by --force" in res.output, res.output


def test_force_never_lets_token_ids_past_the_embedding(synthetic_shards: Path, tmp_path: Path) -> None:
    top = pack_sizes(open_shards(synthetic_shards)).max_token_id
    small = _model_folder(tmp_path / "small", top, None)  # ids 0..top-1: the largest id is one too many
    run = ["run", str(synthetic_shards), *CLI_FAST[:5], "--output", str(tmp_path / "out")]
    for command in (["parity", str(synthetic_shards), "--packs", "1000"], run):
        res = CliRunner().invoke(main, [*command, "--model", str(small), "--force"])
        line = assert_one_line_error(res, rf"holds token id {top}, but the model's embedding has {top} rows")
        assert "--force does not change that" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- damaged shards
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda text: text[: len(text) // 2], r"manifest.json' is not valid JSON"),
        (lambda text: text.replace('"vocab_size": 384', '"vocab_size": -1'), r"vocab_size"),
        (lambda text: text.replace('"format_version": 1', '"format_version": 7'), r"shard format version 7"),
    ],
    ids=["truncated", "negative_vocab", "version"],
)
def test_a_damaged_manifest_is_one_line(synthetic_shards: Path, tmp_path: Path, edit, match: str) -> None:
    shards = Path(shutil.copytree(synthetic_shards, tmp_path / "shards"))
    manifest = shards / "manifest.json"
    manifest.write_text(edit(manifest.read_text()))
    assert_one_line_error(_run(shards, tmp_path / "out"), match)
    assert_one_line_error(CliRunner().invoke(main, ["parity", str(shards), "--packs", "1"]), match)
