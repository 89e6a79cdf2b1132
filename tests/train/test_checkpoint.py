"""Checkpoints (atomic, complete, restoring everything), the lr schedule and the FLOP model behind MFU."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from padless.train.checkpoint import (
    Position,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    trainable_state,
)
from padless.train.config import TrainConfig, TrainError
from padless.train.metrics import flop_model, sum_squared_lengths
from padless.train.optim import build_optimizer, build_scheduler, lr_factor


def _tiny(lora_seed: int = 0) -> torch.nn.Module:
    from padless.train.adapters import apply_adapters
    from padless.train.modeling import load_model

    # The frozen base comes from --model (here: seed 0) on resume too; only the trainable part is checkpointed.
    model = load_model(None, vocab_size=64, seed=0, config_overrides={"hidden_size": 32, "intermediate_size": 64})
    torch.manual_seed(lora_seed)
    return apply_adapters(model, mode="lora", r=4, alpha=8)


def _one_step(model, optimizer, scheduler) -> None:
    ids = torch.randint(0, 64, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_checkpoint_roundtrip_restores_weights_optimizer_schedule_rng(tmp_path: Path) -> None:
    cfg = TrainConfig(shards="x", lr=1e-2, warmup_steps=2)
    model = _tiny()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(3):
        _one_step(model, opt, sched)
    path = save_checkpoint(tmp_path, Position(step=3, epoch=1, micro_batch=5), model, opt, sched, cfg)
    assert path.name == "step-00000003" and latest_checkpoint(tmp_path) == path
    expected_rand = torch.rand(4)  # drawn right after saving: the restored RNG must draw it again

    fresh = _tiny(lora_seed=1)  # another LoRA init: the trainable state must come from the checkpoint
    opt2 = build_optimizer(fresh, cfg, torch.device("cpu"))
    sched2 = build_scheduler(opt2, cfg, total_steps=10)
    pos = load_checkpoint(path, fresh, opt2, sched2)
    assert pos == Position(step=3, epoch=1, micro_batch=5)
    assert torch.equal(torch.rand(4), expected_rand)
    for name, t in trainable_state(model).items():
        assert torch.equal(t, trainable_state(fresh)[name]), name
    assert sched2.get_last_lr() == sched.get_last_lr()
    # The next step is identical from both.
    torch.manual_seed(5)
    _one_step(model, opt, sched)
    torch.manual_seed(5)
    _one_step(fresh, opt2, sched2)
    for name, t in trainable_state(model).items():
        assert torch.equal(t, trainable_state(fresh)[name]), name


def test_latest_moves_only_when_a_checkpoint_is_whole(tmp_path: Path) -> None:
    cfg = TrainConfig(shards="x")
    model = _tiny()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total_steps=4)
    first = save_checkpoint(tmp_path, Position(1, 0, 1), model, opt, sched, cfg)
    # A crash while writing step 2 leaves only a temp folder: 'latest' still names step 1.
    (tmp_path / "checkpoints" / ".tmp-step-00000002").mkdir()
    assert latest_checkpoint(tmp_path) == first
    (first / "optimizer.pt").unlink()
    with pytest.raises(TrainError, match=r"lacks \['optimizer.pt'\]; it is incomplete"):
        load_checkpoint(first, model, opt, sched)


def test_keep_last_deletes_only_older_whole_checkpoints_never_latest(tmp_path: Path) -> None:
    cfg = TrainConfig(shards="x", save_every=1, keep_last=2)
    model = _tiny()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total_steps=8)
    root = tmp_path / "checkpoints"
    names = lambda: sorted(p.name for p in root.iterdir() if p.name != "latest")
    for step in range(1, 5):
        save_checkpoint(tmp_path, Position(step, 0, step), model, opt, sched, cfg)
    assert names() == ["step-00000003", "step-00000004"]
    # A temp folder and a step folder without state.json are not whole checkpoints: never counted or deleted.
    (root / ".tmp-step-00000009").mkdir()
    (root / "step-00000001").mkdir()
    # 'latest' pointed back at step 3 (to resume from it): kept although it is not among the newest 1.
    (root / "latest").write_text("step-00000003\n")
    assert prune_checkpoints(tmp_path, keep=1) == []
    assert names() == [".tmp-step-00000009", "step-00000001", "step-00000003", "step-00000004"]
    (root / "latest").write_text("step-00000004\n")
    assert prune_checkpoints(tmp_path, keep=0) == []  # 0 = keep all
    assert prune_checkpoints(tmp_path, keep=1) == [root / "step-00000003"]
    assert names() == [".tmp-step-00000009", "step-00000001", "step-00000004"]
    with pytest.raises(TrainError, match=r"--keep-last must be >= 0 \(0 = keep all\), got -1"):
        TrainConfig(shards="x", keep_last=-1)
    with pytest.raises(TrainError, match=r"^--keep-last 2 keeps the newest checkpoints, and this run writes none"):
        TrainConfig(shards="x", keep_last=2)


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    from padless.train.adapters import apply_adapters
    from padless.train.modeling import load_model

    cfg = TrainConfig(shards="x")
    model = _tiny()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total_steps=4)
    path = save_checkpoint(tmp_path, Position(1, 0, 1), model, opt, sched, cfg)
    other = apply_adapters(
        load_model(None, vocab_size=64, config_overrides={"hidden_size": 32, "intermediate_size": 64}),
        mode="lora",
        r=4,
        target_modules=["q_proj"],
    )
    opt2 = build_optimizer(other, cfg, torch.device("cpu"))
    with pytest.raises(TrainError, match=r"does not fit this model .*same --model, mode, --lora-r"):
        load_checkpoint(path, other, opt2, build_scheduler(opt2, cfg, total_steps=4))


def test_warmup_then_cosine() -> None:
    f = lambda s: lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(20) == pytest.approx(0.1)
    values = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_cosine_decays_as_transformers_schedule() -> None:
    """Past the warm-up, the floor-0 schedule is transformers' cosine with warm-up: the run's last step (19 of 20)
    still trains above the floor, which is reached one step later."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_schedule_with_warmup(opt, num_warmup_steps=4, num_training_steps=20).lr_lambdas[0]
    for step in range(4, 21):
        assert lr_factor(step, warmup_steps=4, total_steps=20) == pytest.approx(theirs(step), abs=1e-12), step
    assert lr_factor(19, warmup_steps=4, total_steps=20) > 0


def test_flop_model_counts_matmul_parameters_and_passes() -> None:
    from padless.train.modeling import load_model

    model = load_model(None, vocab_size=64, config_overrides={"hidden_size": 32, "intermediate_size": 64})
    total = sum(p.numel() for p in model.parameters())  # tied head: the embedding is counted once here
    embed = model.get_input_embeddings().weight.numel()
    n = total - embed + embed  # minus the lookup, plus the (tied) head matmul
    lora_off = flop_model(model, full=False, checkpointing="off")
    assert lora_off.matmul_params == n
    assert lora_off.per_token == pytest.approx(4 * n)  # forward 2N + activation grads 2N
    assert flop_model(model, full=True, checkpointing="off").per_token == pytest.approx(6 * n)
    assert flop_model(model, full=True, checkpointing="on").per_token == pytest.approx(8 * n)
    # two layers in one segment (--checkpoint-layers 2): the lower one is forwarded once more, half a pass on average
    segment = flop_model(model, full=True, checkpointing="on", checkpoint_layers=2)
    assert model.config.num_hidden_layers == 2 and segment.per_token == pytest.approx(9 * n)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert lora_off.per_sq_len == pytest.approx(2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * 3)
    assert segment.per_sq_len == pytest.approx(lora_off.per_sq_len * 4.5 / 3)  # forward, backward 2, recompute 1.5
    assert sum_squared_lengths(torch.tensor([0, 3, 7, 12], dtype=torch.int32)) == 9 + 16 + 25
