"""Shared pytest set-up: Triton's interpreter on CPU-only machines, the ``gpu`` marker, and the GPU's sharing
between pytest-xdist workers.

A ``gpu_exclusive`` test (one that needs most of the card: tens of GiB in one piece) runs with no other GPU test in
progress in any worker: every GPU test holds a shared lock on one file while it runs and returns its cached memory to
the driver before letting go; an exclusive test holds the lock alone. ``xdist_group`` cannot give this: it only
orders the tests of one group inside one worker while the other workers keep their own tensors on the card.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        # Triton kernels run on the CPU through the interpreter; must be set before triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _gpu_lock_path() -> Path:
    """One lock file per user and visible-device set: the pytest processes that share these cards."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "-") or "none"
    return Path(tempfile.gettempdir()) / f"padless-gpu-tests-{os.getuid()}-{devices}.lock"


@pytest.fixture(autouse=True)
def _gpu_share(request: pytest.FixtureRequest) -> Iterator[None]:
    if "gpu" not in request.keywords:
        yield
        return
    import torch

    if not torch.cuda.is_available():
        yield
        return
    exclusive = request.node.get_closest_marker("gpu_exclusive") is not None
    with open(_gpu_lock_path(), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)
