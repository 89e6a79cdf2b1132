"""padless.kernels.cross_entropy: the chunked fused linear cross-entropy against its plain-PyTorch reference.

CPU runs go through TRITON_INTERPRET=1 (tests/conftest.py) on small, odd and prime shapes. Error bounds follow
the dtype: the kernel may err (against the fp64 reference) by at most twice what eager PyTorch errs in the same
dtype (``F.cross_entropy((h @ W.T).float())``, logits rounded to the input dtype as cuBLAS returns them) plus a
small atol. The GPU tests (``pytest -m gpu``) run Qwen3-8B's lm_head shape, check the memory budget and capture
the function in a CUDA graph.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from padless.kernels.cross_entropy import (
    DEFAULT_CHUNK_BYTES,
    _chunk_rows,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from tests.kernels.compare import DEVICE, assert_close_verbose, dtype_error_bound

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _packed_labels(tokens: int, vocab: int, gen: torch.Generator, n_examples: int = 4) -> torch.Tensor:
    """Packed HF labels: random cu_seqlens, -100 on every example's first token and on a random prompt prefix."""
    device = gen.device
    cuts = torch.randperm(tokens - 1, generator=gen, device=device)[: n_examples - 1] + 1
    bounds = [0, *sorted(cuts.tolist()), tokens]
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    for start, stop in itertools.pairwise(bounds):
        prompt = int(torch.randint(1, max(2, (stop - start) // 2 + 1), (1,), generator=gen, device=device))
        labels[start : start + prompt] = IGNORE
    return labels


def _inputs(tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=gen, device=device)
    # Logits with a spread of ~3 (a trained lm_head's scale), so softmax is neither flat nor one-hot.
    weight = torch.randn(vocab, hidden_size, generator=gen, device=device) * (3.0 / hidden_size**0.5)
    labels = _packed_labels(tokens, vocab, gen)
    return hidden.to(dtype), weight.to(dtype), labels


def _eager_same_dtype(hidden, weight, labels, ignore_index=IGNORE, softcap=None):
    """What plain PyTorch computes in the inputs' dtype: logits from a same-dtype matmul, CE in fp32."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    targets = labels.new_full(labels.shape, ignore_index)
    targets[:-1] = labels[1:]
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def _loss_and_grads(fn, hidden, weight, labels, train_weight: bool, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(train_weight)
    out = fn(h, w, labels, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    # A non-unit upstream gradient (a caller dividing by the token count) must scale both gradients.
    grads = torch.autograd.grad(loss * 0.37, (h, w) if train_weight else (h,))
    return out, grads


def _check_against_reference(
    hidden, weight, labels, *, train_weight=True, softcap=None, chunk_bytes=None, weight_slack=1.0, counted_bound=None
):
    kwargs = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    if counted_bound is not None:
        kwargs["counted_bound"] = counted_bound
    (loss, count), grads = _loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, labels, train_weight, softcap=softcap, **kwargs
    )
    (ref_loss, ref_count), ref_grads = _loss_and_grads(
        fused_linear_cross_entropy_reference, hidden.double(), weight.double(), labels, train_weight, softcap=softcap
    )
    eager_loss, eager_grads = _loss_and_grads(_eager_same_dtype, hidden, weight, labels, train_weight, softcap=softcap)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert count.dtype == torch.int64 and count.dim() == 0 and not count.requires_grad
    assert int(count) == int(ref_count) == int((labels[1:] != IGNORE).sum())
    scale = max(1.0, abs(ref_loss.item()))
    bound = dtype_error_bound(eager_loss, ref_loss, atol=1e-5 * scale)
    assert_close_verbose(loss, ref_loss, atol=bound, name="loss_sum")
    # The kernel's gradients are rounded to the dtype in the forward, then scaled by the upstream gradient in
    # backward (a second rounding eager does not make: it scales dlogits in fp32 before its one rounding), hence
    # rtol = half an ulp on top of the dtype bound.
    rtol = torch.finfo(hidden.dtype).eps / 2
    for name, grad, ref, eager in zip(("grad_hidden", "grad_weight"), grads, ref_grads, eager_grads):
        assert grad.dtype == hidden.dtype and grad.shape == ref.shape
        atol = 1e-5 * max(1e-3, ref.abs().max().item())
        bound = dtype_error_bound(eager, ref, atol=atol) * (weight_slack if name == "grad_weight" else 1.0)
        assert_close_verbose(grad, ref, atol=bound, rtol=rtol, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen_w", "train_w"])
def test_matches_reference(dtype, softcap, train_weight):
    seed = 1000 * DTYPES.index(dtype) + 10 * (softcap is not None) + train_weight
    hidden, weight, labels = _inputs(41, 23, 257, dtype, seed)
    _check_against_reference(hidden, weight, labels, train_weight=train_weight, softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_chunks_with_a_partial_last_chunk(dtype):
    # 53 tokens, chunks of 7 rows -> 8 chunks, the last one of 4 rows (uneven split kept under the budget).
    tokens, vocab = 53, 211
    hidden, weight, labels = _inputs(tokens, 17, vocab, dtype, seed=7 + DTYPES.index(dtype))
    chunk_bytes = 7 * vocab * hidden.element_size()
    assert _chunk_rows(tokens, vocab, hidden.element_size(), chunk_bytes) == 7
    # grad_weight is accumulated chunk by chunk in the weight's dtype (as Liger does; fp32 would cost V x E x 4
    # bytes): 8 roundings of the running sum instead of eager's one, so its low-precision bound gets slack.
    slack = 1.0 if dtype == torch.float32 else 4.0
    _check_against_reference(
        hidden, weight, labels, train_weight=True, softcap=3.0, chunk_bytes=chunk_bytes, weight_slack=slack
    )


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_frozen_weight_bf16_several_chunks(softcap):
    # The trainer's case (frozen lm_head, grad_hidden only) in bf16, odd sizes, 6 chunks of 4 rows + 1 of 3.
    tokens, vocab = 27, 139
    hidden, weight, labels = _inputs(tokens, 19, vocab, torch.bfloat16, seed=31 + (softcap is not None))
    chunk_bytes = 4 * vocab * hidden.element_size()
    _check_against_reference(hidden, weight, labels, train_weight=False, softcap=softcap, chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("slack", [0, 4, 100], ids=["exact", "bound_above", "bound_past_T"])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen_w", "train_w"])
def test_counted_bound_skips_without_a_sync(slack, train_weight):
    # The trainer knows each micro-batch's trainable-token count on the host: with it as the bound (or any larger
    # bound) the counted tokens are selected on the device, no sync, and everything equals the reference.
    tokens, vocab = 37, 113
    hidden, weight, labels = _inputs(tokens, 15, vocab, torch.bfloat16, seed=23)
    labels[3:12], labels[20:26] = IGNORE, IGNORE  # two prompts: ignored tokens between counted ones
    targets = torch.cat([labels[1:], labels.new_full((1,), IGNORE)])
    counted = int((targets != IGNORE).sum())
    assert 5 < counted < tokens - 10
    chunk_bytes = 5 * vocab * hidden.element_size()  # chunks of 5 rows: several, the last partial
    _check_against_reference(
        hidden, weight, labels, train_weight=train_weight, softcap=3.0, chunk_bytes=chunk_bytes,
        counted_bound=counted + slack, weight_slack=4.0,
    )  # fmt: skip
    h = hidden.clone().requires_grad_(True)
    loss, count = fused_linear_cross_entropy(h, weight, labels, counted_bound=counted + slack, chunk_bytes=chunk_bytes)
    (grad,) = torch.autograd.grad(loss, h)
    assert int(count) == counted
    assert grad[targets == IGNORE].abs().max().item() == 0.0  # skipped rows get exactly zero gradient
    assert grad[targets != IGNORE].abs().amax(dim=1).min().item() > 0.0
    # All ignored: nothing to gather, zero loss and gradients.
    w = weight.clone().requires_grad_(True)
    loss, count = fused_linear_cross_entropy(h, w, torch.full_like(labels, IGNORE), counted_bound=0)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0.0 and int(count) == 0
    assert grad_h.abs().max().item() == 0.0 and grad_w.abs().max().item() == 0.0


def test_counted_first_order_is_a_stable_partition():
    from padless.kernels.cross_entropy import counted_first

    g = torch.Generator().manual_seed(0)
    for n, p in [(1, 0.5), (57, 0.4), (300, 0.9), (64, 0.0), (64, 1.0)]:
        counted = torch.rand(n, generator=g) < p
        expected = torch.cat([counted.nonzero().squeeze(1), (~counted).nonzero().squeeze(1)])
        assert torch.equal(counted_first(counted), expected)


def test_counted_bound_below_the_count_is_loud():
    hidden, weight, labels = _inputs(29, 8, 50, torch.float32, seed=5)
    counted = int((labels[1:] != IGNORE).sum())
    loss, count = fused_linear_cross_entropy(hidden, weight, labels, counted_bound=counted - 1)
    assert int(count) == counted and torch.isnan(loss)  # never a silently smaller loss
    with pytest.raises(ValueError, match="counted_bound=-1"):
        fused_linear_cross_entropy(hidden, weight, labels, counted_bound=-1)


def test_vocab_spanning_several_blocks():
    # V = 2 x 8192 + 37: the row loop runs several blocks (5 of 4096), the last one masked.
    hidden, weight, labels = _inputs(6, 16, 2 * 8192 + 37, torch.float32, seed=11)
    labels[3] = 2 * 8192 + 30  # a target in the masked tail block
    _check_against_reference(hidden, weight, labels, train_weight=True, softcap=4.0)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize(("vocab", "block", "segment"), [(37, 16, 4), (5, 8, 8), (100, 32, 16), (64, 16, 16)])
def test_row_kernel_blocks_and_segment_lanes(vocab, block, segment, softcap):
    """The row kernel alone on hand-made rows, with small blocks so that every case crosses blocks: the row's max
    in the first block, in the masked last block, all-equal logits, a wide range (exp underflows), a lane that
    sees only masked columns (V < BLOCK_V), an ignored row; loss and dlogits against float64."""
    from padless.kernels.cross_entropy import _ce_rows_kernel

    gen = torch.Generator().manual_seed(vocab * 100 + block + (softcap is not None))
    rows = [torch.randn(vocab, generator=gen) * 3 for _ in range(6)]
    rows[0][0] = 40.0  # max in the first block
    rows[1][-1] = 40.0  # max in the last (partial) block
    rows[2] = torch.full((vocab,), 1.5)  # all equal
    rows[3] = torch.linspace(-300.0, 60.0, vocab)  # most exps underflow against the max
    logits = torch.stack(rows).to(DEVICE)
    targets = torch.randint(0, vocab, (6,), generator=gen).to(DEVICE)
    targets[4] = IGNORE
    targets[5] = vocab - 1
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    want_loss = F.cross_entropy(z, targets, ignore_index=IGNORE, reduction="none")
    zg = z.clone().requires_grad_(True)
    want_grad = torch.autograd.grad(F.cross_entropy(zg, targets, ignore_index=IGNORE, reduction="sum"), zg)[0]
    if softcap is not None:
        want_grad = want_grad * (1 - torch.tanh(logits.double() / softcap) ** 2)
    buffer = logits.clone()
    row_loss = torch.empty(6, device=DEVICE)
    _ce_rows_kernel[(6,)](
        buffer, targets, row_loss, buffer.stride(0), IGNORE, 1.0 if softcap is None else softcap,
        V=vocab, HAS_SOFTCAP=softcap is not None, WRITE_GRAD=True, BLOCK_V=block, SEGMENT=segment,
    )  # fmt: skip
    assert_close_verbose(row_loss, want_loss, atol=1e-4, rtol=1e-5, name="row loss")
    assert_close_verbose(buffer, want_grad, atol=1e-6, rtol=1e-4, name="dlogits")


def test_next_token_shift_changes_only_the_previous_token():
    hidden, weight, labels = _inputs(19, 13, 101, torch.float32, seed=3)
    labels[1:] = torch.randint(0, 101, (18,))
    k = 8  # token k is scored against labels[k + 1]
    changed = labels.clone()
    changed[k + 1] = (labels[k + 1] + 1 + torch.randint(0, 99, (1,))) % 101
    h = hidden.clone().requires_grad_(True)
    loss_a, _ = fused_linear_cross_entropy(h, weight, labels)
    (grad_a,) = torch.autograd.grad(loss_a, h)
    loss_b, _ = fused_linear_cross_entropy(h, weight, changed)
    (grad_b,) = torch.autograd.grad(loss_b, h)
    # Token k's loss is lse_k - z_k[target]: changing its target moves the sum by z_k[old] - z_k[new].
    z_k = hidden[k].double() @ weight.double().T
    expected = z_k[labels[k + 1]] - z_k[changed[k + 1]]
    assert_close_verbose(loss_b - loss_a, expected.float(), atol=1e-4, name="loss change")
    rows_changed = ((grad_a - grad_b).abs().amax(dim=1) > 0).nonzero().flatten().tolist()
    assert rows_changed == [k], f"changing labels[{k + 1}] changed gradient rows {rows_changed}; expected [{k}]"
    # labels[0] is never scored and the last token scores nothing.
    first_changed = labels.clone()
    first_changed[0] = 5
    assert fused_linear_cross_entropy(hidden, weight, first_changed)[0].item() == loss_a.item()
    assert grad_a[-1].abs().max().item() == 0.0


def test_all_ignored_and_tiny_inputs():
    hidden, weight, _ = _inputs(9, 8, 50, torch.bfloat16, seed=5)
    labels = torch.full((9,), IGNORE)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, count = fused_linear_cross_entropy(h, w, labels)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0.0 and int(count) == 0
    assert grad_h.abs().max().item() == 0.0 and grad_w.abs().max().item() == 0.0
    # One token scores nothing; zero tokens give zeros and an all-zero weight gradient.
    for tokens in (1, 0):
        h = hidden[:tokens].clone().requires_grad_(True)
        loss, count = fused_linear_cross_entropy(h, w, torch.zeros(tokens, dtype=torch.int64))
        grad_h, grad_w = torch.autograd.grad(loss, (h, w))
        assert loss.item() == 0.0 and int(count) == 0 and grad_h.shape == (tokens, 8)
        assert grad_w.abs().max().item() == 0.0


def test_grad_requirements_and_no_grad():
    hidden, weight, labels = _inputs(17, 11, 97, torch.float32, seed=9)
    ref_loss, _ = fused_linear_cross_entropy_reference(hidden, weight, labels)
    # Neither requires grad, and no_grad with both requiring it: loss only, not differentiable.
    loss, _ = fused_linear_cross_entropy(hidden, weight, labels)
    assert not loss.requires_grad
    with torch.no_grad():
        loss_ng, _ = fused_linear_cross_entropy(hidden.requires_grad_(True), weight.requires_grad_(True), labels)
    assert not loss_ng.requires_grad
    assert_close_verbose(loss, ref_loss, atol=1e-4, name="loss")
    assert_close_verbose(loss_ng, ref_loss, atol=1e-4, name="loss under no_grad")
    # Only the weight requires grad (hidden detached).
    w = weight.detach().clone().requires_grad_(True)
    (grad_w,) = torch.autograd.grad(fused_linear_cross_entropy(hidden.detach(), w, labels)[0], w)
    (ref_w,) = torch.autograd.grad(fused_linear_cross_entropy_reference(hidden.detach(), w, labels)[0], w)
    assert_close_verbose(grad_w, ref_w, atol=1e-5, name="grad_weight")


def test_tied_embedding_weight_gets_both_gradients():
    gen = torch.Generator().manual_seed(21)
    vocab, size, tokens = 89, 12, 23
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    labels = ids.clone()
    labels[0] = IGNORE
    table = torch.randn(vocab, size, generator=gen) * 0.5
    mix = torch.randn(size, size, generator=gen) * 0.3

    def run(fn):
        emb = torch.nn.Embedding(vocab, size)
        with torch.no_grad():
            emb.weight.copy_(table)
        hidden = torch.tanh(emb(ids) @ mix)  # the embedding feeds the "model" and is the lm_head too
        loss, _ = fn(hidden, emb.weight, labels)
        loss.backward()
        return emb.weight.grad

    assert_close_verbose(run(fused_linear_cross_entropy), run(fused_linear_cross_entropy_reference), atol=1e-5)


def test_out_of_range_label_gives_nan_and_backward_runs_once():
    hidden, weight, labels = _inputs(10, 8, 31, torch.float32, seed=2)
    bad = labels.clone()
    bad[4] = 31
    assert torch.isnan(fused_linear_cross_entropy(hidden, weight, bad)[0])
    h = hidden.clone().requires_grad_(True)
    loss, _ = fused_linear_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_arguments_are_named():
    hidden, weight, labels = _inputs(6, 8, 20, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"hidden size 8 != weight's 7"):
        fused_linear_cross_entropy(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match=r"labels \(5,\) must be 1-D with T = 6"):
        fused_linear_cross_entropy(hidden, weight, labels[:5])
    with pytest.raises(TypeError, match="must share one floating dtype"):
        fused_linear_cross_entropy(hidden, weight.bfloat16(), labels)
    with pytest.raises(TypeError, match=r"labels dtype torch\.float32"):
        fused_linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="must be 2-D"):
        fused_linear_cross_entropy(hidden[None], weight, labels)
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_bytes=0)


def test_chunk_rows_follow_the_byte_budget():
    # Qwen3's lm_head in bf16 under the default budget: up to 1280 rows (371 MiB); 4K tokens in 4 equal chunks,
    # 16K in 13.
    assert _chunk_rows(16384, 151936, 2, DEFAULT_CHUNK_BYTES) == 1280
    assert _chunk_rows(4096, 151936, 2, DEFAULT_CHUNK_BYTES) == 1024
    assert _chunk_rows(300, 151936, 2, DEFAULT_CHUNK_BYTES) == 300
    for tokens, vocab, size, budget in [(5000, 262144, 2, DEFAULT_CHUNK_BYTES), (4097, 151936, 2, 2**30),
                                        (777, 1000, 4, 10**6)]:  # fmt: skip
        rows = _chunk_rows(tokens, vocab, size, budget)
        assert 1 <= rows <= tokens and rows * vocab * size <= budget
    assert _chunk_rows(9, 5, 4, 1) == 1


# ------------------------------------------------------------------------------------------------------------------
# GPU: Qwen3-8B's lm_head (E 4096, V 151936) in bf16
# ------------------------------------------------------------------------------------------------------------------


def _extra_memory(fn, hidden, weight, labels, train_weight: bool) -> tuple[int, torch.Tensor]:
    """Peak bytes above the inputs during forward + backward, counting the gradient outputs."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(train_weight)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = fn(h, w, labels)
    grads = torch.autograd.grad(loss, (h, w) if train_weight else (h,))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, grads[0]


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_memory")  # tens of GiB: one at a time under --dist loadgroup
@pytest.mark.parametrize("tokens", [4096, 16384])
def test_gpu_qwen3_lm_head_error_and_memory(tokens):
    hidden, weight, labels = _inputs(tokens, 4096, 151936, torch.bfloat16, seed=tokens, device="cuda")
    hidden = hidden * 0.5  # keep the logits realistic (std ~1.5)
    counted = int((labels[1:] != IGNORE).sum())

    for bound in (None, counted):

        def ours(h, w, lab, bound=bound):
            return fused_linear_cross_entropy(h, w, lab, counted_bound=bound)

        for train_weight in (False, True):
            _extra_memory(ours, hidden, weight, labels, train_weight)  # compile first
            extra, _ = _extra_memory(ours, hidden, weight, labels, train_weight)
            # Budget above the inputs: grad_hidden (T x E), one chunk of logits (rows x V), the chunk's gathered
            # hidden rows and their gradient (rows x E each), 32 MiB of kernel workspace; a trainable weight adds its
            # gradient (V x E). Nothing grows with T x V.
            rows = _chunk_rows(tokens, weight.shape[0], 2, DEFAULT_CHUNK_BYTES)
            budget = (tokens + rows * 2) * hidden.shape[1] * 2 + rows * weight.shape[0] * 2 + 32 * 2**20
            budget += weight.numel() * weight.element_size() if train_weight else 0
            print(f"T={tokens} counted_bound={bound} train_weight={train_weight}: extra {extra / 2**30:.3f} GiB")
            assert extra <= budget, f"extra memory {extra / 2**30:.3f} GiB at T={tokens}; expected <= {budget / 2**30}"
    if tokens == 4096:
        # Errors against fp64 within twice eager bf16's, loss and both gradients. Default chunks (4 x 1024 rows):
        # grad_weight accumulated in bf16 once per chunk, hence its slack.
        _check_against_reference(hidden, weight, labels, train_weight=True, weight_slack=4.0)
        _check_against_reference(hidden, weight, labels, train_weight=False)
        # Trainable weight in one 4096-row chunk: one rounding of grad_weight, no slack.
        chunk = 4096 * weight.shape[0] * weight.element_size()
        _check_against_reference(hidden, weight, labels, train_weight=True, chunk_bytes=chunk)
        # Only the counted tokens (about half: the packed labels' prompts), gathered per chunk.
        _check_against_reference(hidden, weight, labels, train_weight=False, counted_bound=counted)
        _check_against_reference(hidden, weight, labels, train_weight=True, counted_bound=counted, weight_slack=4.0)


@pytest.mark.gpu
def test_gpu_capture_in_a_cuda_graph():
    """The trainer replays forward+backward as one CUDA graph: the chunk loop must capture, and a replay must give
    the eager values."""
    tokens, size, vocab = 2048, 1024, 32000
    hidden, weight, labels = _inputs(tokens, size, vocab, torch.bfloat16, seed=8, device="cuda")
    h = hidden.clone().requires_grad_(True)
    chunk = 256 * vocab * 2  # 8 chunks

    def step():
        loss, _ = fused_linear_cross_entropy(h, weight, labels, chunk_bytes=chunk)
        (grad,) = torch.autograd.grad(loss * 0.5, h)
        return loss, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream (Triton compiles, cuBLAS picks kernels)
        want_loss, want_grad = step()
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = step()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert_close_verbose(loss, want_loss, atol=1e-5 * abs(want_loss.item()), name="graph loss")
    assert_close_verbose(grad, want_grad, atol=2**-8 * want_grad.abs().max().item(), name="graph grad")
