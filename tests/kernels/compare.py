"""One verbose comparison helper for kernel tests: says how and where two tensors differ."""

from __future__ import annotations

import os

import torch

__all__ = [
    "ATOL",
    "DEVICE",
    "DTYPES",
    "INTERPRETED",
    "assert_close_verbose",
    "dtype_error_bound",
    "interpreter_rtol",
    "relative_error",
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Kernel tests that are not marked ``gpu`` run the real kernels on a GPU machine too (small shapes); on a CPU
# machine through Triton's interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Same-dtype PyTorch error is the scale of a bound; this floor only covers values the reference gets exact.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Triton 3.6's CPU interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even), which costs up to
# one bf16 ulp (2**-7 relative) more than rounding; on the GPU the bound has no such term.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_rtol(dtype: torch.dtype) -> float:
    """The relative allowance for the interpreter's truncating bf16 casts (0 on a GPU and for other dtypes)."""
    return 2.0**-7 if INTERPRETED and dtype == torch.bfloat16 else 0.0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm().item()
    return (a - e).norm().item() / denom if denom > 0 else (a - e).norm().item()


def dtype_error_bound(reference_same_dtype: torch.Tensor, reference_fp64: torch.Tensor, atol: float) -> float:
    """Twice the error PyTorch itself makes in the kernel's dtype, plus a small absolute floor.

    ``reference_same_dtype`` is the reference run on the kernel's dtype inputs; ``reference_fp64`` the same
    reference run in float64. The kernel may err by at most 2x what plain PyTorch errs in that dtype.
    """
    err = (reference_same_dtype.detach().double() - reference_fp64.detach().double()).abs().max().item()
    return 2.0 * err + atol


def assert_close_verbose(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, name: str = "tensor"
) -> None:
    """Assert ``|actual − expected| <= atol + rtol·|expected|`` elementwise, with a report that says where not."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values at {bad}")
    diff = (a - e).abs()
    allowed = atol + rtol * e.abs()
    mismatch = diff > allowed
    if mismatch.any():
        idx = mismatch.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(mismatch.sum())}/{diff.numel()} elements differ; max |diff| {diff.max().item():.3e}, "
            f"mean |diff| {diff.mean().item():.3e}, atol {atol:.1e} rtol {rtol:.1e}; first bad indices {idx}: "
            f"actual {[a[tuple(i)].item() for i in idx]} expected {[e[tuple(i)].item() for i in idx]}"
        )
