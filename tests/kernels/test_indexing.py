"""kernels.indexing.needs_long_indexing: the one int32/int64 offset rule every launcher uses."""

from __future__ import annotations

import pytest
import torch

from padless.kernels.indexing import INT32_MAX, needs_long_indexing


@pytest.fixture(autouse=True)
def _automatic(monkeypatch):
    monkeypatch.delenv("PADLESS_FORCE_LONG_INDEXING", raising=False)


def test_boundary_is_the_largest_offset_not_the_count():
    # Meta tensors: shapes and strides without memory. Offsets 0 .. numel - 1 must fit in int32.
    assert not needs_long_indexing(torch.empty(INT32_MAX + 1, device="meta"))  # last offset 2**31 - 1 fits
    assert needs_long_indexing(torch.empty(INT32_MAX + 2, device="meta"))
    assert needs_long_indexing(torch.empty(500_000, 12288, device="meta"))  # 500K tokens x 12288: 6.1e9 elements
    assert not needs_long_indexing(torch.empty(4096, 12288, device="meta"))


def test_strided_views_count_their_extent():
    # The (T, I) up half of a fused (T, 2I) gate_up output: 1.07e9 elements, offsets up to 2.1e9 + I.
    t, i = 87_382, 12288
    fused = torch.empty(t, 2 * i, device="meta")
    up = fused[:, i:]
    assert up.numel() <= INT32_MAX
    assert (t - 1) * 2 * i + i - 1 > INT32_MAX  # its last row's last element
    assert needs_long_indexing(up)
    assert not needs_long_indexing(fused[:1000, i:])
    wide = torch.empty_strided((2, 1), (INT32_MAX + 1, 1), device="meta")
    assert needs_long_indexing(wide)


def test_any_tensor_decides_and_none_is_ignored():
    small, big = torch.empty(3), torch.empty(INT32_MAX + 2, device="meta")
    assert not needs_long_indexing(small, None)
    assert needs_long_indexing(small, None, big)
    assert not needs_long_indexing()
    assert not needs_long_indexing(torch.empty(0))


def test_environment_forces_or_rejects(monkeypatch):
    monkeypatch.setenv("PADLESS_FORCE_LONG_INDEXING", "1")
    assert needs_long_indexing(torch.empty(3))
    monkeypatch.setenv("PADLESS_FORCE_LONG_INDEXING", "0")
    assert not needs_long_indexing(torch.empty(3))
    monkeypatch.setenv("PADLESS_FORCE_LONG_INDEXING", "yes")
    with pytest.raises(ValueError, match="PADLESS_FORCE_LONG_INDEXING='yes': expected '1'"):
        needs_long_indexing(torch.empty(3))
