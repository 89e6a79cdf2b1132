"""Whole runs of ``train.loop.train`` on a tiny model: split invariance, exact resume, eval and reload, NaN stop.

References are independent of the loop: gradients are read just before the optimizer step (a global optimizer
hook, no mocking), the eval loss is recomputed with the UNPATCHED Hugging Face model loaded from the saved
folders, running every eval example alone.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from padless.shards.reader import open_shards
from padless.train.activation_checkpoint import HostOffload
from padless.train.batch import IGNORE_INDEX
from padless.train.checkpoint import latest_checkpoint, trainable_state
from padless.train.data import pack_sizes
from padless.train.loop import Callbacks, NonFiniteLossError, train

from .runs import Recorder, base_config, run_interrupted, run_recorded


def test_one_micro_batch_of_four_packs_equals_four_of_one(synthetic_shards: Path, tmp_path: Path) -> None:
    ss = open_shards(synthetic_shards)
    first4 = ss.order(0, 0)[:4]
    budget = sum(ss[int(i)].num_tokens for i in first4)  # exactly the first 4 packs of the seeded order
    one, rec_one = run_recorded(
        base_config(synthetic_shards, tmp_path / "a", max_steps=1, tokens_per_micro_batch=budget, max_grad_norm=0)
    )
    # Budget = the longest pack: no two of the first four fit together, so each is its own micro-batch and 4 of
    # them make the step.
    longest = int(pack_sizes(ss).num_tokens.max())
    assert all(ss[int(a)].num_tokens + ss[int(b)].num_tokens > longest for a, b in itertools.pairwise(first4))
    four, rec_four = run_recorded(
        base_config(
            synthetic_shards, tmp_path / "b", max_steps=1, tokens_per_micro_batch=longest, grad_accum=4,
            max_grad_norm=0,
        )
    )  # fmt: skip
    assert one.losses[0] == pytest.approx(four.losses[0], rel=1e-6)
    g1, g4 = rec_one.grads[0], rec_four.grads[0]
    assert g1.keys() == g4.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g4[name], rtol=1e-5, atol=1e-8, msg=f"grad of {name}")
    w1, w4 = trainable_state(rec_one.model), trainable_state(rec_four.model)
    for name in w1:
        # Adam's first step is g / (|g| + eps): where |g| ~ eps (1e-8) the last-bit difference of the two sums
        # moves an update by up to ~1e-5 (lr 3e-3); a normalisation bug would be off by ~lr everywhere.
        torch.testing.assert_close(w1[name], w4[name], rtol=0, atol=1e-4, msg=f"weight {name}")
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["trainable_tokens"] == sum(ss[int(i)].num_trainable for i in first4)


class _Interrupt(Exception):
    pass


def test_a_tiled_mlp_trains_like_the_whole_mlp(synthetic_shards: Path, tmp_path: Path) -> None:
    """``mlp_tile_tokens=64`` on micro-batches of up to 128 tokens: every longer micro-batch's MLPs run in tiles of
    at most 64 tokens, and the losses and gradients are those of the untiled run (fp32, up to summation order)."""
    rows: list[int] = []
    rec_tiled = Recorder()

    def on_model(model: torch.nn.Module) -> None:
        rec_tiled.on_model(model)
        for layer in model.get_decoder().layers:
            layer.mlp.gate_proj.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))

    settings = dict(max_steps=2, mode="full", lr=1e-3, checkpointing="on")
    whole, rec_whole = run_recorded(base_config(synthetic_shards, tmp_path / "whole", **settings))
    with rec_tiled:
        cfg = base_config(synthetic_shards, tmp_path / "tiled", mlp_tile_tokens=64, **settings)
        tiled = train(cfg, callbacks=Callbacks(on_model=on_model))
    assert rows and max(rows) <= 64 and 64 in rows
    assert tiled.losses == pytest.approx(whole.losses, rel=1e-5)
    for step_tiled, step_whole in zip(rec_tiled.grads, rec_whole.grads, strict=True):
        for name, g in step_whole.items():
            torch.testing.assert_close(step_tiled[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_continues_exactly(synthetic_shards: Path, tmp_path: Path) -> None:
    settings = dict(max_steps=4, save_every=2, lora_dropout=0.1, tokens_per_micro_batch=200, grad_accum=2)
    straight, rec_a = run_recorded(base_config(synthetic_shards, tmp_path / "a", **settings))

    def stop_after_two(record):
        if record["step"] == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_recorded(base_config(synthetic_shards, tmp_path / "b", **settings), on_step=stop_after_two)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000002"
    resumed, rec_b = run_recorded(base_config(synthetic_shards, tmp_path / "b", resume=True, **settings))

    assert resumed.losses == straight.losses[2:]  # bit-exact on CPU
    logged = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["loss"] for r in logged] == straight.losses
    wa, wb = trainable_state(rec_a.model), trainable_state(rec_b.model)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_keep_last_prunes_old_checkpoints_and_resume_still_works(synthetic_shards: Path, tmp_path: Path) -> None:
    settings = dict(max_steps=5, save_every=1, keep_last=2, tokens_per_micro_batch=200)
    straight = train(base_config(synthetic_shards, tmp_path / "a", **settings))
    root = tmp_path / "b" / "checkpoints"
    run_interrupted(base_config(synthetic_shards, tmp_path / "b", **settings), after_step=3)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    resumed = train(base_config(synthetic_shards, tmp_path / "b", resume=True, **settings))
    assert resumed.losses == straight.losses[3:]  # continued from step 3, bit-exact on CPU
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path / "b") == root / "step-00000005"


def test_a_resume_at_the_last_step_reports_the_eval_loss_of_that_step(synthetic_shards: Path, tmp_path: Path) -> None:
    """A run stopped right after its last step's evaluation and checkpoint trains nothing when resumed; its result
    and summary.json still carry the eval loss of the last step, as the uninterrupted run's do."""
    settings = dict(max_steps=2, save_every=1, eval_every=0)
    straight = train(base_config(synthetic_shards, tmp_path / "a", **settings))
    run_interrupted(base_config(synthetic_shards, tmp_path / "b", **settings), after_step=2)
    resumed = train(base_config(synthetic_shards, tmp_path / "b", resume=True, **settings))
    assert resumed.losses == [] and straight.eval_loss is not None
    assert resumed.eval_loss == straight.eval_loss
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["eval_loss"] == straight.eval_loss


def _one_by_one_eval_loss(model: torch.nn.Module, eval_ss) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(eval_ss)):
            pack = eval_ss[i]
            ids = torch.as_tensor(pack.input_ids.astype(np.int64))
            labels = torch.as_tensor(pack.labels)
            cu = pack.cu_seqlens.tolist()
            for a, b in itertools.pairwise(cu):
                logits = model(input_ids=ids[a:b][None]).logits[0].double()
                total += F.cross_entropy(
                    logits[:-1], labels[a + 1 : b], ignore_index=IGNORE_INDEX, reduction="sum"
                ).item()
                count += int((labels[a + 1 : b] != IGNORE_INDEX).sum())
    return total / count


def test_eval_loss_and_saved_adapter_match_the_unpatched_model(synthetic_shards: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result, rec = run_recorded(base_config(synthetic_shards, out, max_steps=3, eval_every=2, lr=1e-2))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["step"] for r in evals] == [2, 3]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "trainable_tokens_per_s", "peak_mem_gib"):
        assert all(key in r for r in steps), key
    assert result.eval_loss == evals[-1]["eval_loss"]

    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    reloaded = PeftModel.from_pretrained(base, out).eval()
    # The reloaded adapter is the trained one ...
    trained = trainable_state(rec.model)
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p.detach(), trained[name]), name
    assert any(t.abs().sum() > 0 for n, t in trained.items() if "lora_B" in n), "training moved the adapter"
    # ... and the eval loss equals the stock model with it, every eval example alone.
    expected = _one_by_one_eval_loss(reloaded, open_shards(synthetic_shards / "eval"))
    assert result.eval_loss == pytest.approx(expected, rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_full_fine_tuning_writes_a_hugging_face_model(synthetic_shards: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    result, rec = run_recorded(base_config(synthetic_shards, out, max_steps=2, mode="full", lr=1e-3))
    assert len(result.losses) == 2
    loaded = AutoModelForCausalLM.from_pretrained(out)
    trained = rec.model.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, trained[name]), name
    assert not (out / "adapter_config.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    calls = {"n": 0}
    seen: dict[str, torch.nn.Module] = {}

    def poison_third_forward(model: torch.nn.Module) -> None:
        seen["model"] = model

        def hook(module, inputs, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] == 3 else output

        model.get_input_embeddings().register_forward_hook(hook)

    cfg = base_config(synthetic_shards, out, max_steps=5, save_every=1)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss nan .*last good checkpoint .*step-00000002"):
        train(cfg, callbacks=Callbacks(on_model=poison_third_forward))
    assert latest_checkpoint(out).name == "step-00000002"
    assert not (out / "checkpoints" / "step-00000003").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # The weights were not updated by the bad step: they equal the last good checkpoint's.
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoints" / "step-00000002" / "trainable.safetensors")
    now = trainable_state(seen["model"])
    assert saved.keys() == now.keys()
    for name in saved:
        assert torch.equal(saved[name], now[name]), name


def test_out_of_memory_names_the_knobs(synthetic_shards: Path, tmp_path: Path) -> None:
    from padless.train.config import TrainError

    def raise_oom(model: torch.nn.Module) -> None:
        def hook(module, inputs, output):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        model.get_input_embeddings().register_forward_hook(hook)

    with pytest.raises(
        TrainError,
        match=r"out of memory at step 1 .*--tokens-per-micro-batch \(now 128\).*"
        r"--checkpointing on.*--qlora",
    ):
        train(base_config(synthetic_shards, tmp_path / "oom"), callbacks=Callbacks(on_model=raise_oom))


# -- GPU (pytest -m gpu on the H200): the CUDA paths CPU runs cannot reach ------------------------------------------


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_memory")  # tens of GiB: one at a time under --dist loadgroup
@pytest.mark.parametrize("checkpointing", ["off", "on", "offload"])
def test_gpu_lora_bf16_run_reports_mfu_and_memory(synthetic_shards: Path, tmp_path: Path, checkpointing: str) -> None:
    cfg = base_config(
        synthetic_shards,
        tmp_path / checkpointing,
        device=None,
        model_overrides=None,
        max_steps=4,
        checkpointing=checkpointing,
        tokens_per_micro_batch=512,
        eval_every=2,
    )
    result = train(cfg)
    assert all(math.isfinite(x) for x in result.losses) and len(result.losses) == 4
    lines = [json.loads(x) for x in (tmp_path / checkpointing / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert all(r["peak_mem_gib"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    if "H200" in torch.cuda.get_device_name() or "H100" in torch.cuda.get_device_name():
        assert all(r["mfu"] is not None and 0 < r["mfu"] < 1 for r in steps)
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)


@pytest.mark.gpu
def test_gpu_qlora_with_adamw8bit(synthetic_shards: Path, tmp_path: Path) -> None:
    result = train(
        base_config(
            synthetic_shards,
            tmp_path / "q",
            device=None,
            model_overrides=None,
            mode="qlora",
            optimizer="adamw8bit",
            max_steps=3,
        )
    )
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert (tmp_path / "q" / "adapter_config.json").is_file()


@pytest.mark.gpu
def test_gpu_full_fused_adamw_and_resume(synthetic_shards: Path, tmp_path: Path) -> None:
    settings = dict(device=None, model_overrides=None, mode="full", max_steps=4, save_every=2, lr=1e-4)
    straight = train(base_config(synthetic_shards, tmp_path / "a", **settings))

    def stop(record):
        if record["step"] == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(base_config(synthetic_shards, tmp_path / "b", **settings), callbacks=Callbacks(on_step=stop))
    resumed = train(base_config(synthetic_shards, tmp_path / "b", resume=True, **settings))
    # GPU kernels may reduce in a different order run to run: equal to bf16 noise, not bit-exact.
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=2e-2)


@pytest.mark.gpu
def test_gpu_parity_command_passes_with_triton_kernels(synthetic_shards: Path) -> None:
    from padless.train.parity import parity

    report = parity(str(synthetic_shards), packs=4, dtype="fp32", device="cuda", tolerance=2e-3)
    assert report.passed, report.render()


def test_inline_model_overrides_longer_than_a_file_name(synthetic_shards: Path, tmp_path: Path) -> None:
    # Inline JSON is not a path: one longer than the file system's name limit must not be looked up as one.
    fields = json.loads(base_config(synthetic_shards, tmp_path).model_overrides)
    overrides = json.dumps({**fields, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
                            "initializer_range": 0.02, "attention_dropout": 0.0, "tie_word_embeddings": False,
                            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "mlp_bias": False})  # fmt: skip
    assert len(overrides) > 255
    result = train(base_config(synthetic_shards, tmp_path / "run", max_steps=1, model_overrides=overrides))
    assert len(result.losses) == 1


def test_steady_throughput_leaves_out_the_first_step(synthetic_shards: Path, tmp_path: Path) -> None:
    result = train(base_config(synthetic_shards, tmp_path / "run", max_steps=3))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    s = result.summary
    assert s["steady_steps"] == 2
    later = steps[1:]  # the first step pays the compiles (and, on a GPU, the CUDA-graph capture)
    seconds = sum(r["step_time_s"] for r in later)
    assert s["steady_tokens_per_s"] == pytest.approx(sum(r["tokens"] for r in later) / seconds)
    assert s["steady_trainable_tokens_per_s"] == pytest.approx(sum(r["trainable_tokens"] for r in later) / seconds)
    assert s["train_time_s"] == pytest.approx(sum(r["step_time_s"] for r in steps))


def test_checkpoint_segments_train_like_per_layer_checkpoints(
    synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--checkpoint-layers 3 over 4 layers (3 + 1), offloaded: the same losses as one checkpoint per layer."""
    four = '{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, ' \
           '"head_dim": 16, "num_hidden_layers": 4}'  # fmt: skip
    settings = dict(model_overrides=four, max_steps=3, checkpointing="offload")
    packs = []
    real = HostOffload._pack
    monkeypatch.setattr(HostOffload, "_pack", lambda self, tensor: packs.append(1) or real(self, tensor))
    per_layer = train(base_config(synthetic_shards, tmp_path / "one", **settings))
    per_layer_packs = len(packs)
    segments = train(base_config(synthetic_shards, tmp_path / "three", checkpoint_layers=3, **settings))
    assert segments.summary["config"]["checkpoint_layers"] == 3
    assert segments.losses == pytest.approx(per_layer.losses, rel=1e-5)
    assert per_layer_packs == 2 * (len(packs) - per_layer_packs) > 0  # 4 checkpoints a micro-batch against 2


def test_full_fine_tuning_in_fp16_on_the_cpu_stays_finite(synthetic_shards: Path, tmp_path: Path) -> None:
    """fp16 weights: an embedding row no token of a step uses has a zero gradient, which AdamW computed in fp16
    (eps 1e-8 rounds to 0) turned into NaN at the first step."""
    with Recorder() as rec:
        result = train(
            base_config(synthetic_shards, tmp_path / "out", max_steps=2, mode="full", dtype="fp16"),
            callbacks=Callbacks(on_model=rec.on_model),
        )
    assert all(math.isfinite(loss) for loss in result.losses)
    assert all(torch.isfinite(p).all() for p in rec.model.parameters())
