"""``train.offload_budget``: the bytes of the offloaded checkpoints (pinned-pool and power-of-two rounding), the
GPU/host split a ``--checkpoint-gpu-gib`` budget picks (and that the packed path runs it with unchanged losses and
gradients), the host's available memory, and the one-line error before the first step when the host is too small."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from click.testing import CliRunner

from padless.train import packed_forward
from padless.train.activation_checkpoint import HostOffload
from padless.train.adapters import apply_adapters
from padless.train.cli import main
from padless.train.config import TrainConfig, TrainError
from padless.train.modeling import tiny_config
from padless.train.offload_budget import (
    GIB,
    HOST_RESERVE,
    CheckpointShape,
    available_host_bytes,
    check_host_memory,
    check_run_host_memory,
    checkpoints_of,
    format_bytes,
    host_bytes_of,
    layers_on_gpu,
    pinned_block_bytes,
    plan_offload,
    vocab_host_bytes,
    vocab_params_of,
)
from padless.train.packed_forward import packed_loss
from padless.train.plan import Setting, estimate, host_fit_split, inventory, model_config
from tests.user_errors import assert_one_line_error

from .runs import CLI_FAST, SYNTH_VOCAB, cli_equivalent
from .tiny_models import grads_of, make_batch, randomize_lora, tiny_model, trainable

MIB = 2**20
QWEN3_8B = CheckpointShape(layers=36, hidden=4096, heads=32, head_dim=128, dtype_bytes=2)
CUDA = torch.device("cuda")  # the check's arithmetic of a CUDA run; no GPU needed


def test_checkpoint_tensor_bytes_of_qwen3_8b() -> None:
    t = 131072
    assert QWEN3_8B.tensor_bytes(t, keep_attention=False) == (GIB,)
    assert QWEN3_8B.tensor_bytes(t, keep_attention=True) == (GIB, GIB, t * 32 * 4)


def test_checkpoint_shape_reads_a_model_config() -> None:
    config = tiny_model("qwen3", num_hidden_layers=3, head_dim=16).config
    assert CheckpointShape.of(config, torch.bfloat16) == CheckpointShape(3, 32, 4, 16, 2)
    assert CheckpointShape.of(tiny_model("llama").config, torch.float32).head_dim == 8  # hidden // heads
    # --checkpoint-layers: one checkpoint per segment, the last one shorter
    assert CheckpointShape.of(config, torch.bfloat16, checkpoint_layers=2).layers == 2
    assert [checkpoints_of(36, k) for k in (1, 2, 5, 36, 40)] == [36, 18, 8, 1, 1]


def test_checkpoint_shape_reads_a_multimodal_config_s_text_config() -> None:
    """Gemma 3 keeps the decoder's sizes in ``text_config`` (its top config has no ``hidden_size``); the host check
    of ``--checkpointing offload`` reads them there."""
    from transformers import AutoConfig

    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision)
    assert CheckpointShape.of(config, torch.bfloat16) == CheckpointShape(3, 64, 4, 16, 2)
    cfg = TrainConfig(shards="x", checkpointing="offload", host_mem_gib=1.0)
    with pytest.raises(TrainError, match=r"checkpoints of 3 layers at 10000000 tokens"):
        check_run_host_memory(cfg, config, torch.bfloat16, 10**7, device=CUDA, vocab_params=())


@pytest.mark.parametrize(
    ("nbytes", "pinned"),
    [(1, 8 * MIB), (8 * MIB, 8 * MIB), (9 * MIB, 16 * MIB), (24 * MIB + 1, 32 * MIB), (768 * MIB, GIB)],
)
def test_pinned_blocks_round_to_the_granule_then_a_power_of_two(nbytes: int, pinned: int) -> None:
    assert pinned_block_bytes(nbytes, 8 * MIB) == pinned


def test_layers_on_gpu_fill_the_budget_from_the_top() -> None:
    t = 131072
    assert layers_on_gpu(0, QWEN3_8B, t, False) == 0
    assert layers_on_gpu(int(2.5 * GIB), QWEN3_8B, t, False) == 2
    assert layers_on_gpu(int(2.5 * GIB), QWEN3_8B, t, True) == 1  # 2 GiB + 16 MiB a layer
    assert layers_on_gpu(1000 * GIB, QWEN3_8B, t, False) == 36


def test_plan_counts_pinned_bytes_per_host() -> None:
    full = plan_offload(QWEN3_8B, 131072)
    assert (full.gpu_layers, full.host_layers, full.host_bytes) == (0, 36, 36 * GIB)
    # 96K tokens: a 768 MiB layer input pins a 1 GiB block
    assert plan_offload(QWEN3_8B, 98304).host_bytes == 36 * GIB
    split = plan_offload(QWEN3_8B, 131072, keep_attention=True, gpu_budget_bytes=10 * GIB, processes=2)
    assert (split.gpu_layers, split.host_layers, split.gpu_bytes) == (4, 32, 4 * (2 * GIB + 16 * MIB))
    assert split.host_layer_bytes == 2 * GIB + 16 * MIB and split.host_bytes == 2 * 32 * split.host_layer_bytes
    with pytest.raises(ValueError, match=r"processes=0.*expected"):
        plan_offload(QWEN3_8B, 10, processes=0)


@pytest.mark.parametrize("tokens", [32768, 131072, 500_000])
@pytest.mark.parametrize("keep", [False, True])
def test_the_suggested_gpu_budget_makes_the_host_part_fit(tokens: int, keep: bool) -> None:
    host = 100 * GIB
    plan = plan_offload(QWEN3_8B, tokens, keep_attention=keep)
    gib = plan.gpu_gib_for(host)
    fitted = plan_offload(QWEN3_8B, tokens, keep_attention=keep, gpu_budget_bytes=int(gib * GIB))
    assert fitted.host_bytes <= host
    if gib > 0:  # and 0.1 GiB less would not do
        less = plan_offload(QWEN3_8B, tokens, keep_attention=keep, gpu_budget_bytes=int((gib - 0.1) * GIB))
        assert less.host_bytes > host or less.gpu_layers == fitted.gpu_layers
    assert plan.gpu_gib_for(-1) is None


def test_available_host_bytes_reads_meminfo_and_a_cgroup_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemAvailable:   20971520 kB\nBuffers: 1 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_host_bytes(meminfo, cgroup) == 20 * GIB  # no cgroup files
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(f"{GIB}\n")
    assert available_host_bytes(meminfo, cgroup) == 20 * GIB  # no limit
    (cgroup / "memory.max").write_text(f"{9 * GIB}\n")
    assert available_host_bytes(meminfo, cgroup) == 8 * GIB  # the container's limit is lower
    assert available_host_bytes(tmp_path / "none", tmp_path / "none") is None
    assert available_host_bytes() is None or available_host_bytes() > 0  # this machine


def test_host_check_names_the_numbers_and_the_ways_out() -> None:
    plan = plan_offload(QWEN3_8B, 131072)
    check_host_memory(plan, 38 * GIB)  # 36 GiB + the reserve fit
    check_host_memory(plan, None)  # unknown: no check
    with pytest.raises(TrainError) as error:
        check_host_memory(plan, 30 * GIB)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("--checkpointing offload needs 36.0 GiB of pinned host memory for the checkpoints of 36")
    assert "131072 tokens per micro-batch (1.00 GiB a layer), but the host has 30.0 GiB available (2 GiB" in message
    # 28 GiB for the host part: 28 layers there, the top 8 on the GPU
    assert "--checkpointing on, keep more checkpoints on the GPU with --checkpoint-gpu-gib 8," in message
    assert message.endswith("or --qlora to free GPU memory for them (or --host-mem-gib N where the host can give "
                            "more than it has available now)")  # fmt: skip
    two = plan_offload(QWEN3_8B, 131072, processes=2)
    with pytest.raises(TrainError, match=r"72.0 GiB .*\(1.00 GiB a layer x 2 processes\)"):
        check_host_memory(two, 60 * GIB)
    with pytest.raises(TrainError, match=r"available \(2 GiB of it kept free\)\. Use a smaller"):
        check_host_memory(plan, HOST_RESERVE - 1)  # nothing fits: no --checkpoint-gpu-gib to suggest


@pytest.mark.parametrize(
    ("nbytes", "digits", "text"),
    [(36 * GIB, 1, "36.0 GiB"), (3 * GIB, 2, "3.00 GiB"), (GIB, 2, "1.00 GiB"), (GIB - MIB, 2, "1023.00 MiB"),
     (64 * MIB, 2, "64.00 MiB"), (8 * MIB, 1, "8.0 MiB"), (3 * 2**10 // 2, 2, "1.50 KiB"), (1000, 2, "1000 bytes"),
     (0, 2, "0 bytes")],
)  # fmt: skip
def test_bytes_read_in_the_largest_unit_that_keeps_them_above_one(nbytes: int, digits: int, text: str) -> None:
    assert format_bytes(nbytes, digits) == text


def test_a_small_vocabulary_and_checkpoints_read_in_mib() -> None:
    """Beside a host of a few GiB the error names a small vocabulary and small checkpoints in MiB, not as
    "0.00 GiB"."""
    with pytest.raises(TrainError, match=r"^--memory low keeps 64\.00 MiB of frozen vocabulary .* 2\.0 GiB available"):
        check_host_memory(None, HOST_RESERVE, vocab_bytes=64 * MIB)
    tiny = plan_offload(CheckpointShape(4, 32, 4, 8, 4), 4096)  # 512 KiB a layer: one 8 MiB pool buffer
    with pytest.raises(TrainError) as error:
        check_host_memory(tiny, HOST_RESERVE + 20 * MIB, vocab_bytes=256 * 2**10)
    message = str(error.value)
    assert message.startswith("--checkpointing offload needs 32.0 MiB of pinned host memory for the checkpoints of 4 "
                              "layers at 4096 tokens per micro-batch (8.00 MiB a layer), and --memory low 256.00 KiB "
                              "for the frozen vocabulary")  # fmt: skip
    assert "0.0" not in message


def test_a_run_that_pins_nothing_on_the_host_is_not_checked() -> None:
    config = tiny_model("llama").config
    huge = 10**12
    on = TrainConfig(shards="x", checkpointing="on")
    check_run_host_memory(on, config, torch.float32, huge, device=CUDA, vocab_params=())
    with pytest.raises(TrainError, match=r"--checkpointing offload needs"):
        check_run_host_memory(
            TrainConfig(shards="x", checkpointing="offload"), config, torch.float32, huge, device=CUDA, vocab_params=()
        )


def test_the_host_check_counts_segments() -> None:
    """36 layers at 128K tokens need 36 GiB pinned; a checkpoint per two layers needs 18."""
    config = tiny_model("qwen3", num_hidden_layers=36).config
    tokens = GIB // (config.hidden_size * 2)  # 1 GiB a checkpoint in bf16
    cfg = dict(shards="x", checkpointing="offload", host_mem_gib=30.0)
    with pytest.raises(TrainError, match=r"needs 36\.0 GiB .*--checkpoint-layers 2"):
        check_run_host_memory(TrainConfig(**cfg), config, torch.bfloat16, tokens, device=CUDA, vocab_params=())
    segments = TrainConfig(**cfg, checkpoint_layers=2)
    check_run_host_memory(segments, config, torch.bfloat16, tokens, device=CUDA, vocab_params=())
    tight = dict(cfg, host_mem_gib=12.0)  # 10 GiB for 18 segments of 2 layers: 4 layers a checkpoint need 9
    with pytest.raises(TrainError, match=r"of 18 segments of 2 layers .*GiB a segment of 2 layers.*"
                                         r"--checkpoint-layers 4\)"):  # fmt: skip
        check_run_host_memory(
            TrainConfig(**tight, checkpoint_layers=2), config, torch.bfloat16, tokens, device=CUDA, vocab_params=()
        )
    with pytest.raises(TrainError) as refused:  # 3 GiB: even halving does not fit, so it is not offered
        check_run_host_memory(TrainConfig(**dict(cfg, host_mem_gib=5.0), checkpoint_layers=2), config,
                              torch.bfloat16, tokens, device=CUDA, vocab_params=())  # fmt: skip
    assert "--checkpoint-layers" not in str(refused.value)


def test_train_run_stops_before_the_first_step_when_the_host_is_too_small(synthetic_shards: Path, tmp_path) -> None:
    """A micro-batch budget whose offloaded checkpoints need terabytes: one line, exit 2, nothing written."""
    args = ["run", str(synthetic_shards), "--output", str(tmp_path / "out"), *CLI_FAST, "--max-steps", "1"]
    result = CliRunner().invoke(main, [*args, "--checkpointing", "offload", "--tokens-per-micro-batch", str(10**10)])
    assert_one_line_error(result, r"^error: --checkpointing offload needs \d+\.\d GiB of pinned host memory .*--qlora")
    assert not (tmp_path / "out").exists()


def test_the_vocabulary_is_counted_as_plan_counts_it() -> None:
    """A tied pair once; under ``--memory low`` only, and not when full fine-tuning trains it; the same bytes as
    ``train plan``'s host column beside the checkpoints, while the GPU saves the tensors' own bytes."""
    tied, untied = (tiny_model("qwen3", tie_word_embeddings=tie) for tie in (True, False))
    values = tied.config.vocab_size * tied.config.hidden_size
    assert vocab_params_of(tied) == (values,)
    assert vocab_params_of(untied) == (values, values)
    settings = [("low", "lora"), ("low", "qlora"), ("low", "full"), ("fast", "lora")]
    assert [vocab_host_bytes(m, mode, (1024,), 2) for m, mode in settings] == [2048, 2048, 0, 0]
    config = tiny_config("qwen3", 4000, tie_word_embeddings=False)
    inv = inventory(config)  # train plan's count, from the model on the meta device
    assert inv.vocab_params == (4000 * config.hidden_size,) * 2
    for ckpt in ("on", "offload"):
        low, fast = (estimate(inv, Setting("lora", 4096, ckpt, memory=m)) for m in ("low", "fast"))
        assert low.host - fast.host == vocab_host_bytes("low", "lora", inv.vocab_params, 2) > 0
        assert fast.weights - low.weights == 2 * 4000 * config.hidden_size * 2


def test_the_vocabulary_pins_a_power_of_two_per_tensor() -> None:
    """``train.host_vocab`` pins the embedding and an untied head as one tensor each, and torch's caching host
    allocator rounds each block up to a power of two: Qwen3-8B's pair of 1.16 GiB tensors pins 4 GiB, not 2.32."""
    shape = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "intermediate_size": 12288, "num_hidden_layers": 1}  # fmt: skip
    config = tiny_config("qwen3", 151936, tie_word_embeddings=False, **shape)
    inv = inventory(config)
    assert inv.vocab_params == (151936 * 4096,) * 2
    assert vocab_host_bytes("low", "lora", inv.vocab_params, 2) == 4 * GIB
    assert vocab_host_bytes("low", "lora", (GIB // 2,), 2) == GIB  # a power of two already: no rounding
    low, fast = (estimate(inv, Setting("qlora", 4096, "on", memory=m)) for m in ("low", "fast"))
    assert low.host - fast.host == 4 * GIB
    assert fast.weights - low.weights == 2 * 151936 * 4096 * 2  # the GPU saves the tensors, unrounded


def test_a_model_without_an_output_head_counts_its_embedding() -> None:
    """``get_output_embeddings()`` None: nothing but the embedding to move, and no crash."""
    model = tiny_model("qwen3", tie_word_embeddings=False)
    model.get_output_embeddings = lambda: None
    assert vocab_params_of(model) == (model.config.vocab_size * model.config.hidden_size,)


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_train_run_of_a_model_without_an_output_head(synthetic_shards: Path, tmp_path, monkeypatch, memory) -> None:
    """The host check before the first step does not trip over ``get_output_embeddings()`` None (``--memory fast``
    does not count the vocabulary at all): the patch's one line says what is missing."""
    from transformers import LlamaForCausalLM  # the CLI's default --family

    monkeypatch.setattr(LlamaForCausalLM, "get_output_embeddings", lambda self: None)
    args = ["run", str(synthetic_shards), "--output", str(tmp_path / "out"), *CLI_FAST, "--max-steps", "1"]
    result = CliRunner().invoke(main, [*args, "--memory", memory])
    assert_one_line_error(result, r"^error: model_type 'llama': no output embedding \(lm_head\)")


def test_the_run_s_check_counts_the_vocabulary_of_memory_low() -> None:
    """36 checkpoints of 1 GiB fit a 40 GiB host (38 beside the reserve); a 3 GiB vocabulary beside them does not,
    and the error names both, the GPU share that leaves room for the vocabulary, and --memory fast. A vocabulary
    the host cannot hold by itself gets its own line; full fine-tuning keeps its vocabulary on the GPU. On the CPU
    ``train.host_vocab`` moves nothing, so only the checkpoints count."""
    config = tiny_config("qwen3", 1000, num_hidden_layers=36)
    tokens = GIB // (config.hidden_size * 2)  # 1 GiB a checkpoint in bf16
    vocab_params = (GIB, GIB // 2)  # 3 GiB in bf16: powers of two, pinned as they are

    def check(cfg: TrainConfig, device: torch.device | str = CUDA) -> None:
        check_run_host_memory(cfg, config, torch.bfloat16, tokens, device=device, vocab_params=vocab_params)

    low = TrainConfig(shards="x", checkpointing="offload", memory="low", host_mem_gib=40.0)
    check(dataclasses.replace(low, memory="fast"))
    check(dataclasses.replace(low, mode="full"))
    with pytest.raises(TrainError) as error:
        check(low)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "--checkpointing offload needs 36.0 GiB of pinned host memory for the checkpoints of 36 layers at "
        f"{tokens} tokens per micro-batch (1.00 GiB a layer), and --memory low 3.00 GiB for the frozen vocabulary "
        "(embedding and lm_head), but the host has 40.0 GiB available (2 GiB of it kept free). "
    )
    # 35 GiB for the checkpoints beside the vocabulary: the top one on the GPU
    assert "--checkpoint-gpu-gib 1, a checkpoint per 2 layers (--checkpoint-layers 2), --memory fast to keep" in message
    check(dataclasses.replace(low, checkpoint_gpu_gib=1.0))
    short = dataclasses.replace(low, checkpointing="on", host_mem_gib=4.0)  # 2 GiB beside the reserve
    with pytest.raises(
        TrainError,
        match=r"^--memory low keeps 3\.00 GiB of frozen vocabulary \(embedding and lm_head\) "
        r"in pinned host memory, but the host has 4\.0 GiB available .*--memory fast",
    ):
        check(short)
    check(dataclasses.replace(short, host_mem_gib=5.0))
    for cpu in (torch.device("cpu"), "cpu"):
        check(short, cpu)
        check(low, cpu)
        with pytest.raises(TrainError, match=r"^--checkpointing offload needs 36\.0 GiB .* kept free\)\. Use"):
            check(dataclasses.replace(low, host_mem_gib=30.0), cpu)


def test_the_gpu_share_plan_offers_under_memory_low_passes_the_run_s_check() -> None:
    """Plan and run agree on the host bytes: a host a little short of what plan counts (checkpoints and vocabulary)
    refuses the run, and the GPU share plan then offers makes the run's check pass."""
    config = tiny_config("qwen3", 400_000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, num_hidden_layers=8)  # fmt: skip
    inv = inventory(config)
    setting = Setting("lora", 65536, "offload", memory="low")
    need = estimate(inv, setting).host
    host_gib = (need + HOST_RESERVE) / GIB - 0.01
    cfg = TrainConfig(shards="x", checkpointing="offload", memory="low", host_mem_gib=host_gib)
    with pytest.raises(TrainError, match=r"--memory low 64\.00 MiB for the frozen vocabulary"):
        check_run_host_memory(cfg, config, torch.bfloat16, 65536, device=CUDA, vocab_params=inv.vocab_params)
    split = host_fit_split(inv, setting, need - int(0.01 * GIB))
    assert split is not None and split.checkpoint_gpu_bytes > 0
    fitted = dataclasses.replace(cfg, checkpoint_gpu_gib=split.checkpoint_gpu_bytes / GIB)
    check_run_host_memory(fitted, config, torch.bfloat16, 65536, device=CUDA, vocab_params=inv.vocab_params)


@pytest.mark.parametrize("checkpointing", ["offload", "on"])
def test_a_cpu_run_does_not_count_the_vocabulary_of_memory_low(
    synthetic_shards: Path, tmp_path, checkpointing: str
) -> None:
    """``train run --memory low`` on the CPU, on a host that holds its offloaded checkpoints (if any) but not the
    vocabulary beside them: it trains, since on the CPU ``train.host_vocab`` moves nothing to pinned memory and
    ``--memory fast`` would keep nothing on a GPU."""
    out = tmp_path / "out"
    cfg = cli_equivalent(synthetic_shards, out, memory="low", checkpointing=checkpointing)
    config = model_config(cfg, SYNTH_VOCAB)
    tokens = 128  # the shards' max_len, the default budget
    checkpoints = plan_offload(CheckpointShape.of(config, torch.float32), tokens).host_bytes  # fp32 on the CPU
    checkpoints *= checkpointing == "offload"
    vocab = vocab_host_bytes("low", "lora", inventory(config).vocab_params, 4)
    host_gib = (checkpoints + HOST_RESERVE + vocab // 2) / GIB  # room for the checkpoints and half the vocabulary

    def run(output: Path, host_gib: float):
        args = ["run", str(synthetic_shards), "--output", str(output), *CLI_FAST, "--max-steps", "1", "--memory",
                "low", "--checkpointing", checkpointing, "--host-mem-gib", repr(host_gib)]  # fmt: skip
        return CliRunner().invoke(main, args)

    result = run(out, host_gib)
    assert result.exit_code == 0, result.output
    if checkpointing == "offload":  # the checkpoints are still checked: a host short of them refuses the run
        refused = run(tmp_path / "short", (checkpoints + HOST_RESERVE - 1) / GIB)
        assert_one_line_error(refused, r"^error: --checkpointing offload needs 16\.0 MiB of pinned host memory")
        assert "vocabulary" not in refused.output and not (tmp_path / "short").exists()


class _Recording(HostOffload):
    """HostOffload that remembers the instances the packed path made."""

    made: ClassVar[list[HostOffload]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _Recording.made.append(self)


@pytest.mark.parametrize("keep_attention", [False, True])
def test_a_gpu_budget_keeps_the_top_layers_and_changes_no_gradient(monkeypatch, keep_attention: bool) -> None:
    """3 layers, a budget of one layer's checkpoint: the bottom two go through the offloader, the top one stays;
    loss and every LoRA gradient equal all-offload's and all-on's bitwise."""
    model = apply_adapters(tiny_model("qwen3", num_hidden_layers=3), mode="lora", r=4, alpha=8)
    randomize_lora(model)
    model.train()
    params = trainable(model)
    batch = make_batch([7, 12, 5, 1], seed=3)
    monkeypatch.setattr(packed_forward, "HostOffload", _Recording)
    shape = CheckpointShape.of(model.config, torch.float32)
    one_layer = sum(shape.tensor_bytes(batch.num_tokens, keep_attention))

    def run(checkpointing: str, gpu_bytes: int = 0):
        _Recording.made.clear()
        total, _ = packed_loss(
            model, batch, checkpointing=checkpointing, checkpoint_gpu_bytes=gpu_bytes, keep_attention=keep_attention
        )
        return total.detach(), grads_of(total, params)

    want = run("on")
    for checkpointing, gpu_bytes, host_groups in [("offload", 0, 3), ("offload", one_layer, 2), ("offload", 9**9, 0)]:
        loss, grads = run(checkpointing, gpu_bytes)
        assert len(_Recording.made) == 1 and len(_Recording.made[0]._groups) == host_groups
        assert torch.equal(loss, want[0])
        for name in params:
            assert torch.equal(grads[name], want[1][name]), (gpu_bytes, name)


def test_host_mem_gib_overrides_what_the_host_reports(tmp_path: Path) -> None:
    """A VM whose memory grows as it is used reports less than it can give: --host-mem-gib says so, and the check
    before the first step takes it at its word."""
    cfg = TrainConfig(shards=str(tmp_path), output=str(tmp_path / "out"), checkpointing="offload", host_mem_gib=40.0)
    assert host_bytes_of(cfg) == 40 * GIB
    assert host_bytes_of(dataclasses.replace(cfg, host_mem_gib=None)) == available_host_bytes()
    check_host_memory(plan_offload(QWEN3_8B, 131072), host_bytes_of(cfg))  # 36 GiB + the reserve fit in 40
    with pytest.raises(TrainError, match=r"--host-mem-gib must be > 0 GiB, got 0"):
        dataclasses.replace(cfg, host_mem_gib=0.0)
