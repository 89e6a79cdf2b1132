"""The ``harness`` fixture: the benchmark harness module, loaded from its file (see ``tooling``)."""

from __future__ import annotations

from types import ModuleType

import pytest

from .tooling import load_tool


@pytest.fixture
def harness() -> ModuleType:
    return load_tool("bench_harness")
