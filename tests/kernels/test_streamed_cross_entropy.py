"""padless.kernels.streamed_cross_entropy against the fused kernel's fp64 reference.

On the CPU the weight is sliced in place (the same arithmetic, chunk by chunk and block by block); the ``gpu``
tests keep the weight in pinned host memory with hidden on the GPU, so chunks are copied on the side stream.
Bounds follow tests/kernels/test_cross_entropy.py: at most twice what eager PyTorch errs in the inputs' dtype.
"""

from __future__ import annotations

import pytest
import torch

from padless.kernels.cross_entropy import fused_linear_cross_entropy_reference
from padless.kernels.streamed_cross_entropy import streamed_linear_cross_entropy
from tests.kernels.compare import assert_close_verbose, dtype_error_bound
from tests.kernels.test_cross_entropy import IGNORE, _eager_same_dtype, _inputs

DTYPES = [torch.float32, torch.bfloat16]


def _check(hidden, weight, labels, *, softcap=None, counted_bound=None, **sizes) -> None:
    h = hidden.detach().clone().requires_grad_(True)
    loss, count = streamed_linear_cross_entropy(h, weight, labels, IGNORE, softcap, counted_bound, **sizes)
    (grad,) = torch.autograd.grad(loss * 0.37, h)

    hd = hidden.detach().cpu().double().requires_grad_(True)
    ref_loss, ref_count = fused_linear_cross_entropy_reference(hd, weight.cpu().double(), labels.cpu(), IGNORE, softcap)
    (ref_grad,) = torch.autograd.grad(ref_loss * 0.37, hd)
    he = hidden.detach().cpu().clone().requires_grad_(True)
    eager = _eager_same_dtype(he, weight.cpu(), labels.cpu(), softcap=softcap)
    (eager_grad,) = torch.autograd.grad(eager * 0.37, he)

    assert loss.dtype == torch.float32 and int(count) == int(ref_count)
    bound = dtype_error_bound(eager, ref_loss, atol=1e-5 * max(1.0, abs(ref_loss.item())))
    assert_close_verbose(loss.cpu(), ref_loss, atol=bound, name="loss_sum")
    assert grad.dtype == hidden.dtype
    atol = 1e-5 * max(1e-3, ref_grad.abs().max().item())
    bound = dtype_error_bound(eager_grad, ref_grad, atol=atol)
    assert_close_verbose(grad.cpu(), ref_grad, atol=bound, rtol=torch.finfo(hidden.dtype).eps / 2, name="grad")


def _sizes(vocab_rows: int, width: int, dtype: torch.dtype, block_rows: int) -> dict[str, int]:
    """Byte budgets giving chunks of ``vocab_rows`` weight rows and row blocks of ``block_rows`` tokens."""
    return {
        "vocab_chunk_bytes": vocab_rows * width * dtype.itemsize,
        "work_bytes": block_rows * (vocab_rows + width) * dtype.itemsize,
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_matches_reference_across_chunks_and_blocks(dtype, softcap):
    # 257 vocab rows in chunks of 40 (the last of 17), 41 tokens in blocks of 6: the online max and sum must
    # rescale across chunks, and every target falls in some chunk.
    hidden, weight, labels = _inputs(41, 23, 257, dtype, seed=3 + (softcap is not None))
    _check(hidden, weight, labels, softcap=softcap, **_sizes(40, 23, dtype, 6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 40.0])
def test_a_later_chunk_far_above_the_reference_max_rescales_the_sums(dtype, softcap):
    # Weight rows grow with their vocab id, so each chunk's max passes the one before by more than the rescale
    # margin for most rows: the running sum and the softmax-weighted rows must be brought to the new reference.
    # Without softcap the last chunks pass the first by more than exp's fp32 range: no rescale would overflow.
    hidden, weight, labels = _inputs(33, 16, 160, dtype, seed=31)
    weight = (weight.float() * torch.linspace(1.0, 60.0 if softcap is None else 12.0, 160)[:, None]).to(dtype)
    logits = hidden.float() @ weight.float().T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    chunk_max = logits.view(33, 4, 40).amax(dim=2)
    assert (chunk_max[:, 1:] - chunk_max[:, :-1].cummax(dim=1).values > 8.0).any(dim=1).float().mean() > 0.5
    if softcap is None:
        assert (chunk_max[:, 3] - chunk_max[:, 0] > 100.0).float().mean() > 0.5
    _check(hidden, weight, labels, softcap=softcap, **_sizes(40, 16, dtype, 7))


def test_fp16_softmax_weighted_rows_stay_in_range():
    # A later chunk whose every logit is 7.5 above the first chunk's max, with weight rows of 100 in a direction the
    # logits do not see: fp16 sums of p @ W_c must not overflow (65504) although the true gradient is ~100.
    width, vocab, tokens = 4, 128, 6
    weight = torch.zeros(vocab, width)
    weight[:64, 0] = torch.linspace(-1.0, 0.0, 64)
    weight[64:, 0], weight[64:, 1] = 7.5, 100.0
    hidden = torch.zeros(tokens, width)
    hidden[:, 0] = 1.0
    labels = torch.tensor([0, 3, 70, 100, 5, 127])
    _check(hidden.half(), weight.half(), labels, **_sizes(64, width, torch.float16, tokens))


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_reference_max_ignores_padding_columns_and_follows_the_cap(softcap):
    # Without a cap every logit sits ~150 below 0 (a constant hidden column times a -150 weight column); with cap 2.5
    # the raw logits reach ~150 while the capped ones stay below 2.5. A reference max taken over the last chunk's
    # padding columns (0) or over the uncapped logits would put exp(z - m) below fp32's range.
    hidden, weight, labels = _inputs(23, 12, 117, torch.float32, seed=41)
    if softcap is None:
        hidden[:, -1], weight[:, -1] = 1.0, -150.0
    else:
        weight = weight * 50.0
    _check(hidden, weight, labels, softcap=softcap, **_sizes(40, 12, torch.float32, 5))


def test_a_transposed_weight_view_gives_the_same_result():
    # weight.stride(1) != 1 (a (V, E) view of an (E, V) tensor): the target rows must follow both strides.
    hidden, weight, labels = _inputs(19, 10, 73, torch.float32, seed=43)
    _check(hidden, weight.T.contiguous().T, labels, **_sizes(30, 10, torch.float32, 4))
    padded = torch.cat([weight, torch.zeros(73, 3)], dim=1)[:, :10]
    _check(hidden, padded, labels, **_sizes(30, 10, torch.float32, 4))


def test_one_chunk_one_block_and_default_sizes():
    hidden, weight, labels = _inputs(29, 16, 101, torch.float32, seed=5)
    _check(hidden, weight, labels)
    _check(hidden, weight, labels, **_sizes(101, 16, torch.float32, 29))


@pytest.mark.parametrize("slack", [0, 3, 100], ids=["exact", "bound_above", "bound_past_T"])
def test_counted_bound_matches_and_zeroes_ignored_rows(slack):
    hidden, weight, labels = _inputs(37, 15, 113, torch.bfloat16, seed=23)
    labels[3:12], labels[20:26] = IGNORE, IGNORE
    targets = torch.cat([labels[1:], labels.new_full((1,), IGNORE)])
    counted = int((targets != IGNORE).sum())
    _check(hidden, weight, labels, softcap=3.0, counted_bound=counted + slack, **_sizes(30, 15, torch.bfloat16, 4))
    h = hidden.clone().requires_grad_(True)
    loss, _ = streamed_linear_cross_entropy(h, weight, labels, counted_bound=counted + slack)
    (grad,) = torch.autograd.grad(loss, h)
    assert grad[targets == IGNORE].abs().max().item() == 0.0
    assert grad[targets != IGNORE].abs().amax(dim=1).min().item() > 0.0


def test_loud_failures_are_nan_not_wrong_numbers():
    hidden, weight, labels = _inputs(20, 8, 50, torch.float32, seed=9)
    counted = int((labels[1:] != IGNORE).sum())
    loss, _ = streamed_linear_cross_entropy(hidden, weight, labels, counted_bound=counted - 1)
    assert torch.isnan(loss)
    bad = labels.clone()
    bad[5] = 50  # outside [0, V) and not ignore_index
    loss, _ = streamed_linear_cross_entropy(hidden, weight, bad)
    assert torch.isnan(loss)


def test_a_zero_bound_with_counted_tokens_is_nan_and_a_second_backward_is_refused():
    hidden, weight, labels = _inputs(8, 8, 30, torch.float32, seed=12)
    loss, count = streamed_linear_cross_entropy(hidden, weight, labels, counted_bound=0)
    assert int(count) > 0 and torch.isnan(loss)
    with pytest.raises(ValueError, match="counted_bound"):
        streamed_linear_cross_entropy(hidden, weight, labels, counted_bound=-1)
    h = hidden.clone().requires_grad_(True)
    loss, _ = streamed_linear_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_all_ignored_gives_zero_loss_and_gradient():
    hidden, weight, labels = _inputs(12, 8, 30, torch.float32, seed=11)
    h = hidden.clone().requires_grad_(True)
    loss, count = streamed_linear_cross_entropy(h, weight, torch.full_like(labels, IGNORE), counted_bound=0)
    (grad,) = torch.autograd.grad(loss, h)
    assert loss.item() == 0.0 and int(count) == 0 and grad.abs().max().item() == 0.0


def test_bad_inputs_name_the_problem():
    hidden, weight, labels = _inputs(10, 8, 30, torch.float32, seed=1)
    with pytest.raises(ValueError, match="frozen"):
        streamed_linear_cross_entropy(hidden.requires_grad_(True), weight.clone().requires_grad_(True), labels)
    with pytest.raises(TypeError, match="differ"):
        streamed_linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match=r"\(T, E\) and \(V, E\)"):
        streamed_linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="integer labels"):
        streamed_linear_cross_entropy(hidden, weight, labels[:-1])


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_weight_in_pinned_host_memory(softcap):
    # Hidden on the GPU, the weight pinned on the host: chunks travel on the side stream, two buffers in turn.
    hidden, weight, labels = _inputs(300, 64, 5003, torch.bfloat16, seed=17)
    _check(hidden.cuda(), weight.pin_memory(), labels.cuda(), softcap=softcap, **_sizes(512, 64, torch.bfloat16, 96))


@pytest.mark.gpu
def test_gpu_qwen3_4b_vocab_streams_without_a_device_copy_of_the_weight():
    # Qwen3-4B's tied embedding (151936 x 2560 bf16, 742 MiB) stays on the host; 2K tokens add only the two chunk
    # buffers, one block's work, the fp32 running sums and grad_hidden to the GPU.
    tokens, width, vocab = 2048, 2560, 151936
    weight = (torch.randn(vocab, width) * 0.02).to(torch.bfloat16).pin_memory()
    hidden = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = streamed_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    budget = 2 * 32 * 2**20 + 64 * 2**20 + tokens * width * (4 + 2 + 2 + 2) + 16 * 2**20
    assert extra <= budget, (extra / 2**20, budget / 2**20)
    ref = fused_linear_cross_entropy_reference(hidden.detach()[:256].float(), weight.cuda().float(), labels[:256])[0]
    part, _ = streamed_linear_cross_entropy(hidden.detach()[:256], weight, labels[:256])
    assert abs(part.item() - ref.item()) <= 2e-3 * abs(ref.item())
