"""The ``train`` command line: one help source, one-line errors for known failures, and the three commands."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from padless.train.cli import main
from padless.train.config import TrainConfig, TrainError
from tests.user_errors import assert_one_line_error

from .runs import FAST_OVERRIDES, SYNTH_VOCAB


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _error_line(result) -> str:
    """The one ``error: ...`` line of a failed command (exit status 2, no traceback)."""
    return assert_one_line_error(result, "^error: ")


def test_help_is_the_config_field_docs() -> None:
    help_text = " ".join(_invoke("run", "--help").output.split())
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("positional"):
            continue
        assert " ".join(f.metadata["help"].split())[:40] in help_text, f.name
    for flag in ("--lora", "--qlora", "--full", "--tokens-per-micro-batch", "--checkpointing", "--resume"):
        assert flag in help_text


def test_python_dash_m_train_works() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "padless.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "run" in proc.stdout and "parity" in proc.stdout and "merge" in proc.stdout


def test_config_rejects_bad_values_with_the_option_name() -> None:
    with pytest.raises(TrainError, match=r"--grad-accum must be >= 1, got 0"):
        TrainConfig(shards="x", grad_accum=0)
    with pytest.raises(TrainError, match=r"--resume needs --output"):
        TrainConfig(shards="x", resume=True)
    with pytest.raises(TrainError, match=r"--lora-dropout must be in \[0, 1\), got 1.5"):
        TrainConfig(shards="x", lora_dropout=1.5)


def test_bad_option_value_is_one_line(tmp_path: Path) -> None:
    line = _error_line(_invoke("run", str(tmp_path), "--grad-accum", "0"))
    assert "--grad-accum must be >= 1, got 0" in line


def test_missing_shards(tmp_path: Path) -> None:
    line = _error_line(_invoke("run", str(tmp_path / "nope"), "--no-progress"))
    assert re.search(r"is not a folder; expected a folder holding manifest.json", line), line
    (tmp_path / "empty").mkdir()
    line = _error_line(_invoke("run", str(tmp_path / "empty"), "--no-progress"))
    assert "is not a padless shard set" in line and "prep pack" in line


def test_corrupt_shards(synthetic_shards: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_shards, broken)
    shard = next(broken.glob("shard-*.arrow"))
    shard.write_bytes(shard.read_bytes()[:-100])
    line = _error_line(_invoke("run", str(broken), "--no-progress"))
    assert "truncated or replaced" in line and "re-run `prep pack`" in line


def test_model_folder_without_weights(synthetic_shards: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = _error_line(_invoke("run", str(synthetic_shards), "--model", str(folder), "--no-progress"))
    assert "holds no weights" in line and str(folder) in line


def _save_tiny(folder: Path, vocab: int, tokenizer_from: Path | None = None) -> Path:
    from padless.train.modeling import load_model

    load_model(None, vocab_size=vocab, config_overrides={"hidden_size": 32, "intermediate_size": 64}).save_pretrained(
        folder
    )
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


def test_tokenizer_mismatch_errors_and_force_overrides(synthetic_shards: Path, tmp_path: Path) -> None:
    # Token ids past the embedding: refused, and --force does not change that.
    small = _save_tiny(tmp_path / "small", SYNTH_VOCAB - 100)
    for force in ([], ["--force"]):
        args = ["run", str(synthetic_shards), "--model", str(small), "--no-progress", "--output", str(tmp_path / "s")]
        line = _error_line(_invoke(*args, *force))
        assert f"holds token id {SYNTH_VOCAB - 1}, but the model's embedding has {SYNTH_VOCAB - 100} rows" in line
        assert "--force does not change that" in line
        assert not (tmp_path / "s").exists()

    # Embedding large enough, but the folder's tokenizer is another one: an error, and --force trains anyway.
    demo_tok = Path(__file__).resolve().parents[2] / "prep" / "assets" / "demo_tokenizer"
    other = _save_tiny(tmp_path / "other", SYNTH_VOCAB + 16, tokenizer_from=demo_tok)
    args = ["run", str(synthetic_shards), "--model", str(other), "--no-progress", "--device", "cpu"]
    line = _error_line(_invoke(*args, "--output", str(tmp_path / "o1")))
    assert "tokenizer mismatch" in line and "hash" in line
    ok = _invoke(*args, "--force", "--max-steps", "1", "--output", str(tmp_path / "o2"), "--eval-every", "-1")
    assert ok.exit_code == 0, ok.output
    assert "done: 1 steps" in ok.output
    assert (tmp_path / "o2" / "adapter_config.json").is_file()


def test_tokenizer_hash_mirrors_prep() -> None:
    """train may not import prep at run time; this test holds the two hash implementations together."""
    from padless.prep.tokenizer import load_tokenizer
    from padless.train.prepare import tokenizer_file_hash

    folder = Path(__file__).resolve().parents[2] / "prep" / "assets" / "demo_tokenizer"
    assert tokenizer_file_hash(folder) == load_tokenizer(folder).file_hash


def test_resume_without_a_run(synthetic_shards: Path, tmp_path: Path) -> None:
    line = _error_line(_invoke("run", str(synthetic_shards), "--output", str(tmp_path), "--resume", "--no-progress"))
    assert "holds no run (no checkpoint)" in line and "without --resume" in line


def test_merge_needs_an_adapter_folder(tmp_path: Path) -> None:
    line = _error_line(_invoke("merge", str(tmp_path), "--out", str(tmp_path / "m")))
    assert "has no adapter_config.json" in line


def test_merge_into_a_file_or_onto_another_base_is_one_line(synthetic_shards: Path, tmp_path: Path) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    fast = ["--no-progress", "--device", "cpu", "--eval-every", "-1", "--max-steps", "1"]
    small = _invoke("run", str(synthetic_shards), "--output", str(run), "--model-overrides", FAST_OVERRIDES, *fast)
    assert small.exit_code == 0, small.output
    assert _invoke("run", str(synthetic_shards), "--output", str(other), "--full", *fast).exit_code == 0
    afile = tmp_path / "afile"
    afile.write_text("keep")
    line = _error_line(_invoke("merge", str(run), "--out", str(afile)))
    assert line == f"error: --out {str(afile)!r} is a file; expected a new or empty folder"
    assert afile.read_text() == "keep"
    line = _error_line(_invoke("merge", str(run), "--model", str(other), "--out", str(tmp_path / "merged")))
    assert f"the adapter in {str(run)!r} does not fit the base model {str(other)!r} (size mismatch for " in line
    assert line.endswith("pass the --model it was trained on, or leave out --model to use the adapter's own base")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((other / "config.json").read_text())
    line = _error_line(_invoke("merge", str(run), "--model", str(no_weights), "--out", str(tmp_path / "merged")))
    assert line == (f"error: --model {str(no_weights)!r} holds no weights (no *.safetensors or *.bin files); download "
                    "the weights into it, or pass --model with the base model the adapter was trained on")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "no-weights", "other", "run"]


def test_run_then_merge_then_parity(synthetic_shards: Path, tmp_path: Path) -> None:
    """The user path: train (tiny model), merge the adapter, and the packed-vs-one-by-one check passes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    res = _invoke(
        "run", str(synthetic_shards), "--output", str(out), "--max-steps", "2", "--lr", "1e-2", "--no-progress"
    )
    assert res.exit_code == 0, res.output
    assert re.search(r"done: 2 steps, final loss [\d.]+, eval_loss [\d.]+", res.output), res.output

    merged_dir = tmp_path / "merged"
    res = _invoke("merge", str(out), "--out", str(merged_dir))
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out)
    ids = torch.arange(40)[None] % SYNTH_VOCAB
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted.eval()(ids).logits, rtol=1e-4, atol=1e-5)

    res = _invoke("parity", str(synthetic_shards), "--packs", "2")
    assert res.exit_code == 0, res.output
    assert re.search(r"^PASS: packed == one-by-one", res.output, re.M), res.output


def test_run_with_a_tiled_mlp(synthetic_shards: Path, tmp_path: Path) -> None:
    """``--mlp-tile-tokens 64`` on micro-batches of 128 tokens: two tiles per MLP, the run trains and logs it."""
    out = tmp_path / "run"
    res = _invoke("run", str(synthetic_shards), "--output", str(out), "--max-steps", "2", "--lr", "1e-2",
                  "--no-progress", "--mlp-tile-tokens", "64", "--checkpointing", "on")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert re.search(r"done: 2 steps, final loss [\d.]+", res.output), res.output
    assert "mlp_tile_tokens: 64" in (out / "config.yaml").read_text()


def test_memory_low_runs_on_cpu_without_the_triton_interpreter(synthetic_shards: Path, tmp_path: Path) -> None:
    """A user's CPU run (no ``TRITON_INTERPRET``): ``--memory low`` takes the reference ops, its loss included."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PADLESS_KERNELS")}
    proc = subprocess.run(
        [sys.executable, "-m", "padless.train", "run", str(synthetic_shards), "--output", str(tmp_path / "run"),
         "--max-steps", "2", "--memory", "low", "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"done: 2 steps, final loss [\d.]+", proc.stdout + proc.stderr), proc.stdout[-2000:]


def test_prep_demo_shards_with_a_model_folder_holding_the_same_tokenizer(demo_shards: Path, tmp_path: Path) -> None:
    """The real user path: `prep pack demo:alpaca` output, a model folder with the demo tokenizer (hash matches),
    eval on the `eval/` set prep wrote, without naming it."""
    from padless.shards.reader import open_shards

    demo_tok = Path(__file__).resolve().parents[2] / "prep" / "assets" / "demo_tokenizer"
    vocab = open_shards(demo_shards).manifest["tokenizer"]["vocab_size"]
    model = _save_tiny(tmp_path / "model", vocab, tokenizer_from=demo_tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # byte-identical copies: the same content hash
        assert (model / name).read_bytes() == (demo_tok / name).read_bytes()
    res = _invoke("run", str(demo_shards), "--model", str(model), "--output", str(tmp_path / "o"), "--max-steps", "2",
                  "--tokens-per-micro-batch", "512", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert re.search(r"done: 2 steps, final loss [\d.]+, eval_loss [\d.]+", res.output), res.output
    assert "tokenizer mismatch" not in res.output


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False)])
def test_the_done_line_is_printed_by_rank_0_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: str, printed: bool
) -> None:
    """Under torchrun every process returns a summary; only rank 0 prints it (rank 1's own figures would be a
    second, different 'done:' line)."""
    from padless.train import loop

    summary = {"steps": 2, "final_loss": 1.5, "peak_mem_gib": 0.5, "wall_s": 1.0, "output": str(tmp_path / "out")}
    monkeypatch.setattr(loop, "train", lambda cfg: loop.TrainResult(output=tmp_path / "out", steps=2, summary=summary))
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "shards"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert ("done: 2 steps, final loss 1.5000" in result.output) is printed
