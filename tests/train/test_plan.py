"""train plan: the persistent lines equal what a real model holds, the shards' attention work is counted exactly,
the table marks what fits and recommends the fastest setting that does, and bad options are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from padless.kernels.indexing import needs_long_indexing
from padless.shards.cli_config import click_options, config_from_params
from padless.shards.reader import open_shards
from padless.train import plan as plan_mod
from padless.train.adapters import apply_adapters
from padless.train.cli import main
from padless.train.config import PlanConfig, TrainConfig, TrainError
from padless.train.memory_breakdown import persistent_bytes
from padless.train.metrics import step_flop_model
from padless.train.modeling import load_model, tiny_config
from padless.train.offload_budget import HOST_RESERVE, CheckpointShape, plan_offload
from padless.train.plan import Estimate, Setting, estimate, inventory, recommend, shard_statistics
from tests.user_errors import assert_one_line_error

SHAPE = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2}  # fmt: skip


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_persistent_lines_match_the_loaded_model(mode: str) -> None:
    """Weights, adapters, gradients and AdamW state as planned from the meta model are what a loaded bf16 (or NF4)
    model with LoRA r 8 holds after one optimizer step."""
    config = tiny_config("qwen3", 300, **SHAPE)
    model = load_model(None, vocab_size=300, family="qwen3", dtype=torch.bfloat16, quantize_4bit=mode == "qlora",
                       config_overrides=SHAPE)  # fmt: skip
    model = apply_adapters(model, mode=mode, r=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    held = persistent_bytes(model, optimizer)
    planned = estimate(inventory(config), Setting(mode, 1024, "on", lora_r=8))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    steps = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    assert planned.trainable == held["trainable"] and planned.gradients == held["gradients"]
    assert planned.optimizer == held["optimizer"] - steps
    if mode == "lora":
        assert planned.weights == held["weights"] - buffers
    else:  # NF4: the quantization state's small tensors are planned per weight, not exactly
        assert planned.weights == pytest.approx(held["weights"] - buffers, rel=0.03)
    # --memory low: the frozen vocabulary (tied here: one matrix) moves from the GPU's weights to host memory, where
    # it pins a block rounded up to a power of two (150 KiB: 256 KiB).
    keep_vocab_on_host_bytes = model.get_input_embeddings().weight.numel() * 2
    low = estimate(inventory(config), Setting(mode, 1024, "on", lora_r=8, memory="low"))
    assert planned.weights - low.weights == keep_vocab_on_host_bytes
    assert low.host - planned.host == 1 << (keep_vocab_on_host_bytes - 1).bit_length() == 256 * 2**10
    # ... but it is loaded onto the GPU first, and NF4 quantizes each projection from bf16 there.
    largest_bf16 = SHAPE["intermediate_size"] * SHAPE["hidden_size"] * 2  # gate/up/down_proj
    assert low.load == planned.load == planned.weights + (largest_bf16 if mode == "qlora" else 0)
    assert low.load - low.weights == keep_vocab_on_host_bytes + (largest_bf16 if mode == "qlora" else 0)


def test_plan_predicts_what_train_run_runs_under_memory_low() -> None:
    from padless.train.memory_setting import LOW_MEMORY_MLP_TILE, LOW_MEMORY_ONLOAD_TOKENS
    from padless.train.plan import _as_run

    short = _as_run(Setting("qlora", LOW_MEMORY_ONLOAD_TOKENS, "off", memory="low"))
    assert (short.checkpointing, short.optimizer, short.mlp_tile) == ("on", "adamw8bit", LOW_MEMORY_MLP_TILE)
    assert _as_run(Setting("qlora", LOW_MEMORY_ONLOAD_TOKENS * 2, "off", memory="low")).checkpointing == "offload"
    assert _as_run(Setting("lora", 2048, "on", memory="low")).checkpointing == "on"
    assert _as_run(Setting("lora", 2048, "off")) == Setting("lora", 2048, "off")


def test_shard_statistics_count_every_example(synthetic_shards: Path) -> None:
    ss = open_shards(synthetic_shards)
    lengths = [np.diff(np.asarray(ss[i].cu_seqlens)) for i in range(len(ss))]
    tokens = sum(int(ss[i].num_tokens) for i in range(len(ss)))
    max_len, sum_sq_per_token = shard_statistics(str(synthetic_shards))
    assert max_len == ss.manifest["max_len"]
    assert sum_sq_per_token == pytest.approx(sum(int((x.astype(np.int64) ** 2).sum()) for x in lengths) / tokens)


def test_step_memory_grows_with_tokens_and_falls_with_checkpointing() -> None:
    inv = inventory(tiny_config("qwen3", 1000, **SHAPE, num_hidden_layers=6))
    by = {(ckpt, t): estimate(inv, Setting("lora", t, ckpt)).step for ckpt in ("off", "on", "offload")
          for t in (1024, 4096)}  # fmt: skip
    for ckpt in ("off", "on", "offload"):
        assert by[ckpt, 4096] > by[ckpt, 1024]
    assert by["off", 4096] > by["on", 4096] > by["offload", 4096]
    offload = estimate(inv, Setting("lora", 4096, "offload"))
    shape = CheckpointShape(inv.layers, inv.hidden, inv.heads, inv.head_dim, 2)
    assert offload.host == plan_offload(shape, 4096).host_bytes >= inv.layers * 4096 * inv.hidden * 2


def test_kept_attention_and_a_gpu_share_move_checkpoint_bytes_where_the_run_puts_them() -> None:
    inv = inventory(tiny_config("qwen3", 1000, **SHAPE, num_hidden_layers=6))
    T, width = 8192, inv.heads * inv.head_dim
    pair = T * width * 2 + T * inv.heads * 4  # attention output (bf16) and log-sum-exp (fp32) per layer
    on, on_keep = (estimate(inv, Setting("lora", T, "on", keep_attention=k)) for k in (False, True))
    assert on_keep.step - on.step == inv.layers * pair and on_keep.host == on.host == 0
    off, off_keep = (estimate(inv, Setting("lora", T, "offload", keep_attention=k)) for k in (False, True))
    assert off_keep.host > off.host and off_keep.step - off.step == 2 * pair  # the two layers in flight
    layer = T * inv.hidden * 2 + pair
    shared = estimate(inv, Setting("lora", T, "offload", keep_attention=True, checkpoint_gpu_bytes=2 * layer))
    # Two top layers stay: the backward starts on them with one offloaded layer coming back, 3 checkpoints, one more
    # than the 2 in flight further down (by then the GPU-held ones are freed).
    assert shared.step - off_keep.step == layer and shared.host < off_keep.host
    everything = estimate(inv, Setting("lora", T, "offload", keep_attention=True, checkpoint_gpu_bytes=10**12))
    assert everything.host == 0 and everything.step == on_keep.step
    # Kept attention skips the recompute's attention forward (one 8K document: of 4 attention passes, forward,
    # backward = 2 and recompute, 3 are left) and nothing else: the time saved is one attention forward per layer
    # at the forward kernel's rate.
    plain, kept = (estimate(inv, Setting("lora", T, "on", keep_attention=k), sum_sq_per_token=T) for k in (False, True))
    flops = [step_flop_model(inv.matmul_params, inv.layers, inv.heads, inv.head_dim, full=False, checkpointing="on",
                             keep_attention=k).step_flops(T, T * T) for k in (False, True)]  # fmt: skip
    forward = 2.0 * inv.layers * inv.heads * inv.head_dim * T * T
    assert flops[0] - flops[1] == pytest.approx(forward)
    assert plain.step_s - kept.step_s == pytest.approx(forward / plan_mod.attention_rates(T)[0])


def test_attention_is_timed_at_the_kernels_rates_forward_and_backward_apart() -> None:
    """A long document's step: the matmuls at the mode's utilisation, then every attention forward (the forward
    and, with checkpointing, its recompute) at the forward kernel's rate and one backward, 2.5 forwards of FLOPs,
    at the backward's."""
    inv = inventory(tiny_config("qwen3", 1000, **SHAPE, num_hidden_layers=6))
    T = 131072
    forward = 2.0 * inv.layers * inv.heads * inv.head_dim * T * T
    fwd_rate, bwd_rate = plan_mod.attention_rates(T)
    rates = 1.0 / fwd_rate, 2.5 / bwd_rate
    for ckpt, forwards in (("off", 1), ("on", 2), ("offload", 2)):
        short, long = (estimate(inv, Setting("lora", T, ckpt), sum_sq_per_token=s) for s in (0.0, T))
        assert long.step_s - short.step_s == pytest.approx(forward * (forwards * rates[0] + rates[1])), ckpt
    assert bwd_rate < fwd_rate <= plan_mod._PEAK_FLOPS


def test_attention_rates_follow_the_measured_lengths() -> None:
    """The measured rates at the measured lengths, held outside them, and in between a blend that falls with the
    length (a 512K sequence's attention runs slower than a 128K one's)."""
    (l0, f0, b0), (l1, f1, b1) = plan_mod._ATTENTION_RATES
    assert plan_mod.attention_rates(l0) == pytest.approx((f0, b0))
    assert plan_mod.attention_rates(l1) == pytest.approx((f1, b1))
    assert plan_mod.attention_rates(1000) == pytest.approx((f0, b0)) == plan_mod.attention_rates(0)
    assert plan_mod.attention_rates(4 * l1) == pytest.approx((f1, b1))
    mid = plan_mod.attention_rates((l0 * l1) ** 0.5)  # halfway in log length: halfway in rate
    assert mid == pytest.approx(((f0 + f1) / 2, (b0 + b1) / 2))
    lengths = [l0 * 1.5**i for i in range(5)]
    fwd = [plan_mod.attention_rates(n)[0] for n in lengths]
    assert fwd == sorted(fwd, reverse=True) and fwd[0] > fwd[-1]
    # A 512K document's step takes its attention at the 512K rates.
    inv = inventory(tiny_config("qwen3", 1000, **SHAPE, num_hidden_layers=2))
    T = int(l1)
    forward = 2.0 * inv.layers * inv.heads * inv.head_dim * T * T
    short, long = (estimate(inv, Setting("lora", T, "off"), sum_sq_per_token=s) for s in (0.0, T))
    assert long.step_s - short.step_s == pytest.approx(forward * (1 / f1 + 2.5 / b1))


def test_a_pack_past_int32_offsets_takes_the_int64_forward_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """One token more than a q of 2**31 elements switches the attention kernels to int64 offsets, and the plan
    times that pack's attention forward at the int64 rate; the backward keeps its rate."""
    monkeypatch.delenv("PADLESS_FORCE_LONG_INDEXING", raising=False)  # the kernels' own rule, not the override
    inv = inventory(tiny_config("qwen3", 1000, **SHAPE, num_hidden_layers=2))
    length = 4096.0  # one example length for both packs: the same kernel rates apart from the offsets
    fwd_rate, bwd_rate = plan_mod.attention_rates(length)
    last_int32 = 2**31 // (inv.heads * inv.head_dim)
    for T, forward_rate in ((last_int32, fwd_rate), (last_int32 + 1, fwd_rate * plan_mod._LONG_INDEX_FORWARD)):
        q = torch.empty(T, inv.heads, inv.head_dim, device="meta")  # the kernels' rule on the packed q
        assert needs_long_indexing(q) == (forward_rate != fwd_rate), T
        forward = 2.0 * inv.layers * inv.heads * inv.head_dim * length * T
        short, long = (estimate(inv, Setting("lora", T, "off"), sum_sq_per_token=s) for s in (0.0, length))
        assert long.step_s - short.step_s == pytest.approx(forward * (1 / forward_rate + 2.5 / bwd_rate)), T
    assert plan_mod._LONG_INDEX_FORWARD < 1


def test_checkpoint_segments_divide_the_checkpoints_and_add_a_recompute() -> None:
    """--checkpoint-layers 2 over 6 layers: 3 checkpoints instead of 6 (on the GPU or the host), one more hidden
    state alive in a segment's backward, and a third of the layers forwarded once more."""
    inv = inventory(tiny_config("qwen3", 1000, **SHAPE, num_hidden_layers=6))
    T, checkpoint = 8192, 8192 * inv.hidden * 2
    one, two = (estimate(inv, Setting("lora", T, "on", checkpoint_layers=k)) for k in (1, 2))
    assert one.step - two.step == 3 * checkpoint - checkpoint  # 3 fewer kept, 1 more in the segment's backward
    assert two.step_s > one.step_s
    off1, off2 = (estimate(inv, Setting("lora", T, "offload", checkpoint_layers=k)) for k in (1, 2))
    shape = CheckpointShape(3, inv.hidden, inv.heads, inv.head_dim, 2)
    assert off2.host == plan_offload(shape, T).host_bytes and off1.host == 2 * off2.host


def _estimate(tokens: int, peak: int, host: int = 0) -> Estimate:
    return Estimate(Setting("lora", tokens, "on"), peak, 0, 0, 0, 0, host, step_s=1.0)


def test_recommend_takes_the_fastest_that_fits() -> None:
    small, large, huge = _estimate(1024, 10), _estimate(4096, 20), _estimate(8192, 40)
    assert recommend([small, large, huge], gpu_bytes=30) is large
    assert recommend([small, large, huge], gpu_bytes=5) is None
    offloaded = _estimate(8192, 25, host=100)
    assert recommend([small, offloaded], gpu_bytes=30, host_bytes=50) is small
    assert recommend([small, offloaded], gpu_bytes=30, host_bytes=200) is offloaded


def test_cli_marks_what_fits_and_recommends(synthetic_shards: Path) -> None:
    args = ["plan", str(synthetic_shards), "--family", "qwen3", "--model-overrides", json.dumps(SHAPE),
            "--modes", "lora,qlora", "--checkpointing", "on", "--tokens", "512,2k", "--gpu-mem-gib", "1.5"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len([line for line in lines if line.startswith(("lora ", "qlora "))]) == 4
    assert lines[-1].startswith("recommended for 0.5 GiB usable: --lora --tokens-per-micro-batch 2048")
    as_json = CliRunner().invoke(main, [*args, "--json"])
    rows = [json.loads(line) for line in as_json.output.splitlines()]
    assert {(r["mode"], r["tokens"]) for r in rows} == {("lora", 512), ("lora", 2048), ("qlora", 512), ("qlora", 2048)}
    assert all(r["fits"] is True for r in rows)


def _parsed_by_train_run(options: list[str]) -> TrainConfig:
    """``options`` as ``train run``'s own command-line parser reads them (``--config`` and defaults included)."""
    seen: list[TrainConfig] = []

    @click.command()
    @click_options(TrainConfig)
    def run(**params: object) -> None:
        seen.append(config_from_params(TrainConfig, params))

    result = CliRunner().invoke(run, ["shards", *options])
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize(
    "setting",
    [
        Setting("lora", 262144, "offload", mlp_tile=8192, keep_attention=True, checkpoint_gpu_bytes=int(24.2 * 2**30)),
        Setting(
            "qlora", 1 << 20, "offload", lora_r=32, checkpoint_layers=2, checkpoint_gpu_bytes=24 * 2**30, mlp_tile=8192
        ),
        Setting("full", 4096, "on", optimizer="adamw8bit", dtype_bytes=4),
        Setting("qlora", 8192, "offload", memory="low"),
        Setting("lora", 2048, "off"),
    ],
)
def test_recommended_options_run_the_predicted_setting(setting: Setting) -> None:
    """What `train plan` recommends, read by `train run`'s parser, is the setting it predicted: the MLP tile, the
    kept attention, the GPU share of the checkpoints, segments, rank, optimizer and dtype all come through."""
    cfg = _parsed_by_train_run(setting.run_options())
    dtype_bytes = 4 if cfg.dtype == "fp32" else 2
    run_as = plan_mod._as_run(Setting.of_run(cfg, cfg.tokens_per_micro_batch, dtype_bytes))
    assert run_as == plan_mod._as_run(setting)


def test_cli_recommends_a_complete_command(synthetic_shards: Path) -> None:
    """The recommended line carries the options the plan was asked for (here the MLP tile and kept attention),
    not only the mode, tokens and checkpointing."""
    args = ["plan", str(synthetic_shards), "--family", "qwen3", "--model-overrides", json.dumps(SHAPE), "--modes",
            "lora", "--checkpointing", "offload", "--tokens", "2k", "--gpu-mem-gib", "8", "--host-mem-gib", "64",
            "--mlp-tile-tokens", "256", "--keep-attention"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    line = result.output.splitlines()[-1]
    assert line.startswith("recommended for") and " --keep-attention" in line and " --mlp-tile-tokens 256 " in line


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_a_gpu_share_is_planned_and_recommended_for_offloaded_rows_only(synthetic_shards: Path, memory: str) -> None:
    """``--checkpoint-gpu-gib`` splits offloaded checkpoints; ``train run`` refuses it with checkpointing off or on,
    so those rows carry no share and the recommended line (here an ``off`` or ``on`` row) runs as printed."""
    args = ["plan", str(synthetic_shards), "--family", "qwen3", "--model-overrides", json.dumps(SHAPE), "--modes",
            "lora", "--tokens", "2k", "--gpu-mem-gib", "8", "--host-mem-gib", "64", "--checkpoint-gpu-gib", "1",
            "--memory", memory]  # fmt: skip
    rows = [json.loads(line) for line in CliRunner().invoke(main, [*args, "--json"]).output.splitlines()]
    assert {(r["checkpointing"], r["checkpoint_gpu_gib"]) for r in rows} >= {("on", 0.0), ("offload", 1.0)}
    assert all(r["checkpoint_gpu_gib"] == (1.0 if r["checkpointing"] == "offload" else 0.0) for r in rows)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    line = result.output.splitlines()[-1]
    assert line.startswith("recommended for") and "--checkpointing offload" not in line
    options = line.split(": ", 1)[1].split(" (predicted")[0].split()
    assert "--checkpoint-gpu-gib" not in options
    _parsed_by_train_run(options)


def test_cli_plans_long_context_options(synthetic_shards: Path) -> None:
    args = ["plan", str(synthetic_shards), "--family", "qwen3", "--model-overrides", json.dumps(SHAPE), "--modes",
            "lora", "--checkpointing", "on,offload", "--tokens", "2k", "--gpu-mem-gib", "8", "--json"]  # fmt: skip
    plain = [json.loads(line) for line in CliRunner().invoke(main, args).output.splitlines()]
    kept = CliRunner().invoke(main, [*args, "--keep-attention", "--mlp-tile-tokens", "256"])
    assert kept.exit_code == 0, kept.output
    kept_rows = [json.loads(line) for line in kept.output.splitlines()]
    for a, b in zip(plain, kept_rows, strict=True):
        assert a["checkpointing"] == b["checkpointing"]
        assert b["host_gib"] >= a["host_gib"] and b["host_gib"] + b["step_gib"] != a["host_gib"] + a["step_gib"]
    segments = CliRunner().invoke(main, [*args, "--checkpoint-layers", "2"])
    assert segments.exit_code == 0, segments.output
    for a, b in zip(plain, map(json.loads, segments.output.splitlines()), strict=True):
        assert b["checkpoint_layers"] == 2 and b["step_s"] > a["step_s"]
        assert b["host_gib"] + b["step_gib"] <= a["host_gib"] + a["step_gib"]  # two layers: one kept, one rebuilt
    table = CliRunner().invoke(main, [*args[:-1], "--checkpoint-layers", "2"])
    assert " on/2 " in table.output and " offload/2 " in table.output


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--modes", "lora,dora"], r"--modes 'lora,dora': unknown 'dora'; expected a comma list of lora, qlora, full"),
        (["--checkpointing", "sometimes"], r"--checkpointing 'sometimes': unknown 'sometimes'"),
        (["--tokens", "4k,lots"], r"--tokens '4k,lots': 'lots' is not a token count"),
        (["--tokens", "16"], r"--tokens 16: below the shards' longest pack"),
        (["--gpu-mem-gib", "0"], r"--gpu-mem-gib must be > 0 GiB"),
        (["--gpu-mem-gib", "0.5"], r"^error: --gpu-mem-gib 0.5 leaves nothing for training: 1 GiB of a card goes"),
        (["--gpu-mem-gib", "inf"], r"^error: --gpu-mem-gib must be > 0 GiB and finite, got inf$"),
        (["--host-mem-gib", "inf"], r"^error: --host-mem-gib must be > 0 GiB and finite, got inf$"),
        (["--model-overrides", "{bad"], r"--model-overrides is not valid JSON"),
    ],
)
def test_bad_options_are_one_line_errors(synthetic_shards: Path, args: list[str], match: str) -> None:
    result = CliRunner().invoke(main, ["plan", str(synthetic_shards), *args])
    assert_one_line_error(result, match)


def test_a_config_without_llama_sizes_is_one_error(synthetic_shards: Path, tmp_path: Path) -> None:
    """GPT-2 names its MLP width n_inner: ``train plan`` and ``train run --tokens-per-micro-batch auto`` say they
    cannot size it instead of an AttributeError."""
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", vocab_size=384, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    match = r"^error: train plan sizes decoders by .* model_type 'gpt2' gives no intermediate_size, so it cannot"
    plan = ["plan", str(synthetic_shards), "--model", str(tmp_path / "gpt2"), "--gpu-mem-gib", "8"]
    assert_one_line_error(CliRunner().invoke(main, plan), match)
    run = ["run", str(synthetic_shards), "--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "out"),
           "--device", "cpu", "--tokens-per-micro-batch", "auto", "--max-memory-gib", "8"]  # fmt: skip
    line = assert_one_line_error(CliRunner().invoke(main, run), match)
    assert line.endswith("give --tokens-per-micro-batch N instead of auto")
    assert not (tmp_path / "out").exists()


def test_a_run_config_is_planned_from_the_same_inputs(synthetic_shards: Path) -> None:
    """``train run --tokens-per-micro-batch auto`` predicts from what ``train plan`` reads for the same model."""
    from padless.train.config import TrainConfig
    from padless.train.plan import plan_inputs, usable_bytes

    shape = json.dumps(SHAPE)
    run = TrainConfig(shards=str(synthetic_shards), family="qwen3", model_overrides=shape)
    planned = PlanConfig(shards=str(synthetic_shards), family="qwen3", model_overrides=shape)
    inv, max_len, sum_sq_per_token = plan_inputs(run)
    assert (inv, max_len, sum_sq_per_token) == plan_inputs(planned)
    assert (inv.hidden, max_len) == (256, open_shards(synthetic_shards).max_len)
    assert usable_bytes(3 * 2**30) == 2 * 2**30


def test_plan_config_checks_its_fields() -> None:
    with pytest.raises(TrainError, match="--lora-r must be >= 1"):
        PlanConfig(shards="s", lora_r=0)
    with pytest.raises(TrainError, match="--mlp-tile-tokens must be >= 0"):
        PlanConfig(shards="s", mlp_tile_tokens=-1)
    with pytest.raises(TrainError, match="--checkpoint-gpu-gib must be >= 0 GiB"):
        PlanConfig(shards="s", checkpoint_gpu_gib=-1.0)
    with pytest.raises(TrainError, match="--checkpoint-layers must be >= 1"):
        PlanConfig(shards="s", checkpoint_layers=0)
    with pytest.raises(TrainError, match="--checkpoint-layers with --keep-attention"):
        PlanConfig(shards="s", checkpoint_layers=2, keep_attention=True)
    assert PlanConfig(shards="s", tokens="1k, 4096").token_list == (1024, 4096)


def test_plan_offers_the_gpu_share_that_fits_the_host(synthetic_shards: Path) -> None:
    """Offloaded checkpoints the host cannot hold: the next row keeps the smallest share of them on the GPU that
    leaves the host part within the host memory less train run's reserve, and that row is recommended."""
    shape = {**SHAPE, "num_hidden_layers": 8}
    args = ["plan", str(synthetic_shards), "--family", "qwen3", "--model-overrides", json.dumps(shape), "--modes",
            "lora", "--checkpointing", "offload", "--tokens", "64k", "--gpu-mem-gib", "40"]  # fmt: skip
    inv = inventory(tiny_config("qwen3", 1000, **shape))
    split = plan_offload(CheckpointShape(inv.layers, inv.hidden, inv.heads, inv.head_dim, 2), 65536)
    host_gib = (split.host_bytes + HOST_RESERVE) / 2**30 - 0.01  # a little short of everything on the host
    rows = [json.loads(line) for line in CliRunner().invoke(main, [*args, "--host-mem-gib", str(host_gib),
                                                                   "--json"]).output.splitlines()]  # fmt: skip
    assert [(r["checkpoint_gpu_gib"] > 0, r["fits"]) for r in rows] == [(False, False), (True, True)]
    assert 0 < rows[1]["host_gib"] <= host_gib - HOST_RESERVE / 2**30 < rows[0]["host_gib"]
    shown = CliRunner().invoke(main, [*args, "--host-mem-gib", str(host_gib)]).output
    assert f"--checkpoint-gpu-gib {rows[1]['checkpoint_gpu_gib']:g} " in shown.splitlines()[-1]
    roomy = [json.loads(line) for line in CliRunner().invoke(main, [*args, "--host-mem-gib", "1000",
                                                                    "--json"]).output.splitlines()]  # fmt: skip
    assert [r["checkpoint_gpu_gib"] for r in roomy] == [0.0]  # it fits: no second row


def test_the_gpu_share_offered_under_memory_low_leaves_room_for_the_vocabulary(synthetic_shards: Path) -> None:
    """Under ``--memory low`` the host also holds the vocabulary: a host a little short of checkpoints and vocabulary
    together gets the row with the GPU share that makes both fit, and that row is recommended."""
    shape = {**SHAPE, "num_hidden_layers": 8}
    inv = inventory(tiny_config("qwen3", 400_000, **shape))
    setting = Setting("lora", 65536, "offload", memory="low")
    need = estimate(inv, setting).host
    # the tied vocabulary, 195 MiB in bf16, pins a 256 MiB block
    assert inv.vocab_params == (400_000 * 256,)
    assert need - plan_offload(plan_mod._checkpoint_shape(inv, setting), 65536).host_bytes == 256 * 2**20
    host_gib = (need + HOST_RESERVE) / 2**30 - 0.01
    args = ["plan", str(synthetic_shards), "--family", "qwen3", "--model-overrides",
            json.dumps({**shape, "vocab_size": 400_000}), "--modes", "lora", "--checkpointing", "offload", "--tokens",
            "64k", "--gpu-mem-gib", "40", "--memory", "low", "--host-mem-gib", str(host_gib), "--json"]  # fmt: skip
    rows = [json.loads(line) for line in CliRunner().invoke(main, args).output.splitlines()]
    assert [(r["checkpoint_gpu_gib"] > 0, r["fits"]) for r in rows] == [(False, False), (True, True)]
    assert rows[1]["host_gib"] <= host_gib - HOST_RESERVE / 2**30


def test_segments_are_planned_for_the_host_split_and_under_memory_low(synthetic_shards: Path) -> None:
    """host_fit_split counts segments (half the host bytes at --checkpoint-layers 2), and a --memory low plan of an
    unchecked run carries the segments train run will use once it checkpoints."""
    from padless.train.plan import host_fit_split

    inv = inventory(tiny_config("qwen3", 1000, **SHAPE, num_hidden_layers=8))
    one, two = (Setting("lora", 65536, "offload", checkpoint_layers=k) for k in (1, 2))
    host_two = estimate(inv, two).host
    assert host_fit_split(inv, two, host_two) is None  # the segments' host part fits as it is
    split = host_fit_split(inv, one, host_two)  # per layer, the same host memory needs half the layers on the GPU
    assert split is not None and estimate(inv, split).host <= host_two < estimate(inv, one).host
    args = ["plan", str(synthetic_shards), "--family", "qwen3", "--model-overrides", json.dumps(SHAPE), "--modes",
            "lora", "--checkpointing", "off", "--tokens", "8k", "--memory", "low", "--checkpoint-layers", "2",
            "--gpu-mem-gib", "8", "--json"]  # fmt: skip
    rows = [json.loads(line) for line in CliRunner().invoke(main, args).output.splitlines()]
    assert [(r["checkpointing"], r["checkpoint_layers"]) for r in rows] == [("offload", 2)]


def test_a_multimodal_model_is_planned_from_its_text_config(synthetic_shards: Path, tmp_path: Path) -> None:
    """A config that keeps the decoder's sizes in ``text_config`` (Gemma 3; `train run` trains it) is planned: the
    per-token sizes are the decoder's, the weights the whole model's."""
    from transformers import AutoConfig

    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    AutoConfig.for_model("gemma3", text_config=text, vision_config=vision).save_pretrained(tmp_path / "gemma3")
    inv = inventory(AutoConfig.from_pretrained(tmp_path / "gemma3"))
    assert (inv.hidden, inv.intermediate, inv.layers, inv.heads, inv.head_dim, inv.vocab) == (64, 128, 2, 4, 16, 512)
    assert any("vision_tower" in name for name, _, _ in inv.linears)
    args = ["plan", str(synthetic_shards), "--model", str(tmp_path / "gemma3"), "--tokens", "512", "--gpu-mem-gib",
            "8", "--json"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert all(json.loads(line)["fits"] for line in result.output.splitlines())
