"""One shared choice between int32 and int64 element offsets for every Triton kernel launcher.

Triton computes ``program_id * BLOCK + arange`` in int32 unless told otherwise; past 2**31 - 1 elements (for
example 500K tokens x 12288 intermediate = 6.1e9) those offsets wrap and the kernel reads or writes the wrong
memory. int64 arithmetic costs registers and a few percent of bandwidth, so each kernel takes a
``LONG_INDEXING: tl.constexpr`` and widens its offsets only when this helper says so. Kept in one place so the
rule (and the test override) is never copy-pasted per kernel file.

Set ``PADLESS_FORCE_LONG_INDEXING=1`` to force the int64 path on small inputs (tests).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["INT32_MAX", "needs_long_indexing"]

# The largest offset an int32 can hold; an offset of exactly numel - 1 must fit, hence ``numel - 1 > INT32_MAX``.
INT32_MAX = 2**31 - 1


def _force_long_indexing() -> bool:
    value = os.environ.get("PADLESS_FORCE_LONG_INDEXING", "")
    if value not in ("", "0", "1"):
        raise ValueError(
            f"PADLESS_FORCE_LONG_INDEXING={value!r}: expected '1' (force int64 offsets) or '0'/unset (automatic)."
        )
    return value == "1"


def _max_offset(tensor: Any) -> int:
    """The largest element offset a kernel can form from ``tensor``'s base pointer (strides included)."""
    if tensor.numel() == 0:
        return 0
    # A strided view (e.g. a slice of a fused projection) reaches past numel: sum over dims of (size-1)*stride.
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride(), strict=True))


def needs_long_indexing(*tensors: Any) -> bool:
    """True when any tensor's element offsets do not fit in int32, or when ``PADLESS_FORCE_LONG_INDEXING=1``.

    Accepts ``None`` entries (optional arguments) and ignores them. Counts strided extent, not just numel, so a
    (T, I) half of a (T, 2I) fused output is judged by the offsets the kernel actually forms.
    """
    if _force_long_indexing():
        return True
    for tensor in tensors:
        if tensor is None:
            continue
        # A contiguous tensor's largest offset is numel - 1 (the common case, judged without a Python loop).
        offset = tensor.numel() - 1 if tensor.is_contiguous() else max(tensor.numel() - 1, _max_offset(tensor))
        if offset > INT32_MAX:
            return True
    return False
