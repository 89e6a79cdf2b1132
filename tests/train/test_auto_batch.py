"""--tokens-per-micro-batch auto: the largest candidate whose predicted peak fits, one clear error when not even one
pack does or when there is no memory to size for, and a run that records (and on --resume keeps) its choice.

Memory limits are set between plan's own predictions for neighbouring candidates, so a choice off by one candidate
fails, whatever plan's fitted coefficients are."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from padless.shards.reader import open_shards
from padless.train.auto_batch import (
    MAX_PACKS,
    MAX_TOKENS,
    Memory,
    auto_budget,
    available_memory,
    candidates,
    choose,
)
from padless.train.checkpoint import latest_checkpoint, read_checkpoint_settings
from padless.train.cli import main
from padless.train.config import TrainError
from padless.train.modeling import tiny_config
from padless.train.plan import Setting, estimate, inventory, plan_inputs
from tests.user_errors import assert_one_line_error

from .runs import CLI_FAST, cli_equivalent, run_interrupted

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_hidden_layers": 3}  # fmt: skip
GIB = 2**30


def _peaks(inv, setting: Setting, sum_sq: float) -> list[int]:
    return [estimate(inv, dataclasses.replace(setting, tokens=t), sum_sq_per_token=sum_sq).peak
            for t in candidates(setting.tokens)]  # fmt: skip


def test_candidates_are_doubling_pack_counts_up_to_the_cap() -> None:
    assert candidates(128) == tuple(128 << k for k in range(9))  # 1 .. 256 packs
    assert len(candidates(128)) == MAX_PACKS.bit_length()
    assert candidates(8192)[-1] == MAX_TOKENS  # 128 packs: the token cap comes first
    assert candidates(3000) == tuple(3000 << k for k in range(9))  # any max_len, not only powers of two
    assert candidates(MAX_TOKENS * 2) == (MAX_TOKENS * 2,)  # one pack is always a candidate


@pytest.mark.parametrize(("mode", "checkpointing"), [("lora", "on"), ("full", "off"), ("qlora", "offload")])
def test_the_largest_candidate_that_fits_is_chosen(mode: str, checkpointing: str) -> None:
    inv = inventory(tiny_config("qwen3", 500, **SHAPE))
    setting = Setting(mode, 256, checkpointing, lora_r=8)
    peaks = _peaks(inv, setting, 40.0)
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    sizes = candidates(256)
    for k, size in enumerate(sizes):
        limits = [peaks[k]] + ([peaks[k + 1] - 1] if k + 1 < len(sizes) else [peaks[k] * 4])
        for limit in limits:  # exactly its peak, and just below the next candidate's
            best = choose(inv, setting, Memory(limit, "test"), sum_sq_per_token=40.0)
            assert best.setting.tokens == size, (limit, k)
            assert best.peak == peaks[k] and best.setting.mode == mode and best.setting.checkpointing == checkpointing


def test_offloaded_inputs_must_fit_the_host() -> None:
    # Wide enough that each candidate's pinned layer inputs (8 MiB buffers, powers of two) take more host memory.
    inv = inventory(tiny_config("qwen3", 500, **{**SHAPE, "hidden_size": 16384}))
    setting = Setting("lora", 256, "offload")
    hosts = [estimate(inv, dataclasses.replace(setting, tokens=t)).host for t in candidates(256)]
    best = choose(inv, setting, Memory(10 * GIB, "test"), sum_sq_per_token=0.0, host_bytes=hosts[2])
    assert best.setting.tokens == 1024  # the GPU would take 256 packs; the host takes 4
    pinned = r"even one pack \(256 tokens\) pins [\d.]+ MiB in host memory \(the offloaded layer inputs\)"
    with pytest.raises(TrainError, match=pinned):
        choose(inv, setting, Memory(10 * GIB, "test"), sum_sq_per_token=0.0, host_bytes=hosts[0] - 1)
    low = dataclasses.replace(setting, memory="low")  # the vocabulary is pinned too, and --memory fast frees it
    both = r"\(the offloaded layer inputs and --memory low's vocabulary\), .*--memory fast"
    with pytest.raises(TrainError, match=both):
        choose(inv, low, Memory(10 * GIB, "test"), sum_sq_per_token=0.0, host_bytes=hosts[0] - 1)
    # A short pack under --memory low keeps its checkpoints on the GPU: only the vocabulary is pinned.
    onload = dataclasses.replace(low, checkpointing="off")
    only_vocab = r"pins [\d.]+ MiB in host memory \(--memory low's vocabulary\), .*; use --memory fast, or --host-mem"
    with pytest.raises(TrainError, match=only_vocab):
        choose(inv, onload, Memory(10 * GIB, "test"), sum_sq_per_token=0.0, host_bytes=1)


def test_not_even_one_pack_fitting_is_one_error_naming_the_peak_memory_and_options() -> None:
    inv = inventory(tiny_config("qwen3", 500, **SHAPE))
    setting = Setting("lora", 256, "off")
    one = _peaks(inv, setting, 0.0)[0]
    memory = available_memory(one / GIB * 0.999, torch.device("cpu"))
    with pytest.raises(TrainError) as error:
        choose(inv, setting, memory, sum_sq_per_token=0.0)
    assert str(error.value) == (
        f"--tokens-per-micro-batch auto: even one pack (256 tokens) is predicted to peak at {one / GIB:.2f} GiB, "
        f"more than the {memory.bytes / GIB:.2f} GiB available (--max-memory-gib {one / GIB * 0.999:g}); try "
        "--checkpointing on or offload, --qlora, a smaller --max-len at `prep pack`, a larger --max-memory-gib if "
        "the device has more to give"
    )
    offloaded = dataclasses.replace(setting, mode="qlora", checkpointing="offload")
    with pytest.raises(TrainError, match=r"available \(--max-memory-gib [\d.e-]+\); try a smaller --max-len at"):
        choose(inv, offloaded, Memory(1, "--max-memory-gib 1e-09"), sum_sq_per_token=0.0)


def test_low_memory_candidates_are_planned_with_the_checkpointing_each_size_runs(monkeypatch) -> None:
    from padless.train import memory_setting

    monkeypatch.setattr(memory_setting, "LOW_MEMORY_ONLOAD_TOKENS", 512)  # tiny packs: the switch inside the range
    inv = inventory(tiny_config("qwen3", 500, **SHAPE))
    setting = Setting("qlora", 256, "off", lora_r=8, optimizer="adamw8bit", memory="low")
    best = choose(inv, setting, Memory(10 * GIB, "test"), sum_sq_per_token=0.0)
    assert best.setting.tokens == candidates(256)[-1] and best.setting.checkpointing == "offload"
    ran = dataclasses.replace(setting, tokens=best.setting.tokens, checkpointing="offload")
    assert best.peak == estimate(inv, ran).peak < estimate(inv, dataclasses.replace(ran, checkpointing="off")).peak
    for tokens, mode in ((256, "on"), (512, "on"), (1024, "offload")):
        limit = estimate(inv, dataclasses.replace(setting, tokens=tokens, checkpointing=mode)).peak
        picked = choose(inv, setting, Memory(limit, "test"), sum_sq_per_token=0.0)
        assert (picked.setting.tokens, picked.setting.checkpointing) == (tokens, mode)
    graphed = choose(inv, setting, Memory(10 * GIB, "test"), sum_sq_per_token=0.0, cuda_graphs="on")
    assert graphed.setting.checkpointing == "on"  # --cuda-graphs on: the layer inputs stay on the GPU


def test_a_model_whose_load_does_not_fit_is_told_so() -> None:
    inv = inventory(tiny_config("qwen3", 50_000, **{**SHAPE, "hidden_size": 2048}))  # the vocabulary outweighs all
    setting = Setting("lora", 256, "on", memory="low")
    one = estimate(inv, setting)
    assert one.load == one.peak  # loading with the vocabulary on the GPU is the peak
    with pytest.raises(TrainError, match=r"loading the model is predicted to peak at .*; try --qlora, a larger"):
        choose(inv, setting, Memory(one.load - 1, "test"), sum_sq_per_token=0.0)


def test_available_memory_on_cpu_needs_max_memory_gib() -> None:
    assert available_memory(1.5, torch.device("cpu")) == Memory(int(1.5 * GIB), "--max-memory-gib 1.5")
    with pytest.raises(TrainError, match=r"device cpu has none to read: pass a number \(e\.g\. --tokens-per-micro"):
        available_memory(None, torch.device("cpu"))


def _auto_args(memory_gib: float) -> list[str]:
    return ["--tokens-per-micro-batch", "auto", "--max-memory-gib", repr(memory_gib)]


def _between(shards: Path, output: Path, packs: int) -> float:
    """A --max-memory-gib halfway between plan's peaks for ``packs`` and twice as many packs, for the CLI run."""
    cfg = cli_equivalent(shards, output, tokens_per_micro_batch="auto", max_memory_gib=1.0)
    inv, max_len, sum_sq = plan_inputs(cfg)
    peaks = _peaks(inv, Setting("lora", max_len, "off", dtype_bytes=4), sum_sq)  # the CLI run: fp32 LoRA on CPU
    k = packs.bit_length() - 1
    return (peaks[k] + peaks[k + 1]) / 2 / GIB


def test_offloaded_inputs_leave_the_host_check_s_reserve_free(synthetic_shards: Path, tmp_path: Path) -> None:
    """Auto sizes the offloaded layer inputs for the host memory less the reserve that ``train run``'s check before
    the first step keeps free, so the run never refuses the budget auto chose for it."""
    from padless.train.offload_budget import HOST_RESERVE, check_run_host_memory
    from padless.train.plan import model_config

    cfg = cli_equivalent(synthetic_shards, tmp_path / "run", tokens_per_micro_batch="auto", max_memory_gib=8.0,
                         checkpointing="offload")  # fmt: skip
    inv, max_len, _ = plan_inputs(cfg)
    one_pack = estimate(inv, Setting.of_run(cfg, max_len, 4)).host  # every candidate pins as much (8 MiB buffers)
    config = model_config(cfg, open_shards(synthetic_shards).vocab_size)
    exact = (one_pack + HOST_RESERVE) / GIB  # one pack's pinned inputs and the reserve, not a byte more
    pinned = r"even one pack \(128 tokens\) pins [\d.]+ MiB in host memory \(the offloaded layer inputs\)"
    with pytest.raises(TrainError, match=pinned):
        auto_budget(dataclasses.replace(cfg, host_mem_gib=exact - 0.001), tmp_path / "run", torch.device("cpu"), 4)
    sized = dataclasses.replace(cfg, host_mem_gib=exact)
    tokens = auto_budget(sized, tmp_path / "run", torch.device("cpu"), 4).tokens
    # the run's own check takes it
    check_run_host_memory(
        sized, config, torch.float32, tokens, device=torch.device("cpu"), vocab_params=inv.vocab_params
    )


def test_a_cli_run_sizes_prints_and_records_the_budget(synthetic_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    memory = _between(synthetic_shards, out, packs=4)
    args = ["run", str(synthetic_shards), "--output", str(out), *CLI_FAST, "--max-steps", "2", "--save-every", "1"]
    r = CliRunner().invoke(main, [*args, *_auto_args(memory)])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stderr.splitlines() if "--tokens-per-micro-batch auto" in x)
    assert line.startswith("note: --tokens-per-micro-batch auto: 512 tokens (4 packs of 128), predicted peak ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_per_micro_batch"] == 512 and 0 < summary["predicted_peak_gib"] <= memory
    assert summary["config"]["tokens_per_micro_batch"] == "auto"
    assert read_checkpoint_settings(latest_checkpoint(out))["tokens_per_micro_batch"] == 512
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(128 < s["tokens"] <= 512 for s in steps)  # several packs per micro-batch


def test_a_resumed_auto_run_keeps_its_checkpoint_s_budget(synthetic_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    small, large = _between(synthetic_shards, out, packs=2), _between(synthetic_shards, out, packs=8)
    cfg = cli_equivalent(synthetic_shards, out, tokens_per_micro_batch="auto", max_memory_gib=small, max_steps=3,
                         save_every=1)  # fmt: skip
    run_interrupted(cfg, after_step=1)
    assert read_checkpoint_settings(latest_checkpoint(out))["tokens_per_micro_batch"] == 256
    # More memory now would choose 1024 tokens, but the resumed run's data order depends on its budget.
    resumed = dataclasses.replace(cfg, max_memory_gib=large, resume=True)
    assert auto_budget(resumed, out, torch.device("cpu"), 4).tokens == 256
    r = CliRunner().invoke(main, ["run", "--config", str(out / "config.yaml"), "--resume", *_auto_args(large)])
    assert r.exit_code == 0, r.output
    assert "note: --tokens-per-micro-batch auto: 256 tokens, as in step-00000001 of the resumed run" in r.stderr
    assert json.loads((out / "summary.json").read_text())["tokens_per_micro_batch"] == 256
    fresh = dataclasses.replace(resumed, output=str(tmp_path / "new"), resume=False)
    assert auto_budget(fresh, tmp_path / "new", torch.device("cpu"), 4).tokens == 1024


def test_auto_on_cpu_without_max_memory_gib_is_one_error_and_writes_nothing(
    synthetic_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(out), *CLI_FAST,
                                  "--tokens-per-micro-batch", "auto"])  # fmt: skip
    assert_one_line_error(r, r"^error: --tokens-per-micro-batch auto sizes the micro-batch by a GPU's memory, and "
                             r"device cpu has none to read: pass a number .* or --max-memory-gib N$")  # fmt: skip
    assert not out.exists()


def test_not_even_one_pack_fitting_stops_the_run_before_it_writes(synthetic_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(synthetic_shards), "--output", str(out), *CLI_FAST,
                                  *_auto_args(1e-5)])  # fmt: skip
    match = (r"even one pack \(128 tokens\) is predicted to peak at [\d.]+ GiB, more than the 0\.00 GiB available "
             r"\(--max-memory-gib 1e-05\); try --checkpointing on or offload, --qlora")  # fmt: skip
    assert_one_line_error(r, match)
    assert not out.exists()
