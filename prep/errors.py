"""``PrepError``: bad input to ``prep`` (a file, a format, an option). The CLI prints its message as one line."""

from __future__ import annotations

__all__ = ["PrepError"]


class PrepError(ValueError):
    """User-facing error: the message names the bad value, what was expected, and the fix."""
