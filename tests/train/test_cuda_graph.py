"""CUDA-graph micro-steps: the replayed graph gives the eager step's losses and gradients, or a clear refusal.

The GPU tests compare against the same run in eager mode (an independent execution of the same kernels, not a
mock): per-step losses and the gradients seen by the optimizer, with gradient accumulation over several replays
and micro-batches of varying size and example count (every one padded to the one static shape).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from padless.train.config import TrainError
from padless.train.cuda_graph import GraphCaptureError, GraphedMicroStep
from padless.train.loop import train
from padless.train.static_batch import StaticShape

from .runs import base_config, run_recorded


def test_cpu_refuses_graphs_by_name(synthetic_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(GraphCaptureError, match=r"need a CUDA device.*--cuda-graphs off"):
        GraphedMicroStep(lambda b: None, [], StaticShape(8, 2, 8), torch.device("cpu"))
    with pytest.raises(TrainError, match="--cuda-graphs on is not possible here: device cpu is not CUDA"):
        train(base_config(synthetic_shards, tmp_path / "on", cuda_graphs="on", max_steps=1))


def test_a_tiled_mlp_does_not_rule_graphs_out(synthetic_shards: Path, tmp_path: Path) -> None:
    """--mlp-tile-tokens with --cuda-graphs on is a valid setting; on a CPU the device is the only reason named."""
    from padless.train.config import TrainConfig

    assert TrainConfig(shards="x", mlp_tile_tokens=64, cuda_graphs="on").mlp_tile_tokens == 64
    cfg = base_config(synthetic_shards, tmp_path / "on", cuda_graphs="on", max_steps=1, mlp_tile_tokens=16,
                      tokens_per_micro_batch=256)  # fmt: skip
    with pytest.raises(TrainError, match=r"is not possible here: device cpu is not CUDA\. Use --cuda-graphs"):
        train(cfg)


def test_auto_on_cpu_trains_eagerly(synthetic_shards: Path, tmp_path: Path) -> None:
    auto = train(base_config(synthetic_shards, tmp_path / "auto", cuda_graphs="auto", max_steps=2))
    off = train(base_config(synthetic_shards, tmp_path / "off", cuda_graphs="off", max_steps=2))
    assert auto.losses == off.losses and not [w for w in auto.warnings if "CUDA graphs" in w]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("checkpointing", "mlp_tile_tokens"), [("off", 0), ("on", 0), ("on", 64), ("off", 64)],
    ids=["off", "on", "on-tiled-mlp", "off-tiled-mlp"],
)  # fmt: skip
def test_gpu_graphed_run_matches_eager(
    synthetic_shards: Path, tmp_path: Path, checkpointing: str, mlp_tile_tokens: int
) -> None:
    """The tiled MLP's nested per-tile backward is captured and replayed with the rest of the step."""
    settings = dict(
        device=None, model_overrides=None, max_steps=4, grad_accum=2, tokens_per_micro_batch=300,
        checkpointing=checkpointing, mlp_tile_tokens=mlp_tile_tokens, lr=1e-3,
    )  # fmt: skip
    eager, rec_e = run_recorded(base_config(synthetic_shards, tmp_path / "eager", cuda_graphs="off", **settings))
    graphed, rec_g = run_recorded(base_config(synthetic_shards, tmp_path / "graph", cuda_graphs="on", **settings))
    assert graphed.summary["cuda_graphs"] and not eager.summary["cuda_graphs"]
    assert graphed.summary["config"]["mlp_tile_tokens"] == mlp_tile_tokens
    assert graphed.warnings == eager.warnings  # nothing about the graphs (the shards name no tokenizer: both say so)
    assert all(math.isfinite(x) for x in graphed.losses)
    # Same kernels, same order; attention's atomic dQ may reorder fp32 sums: equal to bf16 noise.
    assert graphed.losses == pytest.approx(eager.losses, rel=1e-2)
    assert len(rec_g.grads) == len(rec_e.grads) == 4
    for step_e, step_g in zip(rec_e.grads, rec_g.grads):
        for name, g in step_e.items():
            err = (step_g[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)
            assert err < 3e-2, (name, float(err))


@pytest.mark.gpu
def test_gpu_graphed_step_accumulates_like_eager() -> None:
    from padless.train.adapters import apply_adapters
    from padless.train.packed_forward import packed_loss
    from padless.train.static_batch import static_shape
    from tests.train.tiny_models import make_batch, randomize_lora, tiny_model

    device = torch.device("cuda")
    model = apply_adapters(tiny_model("qwen3", seed=2, head_dim=64), mode="lora", r=4, alpha=8, dropout=0.0)
    randomize_lora(model, seed=3)
    model = model.to(device=device, dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [make_batch(lengths, seed=i) for i, lengths in enumerate([[30, 7, 51], [90], [5, 5, 5, 40, 2]])]

    def loss_fn(b):
        return packed_loss(model, b, checkpointing="on", preserve_rng_state=False)

    eager_losses = []
    for b in batches:
        loss, _ = loss_fn(b.to(device))
        (loss * 0.5).backward()
        eager_losses.append(float(loss.detach()))
    del loss  # a live autograd graph would keep AccumulateGrad nodes bound to the default stream (uncapturable)
    eager_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    step = GraphedMicroStep(loss_fn, params, static_shape(128, 5, 96), device)
    graph_losses = [float(step(b, 0.5)) for b in batches]
    assert step.captured
    assert graph_losses == pytest.approx(eager_losses, rel=1e-2)
    for p, g in zip(params, eager_grads):
        err = (p.grad.float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)
        assert err < 3e-2
