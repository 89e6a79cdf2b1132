"""padless.kernels.embedding_gather: rows gathered by a kernel, from the device or from pinned host memory."""

from __future__ import annotations

import pytest
import torch

from padless.kernels.embedding_gather import gather_rows, gather_rows_reference
from tests.kernels.compare import DEVICE


def _weight(vocab: int, width: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [8, 700, 1024])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_matches_index_select(dtype, width, id_dtype):
    weight = _weight(37, width, dtype).to(DEVICE)
    ids = torch.tensor([5, 0, 36, 5, 17, 2], dtype=id_dtype, device=DEVICE)
    got = gather_rows(weight, ids)
    assert got.dtype == dtype and got.shape == (6, width)
    assert torch.equal(got, weight[ids.long()])
    assert torch.equal(gather_rows_reference(weight, ids), weight[ids.long()])


def test_out_of_range_ids_give_zero_rows_like_the_reference():
    weight = _weight(10, 16, torch.float32).to(DEVICE)
    ids = torch.tensor([3, -1, 10, 9, 1000], device=DEVICE)
    got = gather_rows(weight, ids)
    assert torch.equal(got, gather_rows_reference(weight, ids))
    assert torch.equal(got[[1, 2, 4]], torch.zeros(3, 16, device=DEVICE))
    assert torch.equal(got[[0, 3]], weight[[3, 9]])


def test_no_ids_give_an_empty_result():
    weight = _weight(10, 16, torch.bfloat16).to(DEVICE)
    assert gather_rows(weight, torch.empty(0, dtype=torch.long, device=DEVICE)).shape == (0, 16)


@pytest.mark.parametrize(
    "weight, ids, match",
    [
        (torch.zeros(4, 8).t(), torch.zeros(2, dtype=torch.long), "contiguous rows"),
        (torch.zeros(4), torch.zeros(2, dtype=torch.long), r"expected \(V, E\)"),
        (torch.zeros(4, 8), torch.zeros(2), "int32 or int64"),
        (torch.zeros(4, 8), torch.zeros(2, 1, dtype=torch.long), "int32 or int64"),
    ],
)
def test_bad_arguments_raise(weight, ids, match):
    with pytest.raises(ValueError, match=match):
        gather_rows(weight, ids)


@pytest.mark.gpu
def test_gpu_pageable_host_weight_is_refused():
    with pytest.raises(ValueError, match="pageable"):
        gather_rows(torch.zeros(4, 8), torch.zeros(2, dtype=torch.long, device="cuda"))


@pytest.mark.gpu
def test_gpu_reads_pinned_host_memory_inside_a_cuda_graph():
    weight = _weight(5003, 2560, torch.bfloat16).pin_memory()
    ids = torch.randint(0, 5003, (4096,), device="cuda")
    assert torch.equal(gather_rows(weight, ids).cpu(), weight[ids.cpu()])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gather_rows(weight, ids)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gather_rows(weight, ids)
    ids.copy_(torch.randint(0, 5003, (4096,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), weight[ids.cpu()])
