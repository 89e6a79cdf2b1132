"""Our top-level ``kernels`` package vs Hugging Face's unrelated PyPI package of the same import name.

transformers probes ``kernels`` (``is_kernels_available``: find_spec, then a version that must lie in
[KERNELS_MIN_VERSION, KERNELS_MAX_VERSION)) before importing ``get_kernel`` & co from it; bitsandbytes does
``from kernels import get_kernel`` inside try/except on some CPU/MPS paths. These tests prove that with our
package importable neither library mistakes it for theirs, that the trainer's guard refuses a foreign
``kernels`` first on sys.path, and that importing ours stays light. Subprocesses give each check a clean
interpreter (transformers caches its probe with lru_cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, *, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "USE_HUB_KERNELS")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _json_out(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    """One fresh interpreter (imports are slow on CI): import ours, then transformers' and bitsandbytes' probes."""
    result = _run(
        """
        import json, sys
        import kernels
        out = {"padless": kernels.__padless__, "file": kernels.__file__,
               "heavy": sorted(m for m in ("torch", "triton", "numpy") if m in sys.modules)}
        # bitsandbytes' CPU/MPS backends: ``from kernels import get_kernel`` in try/except, fall back on failure.
        try:
            from kernels import get_kernel
            out["get_kernel"] = "imported"
        except ImportError as error:
            out["get_kernel"] = type(error).__name__
        from transformers.utils import import_utils as iu
        out["available"] = iu.is_kernels_available()
        out["version"] = iu._is_package_available("kernels", return_version=True)[1]
        out["bounds"] = [getattr(iu, "KERNELS_MIN_VERSION", None), getattr(iu, "KERNELS_MAX_VERSION", None)]
        import transformers.integrations.hub_kernels  # does 'from kernels import ...' only when available
        out["api_names"] = [n for n in ("get_kernel", "kernelize", "LayerRepository", "use_kernel_forward_from_hub")
                            if hasattr(kernels, n)]
        out["kernels_after"] = getattr(sys.modules.get("kernels"), "__padless__", None)
        print(json.dumps(out))
        """,
        cwd=tmp_path_factory.mktemp("probe"),
    )
    return _json_out(result)


def test_our_kernels_package_imports_nothing_heavy(probe):
    assert probe["padless"] is True
    assert Path(probe["file"]).resolve() == REPO / "kernels" / "__init__.py"
    assert probe["heavy"] == [], f"import kernels pulled in {probe['heavy']}"


def test_transformers_does_not_take_our_package_for_hf_kernels(probe):
    from packaging.version import Version

    assert probe["available"] is False, f"transformers thinks HF kernels are available (version {probe['version']})"
    # Whatever version transformers reads for 'kernels' (our distribution's, or our __version__), it must lie
    # outside its accepted range, so it never imports get_kernel & co from us.
    low, high = probe["bounds"]
    if probe["version"] != "N/A" and low is not None:
        assert not (Version(low) <= Version(probe["version"]) < Version(high or "99999")), probe
    assert probe["api_names"] == [], "our kernels package must not expose HF kernels' API names"
    assert probe["kernels_after"] is True, "after importing transformers, 'kernels' must still be ours"


def test_our_version_is_below_any_hf_kernels_range():
    from packaging.version import Version

    import kernels

    # HF's kernels started at 0.1; transformers requires >= 0.18 today. Ours must stay below all of them.
    assert Version(kernels.__version__) < Version("0.1")


def test_bitsandbytes_style_probe_fails_closed(probe):
    # With our package first, bitsandbytes' ``from kernels import get_kernel`` is an ImportError (it then falls
    # back to its own path, as it does when no kernels package is installed), never a call into our code.
    # (Importing bitsandbytes itself is not repeated here: ~15 s on CI for a probe this line already covers.)
    assert probe["get_kernel"] == "ImportError"


def test_guard_rejects_a_foreign_kernels_package_first_on_sys_path(tmp_path):
    fake = tmp_path / "fake_site"
    (fake / "kernels").mkdir(parents=True)
    foreign = '__version__ = "0.18.2"\n\n\ndef get_kernel(*args, **kwargs):\n    pass\n'
    (fake / "kernels" / "__init__.py").write_text(foreign)
    work = tmp_path / "cwd"
    work.mkdir()
    result = _run(
        """
        import json
        from train.kernels_guard import KernelsShadowedError, require_padless_kernels
        try:
            require_padless_kernels()
            print(json.dumps({"raised": None}))
        except KernelsShadowedError as error:
            print(json.dumps({"raised": str(error)}))
        """,
        cwd=work,
        pythonpath=str(fake),
    )
    out = _json_out(result)
    assert out["raised"] is not None, "the guard accepted a foreign kernels package"
    assert "not padless's" in out["raised"] and str(fake / "kernels") in out["raised"]
    assert "pip uninstall kernels" in out["raised"]


def test_guard_accepts_our_package():
    from train.kernels_guard import require_padless_kernels

    assert Path(require_padless_kernels().__file__).resolve() == REPO / "kernels" / "__init__.py"
