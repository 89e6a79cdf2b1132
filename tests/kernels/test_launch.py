"""Every Triton launch in padless.kernels passes ``LAUNCH_OPTIONS``, and the installed Triton knows those options."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from padless.kernels.launch import LAUNCH_OPTIONS

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def launches(tree: ast.AST) -> list[ast.Call]:
    """Calls of the form ``something_kernel[grid](...)``."""
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Subscript)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id.endswith("_kernel")
    ]


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_every_launch_passes_the_launch_options(path: Path) -> None:
    for call in launches(ast.parse(path.read_text())):
        splats = [kw.value.id for kw in call.keywords if kw.arg is None and isinstance(kw.value, ast.Name)]
        assert "LAUNCH_OPTIONS" in splats, f"{path.name}:{call.lineno}: {call.func.value.id} launched without them"


def test_the_launch_scan_finds_the_kernels() -> None:
    found = {c.func.value.id for p in KERNELS.glob("*.py") for c in launches(ast.parse(p.read_text()))}
    assert {"_fwd_kernel", "_dq_kernel", "_dkdv_kernel", "_glu_fwd_kernel", "_rms_norm_fwd_kernel"} <= found


def test_the_installed_triton_takes_the_launch_options() -> None:
    from triton.backends.nvidia.compiler import CUDAOptions

    fields = {f.name for f in dataclasses.fields(CUDAOptions)}
    assert set(LAUNCH_OPTIONS) <= fields, sorted(set(LAUNCH_OPTIONS) - fields)
