"""Checks shared by the command-line tests: a user error is one ``error: ...`` line on stderr and exit status 2."""

from __future__ import annotations

import re
import subprocess
from typing import Any

__all__ = ["assert_one_line_error", "assert_one_line_error_in_process"]


def assert_one_line_error(result: Any, match: str) -> str:
    """A ``click.testing.Result`` of a failed command: exit 2, no traceback, exactly one ``error:`` line on stderr,
    which matches the regex ``match``; returns that line.

    Other stderr lines may come from third-party imports inside the test process (e.g. bitsandbytes' notices), so
    this counts the ``error:`` lines; :func:`assert_one_line_error_in_process` checks a whole stderr."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert re.search(match, lines[0]), (match, lines[0])
    return lines[0]


def assert_one_line_error_in_process(proc: subprocess.CompletedProcess, match: str) -> str:
    """A finished subprocess: exit 2, and its whole stderr is one ``error:`` line matching ``match``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert re.search(match, lines[0]), (match, lines[0])
    return lines[0]
