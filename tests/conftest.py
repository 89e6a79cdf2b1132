"""Shared pytest set-up: Triton's interpreter on CPU-only machines, the ``gpu`` marker, and the GPU's sharing
between pytest-xdist workers.

A ``gpu_exclusive`` test (one that needs most of the card: tens of GiB in one piece) runs with no other GPU test in
progress in any worker: every GPU test (marked ``gpu`` or ``gpu_exclusive``) holds a shared lock on one file while it
runs (set-up, call and teardown: its fixtures' tensors are gone before the lock is) and returns its cached memory
to the driver before letting go; an exclusive test holds the lock alone. Tests without these markers take no lock.
``xdist_group`` cannot give this: it only orders the tests of one group inside one worker while the other workers
keep their own tensors on the card.
"""

from __future__ import annotations

import fcntl
import gc
import os
import re
import sys
import tempfile
from collections.abc import Generator
from pathlib import Path

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        # Triton kernels run on the CPU through the interpreter; must be set before triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    for item in items:
        if item.get_closest_marker("gpu_exclusive") is not None and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.gpu)  # exclusive implies gpu: selected by -m gpu, skipped without CUDA
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


# Set while this process (or its parent, for a pytest run inside a test) holds the lock: nested runs take none.
_LOCK_HELD = "PADLESS_GPU_TEST_LOCK_HELD"


def _gpu_lock_paths() -> tuple[Path, Path]:
    """(gate, lock) files per user and CUDA_VISIBLE_DEVICES string: the pytest processes that share these cards.

    The key is the environment string, not the physical cards ("0,1" and "1,0" get different files)."""
    devices = re.sub(r"[^\w-]", "_", os.environ.get("CUDA_VISIBLE_DEVICES", "all")) or "none"
    stem = f"padless-gpu-tests-{os.getuid()}-{devices}"
    return Path(tempfile.gettempdir(), f"{stem}.gate"), Path(tempfile.gettempdir(), f"{stem}.lock")


def _release_failed_test_frames() -> None:
    """Drop the last failure's traceback (pytest keeps it in sys.last_* until the next test) and collect, so the
    tensors of a failed test are freed before its cached memory is returned."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        sys.__dict__.pop(name, None)
    gc.collect()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Hold the GPU lock (shared, or alone for ``gpu_exclusive``) around the whole test, then return its cached
    memory.

    Every request passes the gate first: an exclusive test waits for the lock holding the gate, so no new shared
    holder slips in ahead of it (flock alone lets readers starve a waiting writer).
    """
    if item.get_closest_marker("gpu") is None or os.environ.get(_LOCK_HELD):  # collection marked gpu_exclusive
        return (yield)
    import torch

    if not torch.cuda.is_available():
        return (yield)
    gate_path, lock_path = _gpu_lock_paths()
    exclusive = item.get_closest_marker("gpu_exclusive") is not None
    with open(gate_path, "a+") as gate, open(lock_path, "a+") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        os.environ[_LOCK_HELD] = "1"
        try:
            return (yield)
        finally:
            try:
                del os.environ[_LOCK_HELD]
                _release_failed_test_frames()
                if torch.cuda.is_initialized():
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
