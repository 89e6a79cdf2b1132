"""Launch options every padless Triton kernel passes.

Why: whether Triton may fuse a multiply and an add into one FMA follows a default (``TRITON_DEFAULT_FP_FUSION``)
that Triton 3.9 warns will turn off in 3.10. The kernels are written, tuned and tested with contraction on (the
attention's ``exp2(qk * scale - lse)``, the RMSNorm and loss row passes: one FMA per element), so every launch asks
for it: the same instructions and numerics under either default, and no warning at the first compile.
``TRITON_FORCE_DISABLE_FP_FUSION=1`` still turns it off.
"""

from __future__ import annotations

__all__ = ["LAUNCH_OPTIONS"]

LAUNCH_OPTIONS: dict[str, bool] = {"enable_fp_fusion": True}
