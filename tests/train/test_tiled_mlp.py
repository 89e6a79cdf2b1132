"""``tiled_mlp`` against the untiled function: values, input and parameter gradients, random numbers, autocast,
and how often the function runs with activation checkpointing (forward once, once per tile in the backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from padless.train.activation_checkpoint import run_layer
from padless.train.tiled_mlp import tiled_mlp

E, INTER = 8, 24


class Block(nn.Module):
    """A pre-projection (so the MLP input needs a gradient) and a SwiGLU-shaped MLP whose calls are recorded."""

    def __init__(self, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.pre = nn.Linear(E, E)
        self.gate = nn.Linear(E, INTER)
        self.up = nn.Linear(E, INTER)
        self.down = nn.Linear(INTER, E)
        self.dropout = nn.Dropout(dropout)
        self.calls: list[int] = []  # rows per MLP call
        self.dtypes: list[torch.dtype] = []  # the dtype each call computed in

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        self.calls.append(h.shape[0])
        gate = self.gate(self.dropout(h))
        self.dtypes.append(gate.dtype)
        return self.down(nn.functional.silu(gate) * self.up(h))

    def forward(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        h = self.pre(x)
        return x + (tiled_mlp(self.mlp, h, tile) if tile else self.mlp(h))


def _step(block: Block, x: torch.Tensor, tile: int, mode: str = "off") -> dict[str, torch.Tensor]:
    """Loss, input gradient and every parameter's ``.grad`` of one backward (``.grad``: what tiling fills)."""
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = run_layer(lambda t: block(t, tile), x, mode)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    loss.backward()
    return {"loss": loss.detach(), "x": x.grad, **{n: p.grad for n, p in block.named_parameters()}}


def _assert_equal_grads(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name] is not None, name
        torch.testing.assert_close(
            actual[name], expected[name], rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("tokens,tile", [(37, 10), (40, 10), (37, 1), (37, 64)])
@pytest.mark.parametrize("mode", ["off", "on", "offload"])
def test_tiled_equals_untiled(tokens: int, tile: int, mode: str) -> None:
    block = Block()
    x = torch.randn(tokens, E, generator=torch.Generator().manual_seed(1))
    _assert_equal_grads(_step(block, x, tile, mode), _step(block, x, 0, "off"))


def test_output_is_the_untiled_output() -> None:
    block = Block()
    h = torch.randn(29, E)
    with torch.no_grad():
        assert torch.equal(tiled_mlp(block.mlp, h, 8), torch.cat([block.mlp(h[i : i + 8]) for i in range(0, 29, 8)]))
    y = tiled_mlp(block.mlp, h, 8)
    torch.testing.assert_close(y, block.mlp(h), rtol=1e-6, atol=1e-6)
    assert y.requires_grad and y.shape == (29, E)


def test_parameters_get_gradients_when_the_input_needs_none() -> None:
    """The MLP's input is a constant (a first layer with frozen embeddings): the weights still train."""
    block = Block()
    h = torch.randn(37, E)

    def mlp_grads(tile: int) -> dict[str, torch.Tensor]:
        block.zero_grad(set_to_none=True)
        (tiled_mlp(block.mlp, h, tile) if tile else block.mlp(h)).square().sum().backward()
        return {n: p.grad for n, p in block.named_parameters() if not n.startswith("pre.")}

    _assert_equal_grads(mlp_grads(10), mlp_grads(0))


@pytest.mark.parametrize("mode", ["off", "on"])
def test_dropout_draws_the_same_numbers_in_the_backward(mode: str) -> None:
    """Per tile, the backward's recompute draws the forward's dropout masks; without replaying them it would not.

    Reference: the same tiles run with a graph from the same seed (tiling changes which numbers each row gets)."""
    x = torch.randn(37, E, generator=torch.Generator().manual_seed(2))

    class Reference(Block):
        def forward(self, x: torch.Tensor, tile: int) -> torch.Tensor:
            h = self.pre(x)
            return x + torch.cat([self.mlp(h[i : i + tile]) for i in range(0, h.shape[0], tile)])

    reference = Reference(dropout=0.5)
    torch.manual_seed(7)
    expected = _step(reference, x, 10)
    block = Block(dropout=0.5)
    torch.manual_seed(7)
    _assert_equal_grads(_step(block, x, 10, mode), expected)

    def no_replay(t: torch.Tensor) -> torch.Tensor:
        return t + tiled_mlp(block.mlp, block.pre(t), 10, preserve_rng_state=False)

    block.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    x_grad = x.detach().requires_grad_()
    (no_replay(x_grad) * torch.linspace(-1, 1, x.numel()).view_as(x)).sum().backward()
    assert not torch.allclose(block.gate.weight.grad, expected["gate.weight"])


def test_autocast_is_replayed_in_the_backward() -> None:
    """The backward recomputes each tile in the forward's autocast dtype (equal up to bf16 rounding)."""
    block = Block()
    x = torch.randn(37, E)
    grads = []
    for tile in (0, 10):
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = tiled_mlp(block.mlp, x, tile) if tile else block.mlp(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        grads.append(block.gate.weight.grad)
    assert block.calls == [37, 10, 10, 10, 7, 10, 10, 10, 7]
    assert block.dtypes == [torch.bfloat16] * len(block.calls)
    torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=0.02)


@pytest.mark.parametrize("mode", ["off", "on", "offload"])
def test_the_mlp_runs_once_forward_and_once_per_tile_backward(mode: str) -> None:
    """Checkpointing's recompute stops before the tiled MLP: 37 rows in tiles of 10 are run in the forward and
    again tile by tile in the backward, never whole (untiled and checkpointed, the recompute runs it whole)."""
    block = Block()
    x = torch.randn(37, E)
    _step(block, x, 10, mode)
    assert block.calls == [10, 10, 10, 7] * 2
    block.calls.clear()
    _step(block, x, 0, mode)
    assert block.calls == ([37, 37] if mode != "off" else [37])


def test_without_grad_only_the_tiles_run() -> None:
    block = Block()
    with torch.no_grad():
        y = tiled_mlp(block.mlp, torch.randn(25, E), 10)
    assert block.calls == [10, 10, 5] and not y.requires_grad


def test_bad_arguments_are_refused() -> None:
    block = Block()
    with pytest.raises(ValueError, match="tile_tokens must be >= 1, got 0"):
        tiled_mlp(block.mlp, torch.randn(4, E), 0)
    with pytest.raises(ValueError, match=r"T >= 1; got shape \(0, 8\)"):
        tiled_mlp(block.mlp, torch.randn(0, E), 4)


def test_without_preserved_rng_no_generator_is_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA graph capture needs: preserve_rng_state=False never reads or sets a generator's state."""

    def touched(*args, **kwargs):
        raise AssertionError("the generator state was read or set")

    for name in ("get_rng_state", "set_rng_state"):
        monkeypatch.setattr(torch, name, touched)
        monkeypatch.setattr(torch.cuda, name, touched)
    linear = nn.Linear(8, 8)
    h = torch.randn(37, 8, requires_grad=True)
    tiled_mlp(linear, h, 10, preserve_rng_state=False).sum().backward()
    assert linear.weight.grad is not None and h.grad is not None


def test_preserving_rng_inside_a_capture_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    h = torch.randn(20, 8, requires_grad=True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(RuntimeError, match=r"inside a CUDA graph capture.*preserve_rng_state=False"):
        tiled_mlp(nn.Linear(8, 8), h, 10)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_the_backward_adds_into_the_existing_grad_storage(mode: str) -> None:
    """A replayed CUDA graph writes where the captured step wrote: .grad must be accumulated in place."""
    linear = nn.Linear(8, 8)
    x = torch.randn(37, 8)
    for p in linear.parameters():
        p.grad = torch.zeros_like(p)
    storage = [p.grad.data_ptr() for p in linear.parameters()]
    for _ in range(2):
        xi = x.clone().requires_grad_()
        run_layer(lambda t: tiled_mlp(linear, t, 10, preserve_rng_state=False), xi, mode, False).sum().backward()
    assert [p.grad.data_ptr() for p in linear.parameters()] == storage
    reference = nn.Linear(8, 8)
    reference.load_state_dict(linear.state_dict())
    (reference(x).sum() * 2).backward()
    torch.testing.assert_close(linear.weight.grad, reference.weight.grad)
    torch.testing.assert_close(linear.bias.grad, reference.bias.grad)
