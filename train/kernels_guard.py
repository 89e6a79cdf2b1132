"""Make sure ``import kernels`` gives padless's kernels, never Hugging Face's package of the same name.

Hugging Face ships an unrelated PyPI package that is also imported as ``kernels``. If it is installed over ours
(or earlier on ``sys.path``), ``kernels.rope`` and friends would be missing or, worse, something else. Every
train-side import of our kernels goes through :func:`require_padless_kernels`, which fails loudly with the file
it found and the fix.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["KernelsShadowedError", "require_padless_kernels"]


class KernelsShadowedError(ImportError):
    """``import kernels`` resolved to a package that is not padless's."""


def require_padless_kernels() -> ModuleType:
    """Import and return padless's top-level ``kernels`` package, or raise :class:`KernelsShadowedError`."""
    try:
        module = importlib.import_module("kernels")
    except ImportError as error:
        raise KernelsShadowedError(
            f"cannot import padless's 'kernels' package ({error}). Reinstall padless: pip install -e ."
        ) from error
    if getattr(module, "__padless__", False) is not True:
        location = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))
        raise KernelsShadowedError(
            f"'import kernels' found a package at {location} that is not padless's (it has no __padless__ "
            "marker; most likely Hugging Face's unrelated 'kernels' package shadows ours). Fix: "
            "'pip uninstall kernels' and reinstall padless ('pip install -e .'), or run from the padless "
            "checkout so that its kernels/ comes first on sys.path."
        )
    return module
