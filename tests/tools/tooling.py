"""Helpers for the tools' tests: tools are scripts, not a package, so they are loaded from their files or run as
subprocesses (never through ``sys.path``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py``; the harness is registered under the name the scripts import it by."""
    for module in ("bench_harness", name):
        if module not in sys.modules:
            spec = importlib.util.spec_from_file_location(module, TOOLS / f"{module}.py")
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[module] = loaded
            spec.loader.exec_module(loaded)
    return sys.modules[name]


def run_tool(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python tools/<name>.py ARGS`` from the repository root; the output is captured as text."""
    cmd = [sys.executable, str(TOOLS / f"{name}.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
