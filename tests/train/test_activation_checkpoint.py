"""Activation checkpointing modes of ``train.activation_checkpoint``: ``offload`` (layer inputs in pinned host
memory, copied on a side stream and brought back one layer ahead) gives exactly the gradients of ``on`` and of no
checkpointing, on CPU (the copy path) and on CUDA (streams, events, prefetch; ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from padless.train.activation_checkpoint import HostOffload, PinnedPool, run_layer


def _layers(n: int, width: int, device: str, seed: int = 0) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU()).to(device) for _ in range(n)]


def _grads(layers: list[torch.nn.Module], x: torch.Tensor, mode: str, offload: HostOffload | None = None):
    h = x
    for layer in layers:
        h = run_layer(layer, h, mode, offload=offload)
    loss = (h.float() ** 2).sum()
    params = [p for layer in layers for p in layer.parameters()]
    return loss.detach(), torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("shared", [True, False])
def test_offload_gives_the_gradients_of_no_checkpointing_on_cpu(shared: bool) -> None:
    layers = _layers(5, 16, "cpu")
    x = torch.randn(7, 16, requires_grad=True)
    ref_loss, ref = _grads(layers, x, "off")
    loss, got = _grads(layers, x, "offload", HostOffload() if shared else None)
    assert torch.equal(loss, ref_loss)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_host_offload_keeps_one_host_copy_per_layer_and_unpacks_top_down() -> None:
    layers = _layers(4, 8, "cpu")
    offload = HostOffload()
    seen: list[int] = []
    unpack = offload._unpack

    def spy(index: int) -> torch.Tensor:
        seen.append(index)
        return unpack(index)

    offload._unpack = spy  # type: ignore[method-assign]
    x = torch.randn(3, 8, requires_grad=True)
    _grads(layers, x, "offload", offload)
    assert len(offload._saved) == 4 and all(s.host.device.type == "cpu" for s in offload._saved)
    assert seen == [3, 2, 1, 0]


def test_host_offload_groups_a_layer_and_brings_back_the_group_below() -> None:
    """``layer()`` makes a layer's saved input and what ``store`` kept during it one group; bringing back any
    tensor of group g starts every tensor of group g - 1, and ``prefetch_last`` starts the top group."""
    offload = HostOffload()
    loads: list[int] = []
    load = offload._load

    def spy(index: int) -> None:
        loads.append(index)
        load(index)

    offload._load = spy  # type: ignore[method-assign]
    kept: list[int] = []

    def layer_fn(layer: torch.nn.Module):
        def fn(h: torch.Tensor) -> torch.Tensor:
            out = layer(h)
            if len(kept) < 3:  # the forward pass (a recompute stores nothing)
                kept.append(offload.store(out.detach() * 2))
            return out

        return fn

    layers = _layers(3, 8, "cpu")
    x = torch.randn(5, 8, requires_grad=True)
    h = x
    for layer in layers:
        h = run_layer(layer_fn(layer), h, "offload", offload=offload)
    assert offload._groups == [[0, 1], [2, 3], [4, 5]]  # (layer input, stored tensor) per layer
    offload.prefetch_last()
    assert loads == [4, 5]
    loads.clear()
    (h**2).sum().backward()
    # Top layer: its input (4) is unpacked, group 1 (2, 3) starts; then layer 1 (2) starts group 0 (0, 1).
    assert loads[:3] == [4, 2, 3] and loads[3:6] == [2, 0, 1]
    for index, layer in zip(kept, layers):
        assert torch.equal(offload.retrieve(index), (layer(offload._saved[index - 1].host) * 2).detach())


def test_store_outside_a_layer_is_its_own_group() -> None:
    offload = HostOffload()
    a, b = offload.store(torch.ones(3)), offload.store(torch.zeros(2))
    assert offload._groups == [[a], [b]]
    assert torch.equal(offload.retrieve(b), torch.zeros(2))


def test_pinned_pool_reuses_best_fit_buffers_and_rounds_up() -> None:
    pool = PinnedPool(granule=1024, pinned=False)
    a, b = pool.take(1000), pool.take(3000)
    assert (a.numel(), b.numel(), pool.allocated) == (1024, 3072, 2)
    pool.give_back([a, b])
    assert pool.take(900) is a  # best fit, not the first free buffer
    assert pool.take(2500) is b and pool.allocated == 2
    pool.give_back([a, b])
    big = pool.take(1500)  # a is too small; b (3072) is more than 25% larger than asked: a new buffer
    assert big is not a and big is not b and big.numel() == 2048 and pool.allocated == 3


def test_pinned_pool_reuses_a_buffer_no_larger_than_a_fresh_one() -> None:
    # A request a little over one granule gets two granules; the next step's slightly shorter stream asks for a
    # little less, and must get the same buffer back although it is more than 25% larger than asked.
    pool = PinnedPool(granule=1024, pinned=False)
    a = pool.take(1100)
    pool.give_back([a])
    assert pool.take(1090) is a and pool.allocated == 1


def test_pinned_pool_keeps_no_more_free_buffers_than_were_in_use() -> None:
    pool = PinnedPool(granule=1024, pinned=False)
    for size in range(1, 40):  # each pass's two buffers fit no later request: the free list must not grow
        pool.give_back([pool.take(size * 4096), pool.take(size * 4096 + 100)])
    assert len(pool._free) == 2 and pool.allocated == 78


def test_host_offload_returns_its_buffers_when_it_is_gone() -> None:
    pool = PinnedPool(granule=1024, pinned=False)
    offload = HostOffload(pool)
    offload._buffers.extend([pool.take(10), pool.take(10)])
    del offload
    assert len(pool._free) == 2


@pytest.mark.gpu
def test_gpu_offload_matches_recompute_bitwise_and_holds_no_layer_input() -> None:
    """Side-stream copies and the one-ahead prefetch: gradients equal ``on`` bitwise (fp32 and bf16 inputs), twice
    through one graph (retain_graph), and the forward keeps no layer input on the GPU."""
    width, tokens, n = 1024, 4096, 8
    for dtype in (torch.float32, torch.bfloat16):
        layers = [m.to(dtype) for m in _layers(n, width, "cuda", seed=1)]
        x = torch.randn(tokens, width, device="cuda", dtype=dtype, requires_grad=True)
        ref_loss, ref = _grads(layers, x, "on")
        pool = PinnedPool()
        offload = HostOffload(pool)
        h = x
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        for layer in layers:
            h = run_layer(layer, h, "offload", offload=offload)
        held = torch.cuda.memory_allocated() - base
        loss = (h.float() ** 2).sum()
        params = [p for layer in layers for p in layer.parameters()]
        for _ in range(2):  # the second backward copies the inputs back again
            got = torch.autograd.grad(loss, [x, *params], retain_graph=True)
            assert torch.equal(loss.detach(), ref_loss)
            for a, b in zip(got, ref):
                assert torch.equal(a, b)
        layer_input = tokens * width * x.element_size()
        assert held < 2 * layer_input + 4 * 2**20, (held, layer_input)  # "on" would hold n layer inputs
        assert pool.allocated == n
        del offload, got, loss, h
        _, again = _grads(layers, x, "offload", HostOffload(pool))  # the next step reuses the pinned buffers
        assert pool.allocated == n
        for a, b in zip(again, ref):
            assert torch.equal(a, b)
