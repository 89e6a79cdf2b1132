"""``train``'s user errors: one ``error: ...`` line on stderr, exit status 2, no traceback, for bad options and for
problems found deeper down (adapters, model loading, patching, checkpoints, the optimizer); and ``TrainConfig``
checks its own fields for library callers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from padless.train.cli import main
from padless.train.config import TrainConfig, TrainError
from tests.user_errors import assert_one_line_error, assert_one_line_error_in_process

from .runs import CLI_FAST, FAST_OVERRIDES, cli_equivalent, run_interrupted
from .tiny_models import tiny_model

TRAIN = str(Path(sys.executable).parent / "train")
FAST = [*CLI_FAST, "--max-steps", "1"]


def _run(shards: Path, output: Path, *args: str):
    return CliRunner().invoke(main, ["run", str(shards), "--output", str(output), *args])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--cuda-graphs", "false"], r"Invalid value for '--cuda-graphs': 'false' is not one of 'auto', 'on', 'off'"),
        (["--checkpointing", "yes"], r"Invalid value for '--checkpointing': 'yes' is not one of 'off', 'on', "),
        (["--family", "gpt2"], r"Invalid value for '--family': 'gpt2' is not one of 'llama', "),
        (["--dtype", "fp8"], r"Invalid value for '--dtype': 'fp8' is not one of 'bf16', 'fp16', 'fp32'"),
        (["--lr", "fast"], r"Invalid value for '--lr': 'fast' is not a valid float"),
        (["--grad-accum", "0"], r"^error: --grad-accum must be >= 1, got 0$"),
        (["--lr", "inf"], r"^error: --lr must be > 0 and finite, got inf$"),
        (["--weight-decay", "inf"], r"^error: --weight-decay must be >= 0 and finite, got inf$"),
        (["--tokens-per-micro-batch", "auto", "--max-memory-gib", "inf"], r"--max-memory-gib must be > 0 GiB and fin"),
        (["--checkpointing", "offload", "--checkpoint-gpu-gib", "inf"], r"--checkpoint-gpu-gib must be >= 0 .* finit"),
        (["--lora-alpha", "0"], r"^error: --lora-alpha must be > 0, got 0: the LoRA update is scaled by alpha / r"),
        (["--lora-alpha", "-8"], r"^error: --lora-alpha must be > 0, got -8"),
        (["--full", "--target-modules", "q_proj"], r"^error: --target-modules configures a LoRA adapter, and --full"),
        (["--full", "--lora-r", "8"], r"^error: --lora-r configures a LoRA adapter, and --full trains every weight"),
        (["--lora-alpha", "32", "--full", "--lora-r", "8"], r"^error: --lora-r and --lora-alpha configure a LoRA "),
        (["--full", "--lora-dropout", "0.1"], r"^error: --lora-dropout configures a LoRA adapter, and --full"),
        (["--target-modules", ",,"], r"^error: --target-modules ',,' names no module; give comma-separated names"),
        (["--tokens-per-micro-batch", "-5"], r"--tokens-per-micro-batch must be >= 0 or auto, got -5"),
        (["--tokens-per-micro-batch", "lots"], r"'--tokens-per-micro-batch': 'lots' is not an int or 'auto'"),
        (["--tokens-per-micro-batch", "auto", "--max-memory-gib", "0"], r"^error: --max-memory-gib must be > 0 GiB"),
        (["--max-memory-gib", "8"], r"--max-memory-gib only sizes --tokens-per-micro-batch auto, and the budget is 0;"),
        (["--eval-every", "-2"], r"--eval-every must be >= -1 \(-1 = never\), got -2"),
        (["--seed", "-1"], r"^error: --seed must be in \[0, 2\^64 - 1\], got -1$"),
        (["--seed", str(2**64)], r"^error: --seed must be in \[0, 2\^64 - 1\], got 18446744073709551616$"),
        (["--checkpoint-gpu-gib", "-1"], r"^error: --checkpoint-gpu-gib must be >= 0 \(0 = all checkpoints to the h"),
        (["--checkpoint-gpu-gib", "4"], r"it needs --checkpointing offload \(got --checkpointing off\)$"),
        (["--keep-attention"], r"^error: --keep-attention keeps .* it needs --checkpointing on or offload$"),
        (["--checkpoint-layers", "0"], r"^error: --checkpoint-layers must be >= 1, got 0$"),
        (
            ["--checkpoint-layers", "2"],
            r"^error: --checkpoint-layers groups layers .* needs --checkpointing on or offload \(or --memory low",
        ),
        (
            ["--checkpoint-layers", "2", "--checkpointing", "on", "--keep-attention"],
            r"^error: --checkpoint-layers with --keep-attention: .*leave --keep-attention out$",
        ),
        (
            ["--checkpoint-layers", "2", "--checkpointing", "on", "--fsdp"],
            r"^error: --checkpoint-layers with --fsdp: .*use --checkpoint-layers 1$",
        ),
        (
            ["--mlp-tile-tokens", "-1"],
            r"^error: --mlp-tile-tokens must be >= 0 \(0 = untiled, N = tiles of N tokens\), "
            r"got -1$",
        ),
        (["--mlp-tile-tokens", "64", "--fsdp"], r"--mlp-tile-tokens with --fsdp: .*use --mlp-tile-tokens 0$"),
        (["--bogus"], r"No such option '--bogus'.*\(see \w+ run --help\)"),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], match: str) -> None:
    assert_one_line_error(_run(tmp_path, tmp_path / "out", *args), match)
    assert not (tmp_path / "out").exists()


def test_a_config_file_s_lora_sizes_do_not_stop_a_full_run(synthetic_shards: Path, tmp_path: Path) -> None:
    """A saved config.yaml lists every setting, LoRA options included: replayed with --full, they are no error."""
    config = tmp_path / "config.yaml"
    config.write_text("lora_r: 8\nlora_alpha: 16\nlora_dropout: 0.05\ntarget_modules: q_proj,v_proj\n")
    r = _run(synthetic_shards, tmp_path / "out", "--config", str(config), "--full", *FAST)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--target-modules", "q_proj,nope"], r"--target-modules 'nope' names no linear layer .* q_proj, "),
        (["--target-modules", "lm_head"], r"--target-modules 'lm_head' picks the output layer"),
        (["--optimizer", "adamw8bit"], r"--optimizer adamw8bit needs (bitsandbytes|a CUDA device)"),
        (["--model-overrides", "{bad json"], r"--model-overrides is not valid JSON"),
        (["--model-overrides", '{"num_attention_heads": 3}'], r"--model-overrides .*cannot build a llama model"),
        (["--model-overrides", '{"vocab_size": 10}'], r"vocab_size=10 is smaller than the shards' tokenizer"),
        (["--model-overrides", '{"num_hidden_layers": 0}'], r"--model-overrides has no decoder layers \(num_hidden"),
        (["--model-overrides", '{"num_hidden_layers": 0}', "--full"], r"has no decoder layers"),
        (["--model", "/no/such/model/folder"], r"--model '/no/such/model/folder': no such folder"),
        (["--device", "gpu0"], r"--device 'gpu0' is not a device torch knows"),
    ],
)
def test_errors_from_the_model_path(synthetic_shards: Path, tmp_path: Path, args: list[str], match: str) -> None:
    fast = [a for a in FAST if a not in ("--model-overrides", FAST_OVERRIDES)] if "--model" in args else FAST
    assert_one_line_error(_run(synthetic_shards, tmp_path / "out", *fast, *args), match)
    assert not (tmp_path / "out").exists()  # found before anything was written


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("gpu0", r"^error: --device 'gpu0' is not a device torch knows"),
        pytest.param(
            "cuda",
            r"^error: --device cuda asked for CUDA but no CUDA device is available; use --device cpu$",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_parity_and_chat_check_their_device(synthetic_shards: Path, tmp_path: Path, device: str, match: str) -> None:
    """``--device`` of ``train parity`` and ``train chat`` is checked as ``train run``'s is, before any model loads."""
    assert_one_line_error(CliRunner().invoke(main, ["parity", str(synthetic_shards), "--device", device]), match)
    chat = ["chat", str(tmp_path / "run"), "--prompt", "hi", "--device", device]
    assert_one_line_error(CliRunner().invoke(main, chat), match)


def test_a_lora_output_given_as_the_model(synthetic_shards: Path, tmp_path: Path) -> None:
    """Continuing from a LoRA run: its output folder is an adapter, which `train merge` turns into a model."""
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    res = _run(synthetic_shards, tmp_path / "out", "--model", str(tmp_path / "lora"), "--device", "cpu")
    line = assert_one_line_error(res, r"^error: --model '.*lora' holds a LoRA adapter, not a model \(no config.json\)")
    assert f"`train merge {tmp_path / 'lora'} --out MERGED` and pass that folder" in line
    assert not (tmp_path / "out").exists()


def test_a_model_that_is_no_causal_lm_is_one_error(synthetic_shards: Path, tmp_path: Path) -> None:
    """An encoder-decoder (T5) has no AutoModelForCausalLM class: run, parity and plan say so in one line."""
    from transformers import AutoConfig, T5ForConditionalGeneration

    config = AutoConfig.for_model("t5", vocab_size=384, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    match = r"^error: --model '.*t5' is a 't5' model, and transformers has no causal language model"
    fast = [a for a in FAST if a not in ("--model-overrides", FAST_OVERRIDES)]
    assert_one_line_error(_run(synthetic_shards, tmp_path / "out", *fast, "--model", str(tmp_path / "t5")), match)
    assert not (tmp_path / "out").exists()
    for command in (["parity"], ["plan", "--gpu-mem-gib", "8"]):
        args = [command[0], str(synthetic_shards), "--model", str(tmp_path / "t5"), *command[1:]]
        assert_one_line_error(CliRunner().invoke(main, args), match)


def test_a_damaged_checkpoint_is_a_user_error(synthetic_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_interrupted(cli_equivalent(synthetic_shards, out, max_steps=2, save_every=1), after_step=1)
    resume = [*FAST, "--max-steps", "2", "--resume"]
    optimizer = out / "checkpoints" / "step-00000001" / "optimizer.pt"
    saved = optimizer.read_bytes()
    optimizer.write_bytes(b"not a torch file")
    line = assert_one_line_error(_run(synthetic_shards, out, *resume), r"cannot be read .*it is damaged")
    assert "optimizer.pt" in line
    optimizer.write_bytes(saved)
    optimizer.unlink()
    assert_one_line_error(_run(synthetic_shards, out, *resume), r"lacks \['optimizer.pt'\]; it is incomplete")


def test_an_unsupported_architecture_that_cannot_take_a_mask_is_a_train_error() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from padless.train.model_patch import patch_model

    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    model = AutoModelForCausalLM.from_config(config)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(TrainError, match=r"model_type 'gpt2' is not patched .*attn_implementation='sdpa'"):
        patch_model(model)
    customised = tiny_model("llama")
    del customised.model.norm
    with pytest.raises(TrainError, match=r"the decoder has no \['norm'\].*customised model"):
        patch_model(customised)


def test_config_rejects_values_outside_its_types() -> None:
    with pytest.raises(TrainError, match=r"cuda_graphs='false' \(--cuda-graphs\): expected one of 'auto', 'on', 'off'"):
        TrainConfig(shards="x", cuda_graphs="false")
    with pytest.raises(TrainError, match=r"mode='dora' \(--lora/--qlora/--full\): expected one of 'lora', "):
        TrainConfig(shards="x", mode="dora")
    with pytest.raises(TrainError, match=r"dtype='bfloat16' \(--dtype\): expected one of 'bf16', .* or None"):
        TrainConfig(shards="x", dtype="bfloat16")
    with pytest.raises(TrainError, match=r"family='gpt2' \(--family\)"):
        TrainConfig(shards="x", family="gpt2")
    with pytest.raises(TrainError, match=r"lr='1e-3' \(--lr\): expected a number"):
        TrainConfig(shards="x", lr="1e-3")
    with pytest.raises(TrainError, match=r"max_steps=2.5 \(--max-steps\): expected an int"):
        TrainConfig(shards="x", max_steps=2.5)
    with pytest.raises(TrainError, match=r"resume='yes' \(--resume\): expected true or false"):
        TrainConfig(shards="x", resume="yes")
    with pytest.raises(TypeError, match="shards"):
        TrainConfig()  # SHARDS is required
    assert TrainConfig(shards="x", lr=1).lr == 1  # an int is a number


def test_installed_command_prints_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([TRAIN, "run", str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert_one_line_error_in_process(proc, r"^error: shard set '.*missing' is not a folder")
    proc = subprocess.run([TRAIN, "run", str(tmp_path), "--cuda-graphs", "false"], capture_output=True, text=True)
    assert_one_line_error_in_process(proc, r"^error: Invalid value for '--cuda-graphs'.*\(see train run --help\)$")


def test_parity_failure_is_exit_1_and_said_in_the_help() -> None:
    assert "1 when they do not" in " ".join(CliRunner().invoke(main, ["parity", "--help"]).output.split())


def test_fsdp_wrapping_needs_fully_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.fsdp as fsdp

    from padless.train.distributed import DistEnv, PackedLossModule, wrap_model

    monkeypatch.delattr(fsdp, "fully_shard")
    with pytest.raises(TrainError, match=r"--fsdp needs torch.distributed.fsdp.fully_shard"):
        wrap_model(PackedLossModule(torch.nn.Linear(2, 2), None), DistEnv(world_size=2), torch.device("cpu"), fsdp=True)
