"""persistent_bytes: each persistent tensor counted once, in the line it belongs to."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from padless.train.adapters import apply_adapters
from padless.train.loop import train
from padless.train.memory_breakdown import ForwardMemory, breakdown, persistent_bytes
from padless.train.modeling import load_model
from tests.train.runs import base_config

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_lora_lines_after_a_step() -> None:
    model = apply_adapters(load_model(None, vocab_size=300, config_overrides=SHAPE), mode="lora", r=4)
    params = list(model.parameters())
    lora = [p for p in params if p.requires_grad]
    frozen = {id(p): p for p in params if not p.requires_grad}  # tied embedding and head: one tensor
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    before = persistent_bytes(model, optimizer)
    assert before["gradients"] == 0 and before["optimizer"] == 0
    model(input_ids=torch.randint(0, 300, (1, 16)), labels=torch.randint(0, 300, (1, 16))).loss.backward()
    optimizer.step()
    lines = persistent_bytes(model, optimizer)
    assert lines["trainable"] == _bytes(lora)
    assert lines["gradients"] == _bytes(lora)
    # AdamW keeps two moments per trainable value and a step counter per parameter
    assert lines["optimizer"] == 2 * _bytes(lora) + _bytes(s["step"] for s in optimizer.state.values())
    buffers = _bytes(model.buffers())
    assert lines["weights"] == _bytes(frozen.values()) + buffers
    gib = breakdown(lines, torch.device("cpu"))
    assert set(gib) == {"weights", "trainable", "gradients", "optimizer"}
    assert gib["weights"] == lines["weights"] / 2**30


def test_nf4_weights_count_their_quantization_state() -> None:
    shape = {**SHAPE, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
    model = load_model(None, vocab_size=300, family="qwen3", dtype=torch.bfloat16, quantize_4bit=True,
                       config_overrides=shape)  # fmt: skip
    model.requires_grad_(False)
    lines = persistent_bytes(model)
    assert lines["trainable"] == 0
    linear_values = sum(p.quant_state.shape.numel() for p in model.parameters() if hasattr(p, "quant_state"))
    unquantized = _bytes(p for p in model.parameters() if not hasattr(p, "quant_state")) + _bytes(model.buffers())
    nf4 = lines["weights"] - unquantized
    quantized = sum(1 for p in model.parameters() if hasattr(p, "quant_state"))
    # half a byte per value, the double-quantized block scales (a byte per 64 values, fp32 per 256 blocks) and the
    # two 256-entry code books of each quantized weight
    assert linear_values * (0.5 + 1 / 64) < nf4 <= linear_values * (0.5 + 1 / 64 + 4 / 64 / 256) + quantized * 2048


def test_the_step_splits_into_saved_and_workspace(monkeypatch) -> None:
    """The split's arithmetic against the allocator's counters (stood in for: this machine may have no GPU)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 11 * gib)
    lines = {"weights": 6 * gib, "trainable": gib // 2, "gradients": gib // 2, "optimizer": gib}
    cuda = torch.device("cuda", 0)
    split = breakdown(lines, cuda, saved=int(1.5 * gib))
    assert (split["step"], split["saved"], split["workspace"], split["slack"]) == (2.0, 1.5, 0.5, 1.0)
    assert breakdown(lines, cuda, saved=3 * gib)["saved"] == 2.0  # never more than the step
    assert "saved" not in breakdown(lines, cuda)  # a run that replayed every step as a graph measured none


@pytest.mark.gpu
def test_gpu_checkpointing_shows_in_the_saved_line(synthetic_shards: Path, tmp_path: Path) -> None:
    """An eager run's forward keeps every layer's activations without checkpointing and only the layer inputs with
    it: the saved line says so."""
    saved = {}
    for mode in ("off", "on"):
        cfg = base_config(synthetic_shards, tmp_path / mode, device="cuda", cuda_graphs="off", checkpointing=mode,
                          max_steps=2, tokens_per_micro_batch=512)  # fmt: skip
        lines = train(cfg).summary["memory_gib"]
        assert lines["saved"] > 0
        saved[mode] = lines["saved"]
    assert saved["on"] < saved["off"] / 2


def test_forward_memory_keeps_the_largest_measured_forward(monkeypatch) -> None:
    """What the allocator's counter rose by inside each measured forward (stood in for: this machine may have no
    GPU); a forward left out, or a meter that is off, measures nothing."""
    allocated = [0]
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[0])
    meter = ForwardMemory(torch.device("cuda", 0))

    def forward(grow: int, measure: bool = True, on: ForwardMemory = meter) -> None:
        with on.forward(measure):
            allocated[0] += grow

    forward(500, measure=False)
    assert meter.most is None
    forward(300)
    forward(200)
    forward(900, measure=False)
    assert meter.most == 300
    off = ForwardMemory(torch.device("cuda", 0), enabled=False)
    forward(100, on=off)
    assert off.most is None and ForwardMemory(torch.device("cpu")).enabled is False
