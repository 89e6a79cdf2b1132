"""The dependency direction ``prep -> shards <- train -> kernels``, read statically from every module, and the
installed package: light ``prep`` start-up, and no clash with a user's ``train.py`` / ``kernels/`` or with Hugging
Face's ``kernels`` package (which transformers may import).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("prep", "shards", "train", "kernels")
# What each package may import of ours (besides itself).
ALLOWED = {"prep": {"shards"}, "shards": set(), "train": {"shards", "kernels"}, "kernels": set()}
HEAVY = ("torch", "transformers", "triton", "peft")
LIGHT_PACKAGES = ("prep", "shards")  # never import HEAVY, not even inside a function
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Import:
    file: str
    line: int
    module: str  # absolute dotted name ("padless.shards.reader", "torch.nn", "kernels.rope")
    absolute: bool  # written without a leading dot


def imports_of(path: Path, package: str, root: Path = REPO) -> list[Import]:
    """Every import statement of ``path`` (a module of ``padless.<package>``), with relative names resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = str(path.relative_to(root))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, alias.name, True) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append(Import(rel, node.lineno, node.module or "", True))
                continue
            base = ["padless", package][: 3 - node.level]  # level 1: padless.<package>; level 2: padless
            target = ".".join([*base, *([node.module] if node.module else [])])
            names = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
            found += [Import(rel, node.lineno, name, False) for name in names]
    return found


def violations(root: Path = REPO) -> list[str]:
    """Every import against the layering rules (see the module doc), as ``file:line: why``."""
    problems = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for imp in imports_of(path, package, root):
                top, parts = imp.module.split(".")[0], imp.module.split(".")
                where = f"{imp.file}:{imp.line}: import {imp.module}"
                if imp.absolute and top in PACKAGES:
                    problems.append(f"{where}: a bare top-level name; write padless.{imp.module} or a relative import")
                    continue
                if top == "padless" and len(parts) > 1:
                    other = parts[1]
                    if other != package and other not in ALLOWED[package]:
                        problems.append(f"{where}: {package} may import only {sorted(ALLOWED[package]) or 'nothing'}")
                if package in LIGHT_PACKAGES and top in HEAVY:
                    problems.append(f"{where}: {package} never imports {', '.join(HEAVY)}")
    return problems


def test_every_module_follows_the_dependency_direction() -> None:
    problems = violations()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("package", "source", "why"),
    [
        ("shards", "from padless.train.config import TrainError\n", "shards may import only nothing"),
        ("prep", "def f():\n    from padless.kernels import rope\n", "prep may import only ['shards']"),
        ("prep", "def f():\n    import torch\n", "prep never imports torch"),
        ("shards", "import transformers.models\n", "shards never imports torch"),
        ("train", "from padless.prep.pipeline import run_pack\n", "train may import only ['kernels', 'shards']"),
        ("kernels", "from ..shards import reader\n", "kernels may import only nothing"),
        ("train", "import kernels.rope\n", "a bare top-level name"),
        ("train", "from shards.reader import open_shards\n", "a bare top-level name"),
    ],
)
def test_the_check_catches_each_kind_of_violation(tmp_path: Path, package: str, source: str, why: str) -> None:
    for name in PACKAGES:
        (tmp_path / name).mkdir()
    (tmp_path / package / "bad.py").write_text(source)
    found = [p for p in violations(tmp_path) if f"{package}/bad.py" in p]
    assert len(found) == 1 and why in found[0], found


def test_relative_imports_resolve_to_their_package(tmp_path: Path) -> None:
    for name in PACKAGES:
        (tmp_path / name).mkdir()
    (tmp_path / "train" / "ok.py").write_text("from . import config\nfrom .config import X\nfrom ..shards import a\n")
    (tmp_path / "prep" / "ok.py").write_text("import numpy\nfrom padless.shards.cli_config import option\n")
    assert violations(tmp_path) == []


def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env, **kw)


def test_prep_cli_and_help_load_no_torch_or_transformers(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        import padless.prep.cli as cli
        for args in (["--help"], ["pack", "--help"], ["stats", "--help"]):
            try:
                cli.main(args)
            except SystemExit as e:
                assert e.code == 0, (args, e.code)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "triton", "peft"))
        print("HEAVY", heavy)
        """
    )
    proc = _run([sys.executable, "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_installed_commands_ignore_a_users_train_py_and_kernels_folder(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    (tmp_path / "prep.py").write_text("raise SystemExit('the user prep.py was imported')\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("raise ImportError('the user kernels/ folder was imported')\n")
    for command in ("train", "prep"):
        proc = _run([str(BIN / command), "--help"], tmp_path)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, (command, proc.stdout, proc.stderr)
    proc = _run([str(BIN / "train"), "run", "--help"], tmp_path)
    assert proc.returncode == 0 and "--tokens-per-micro-batch" in proc.stdout, proc.stderr
    # `python -m` puts the working directory on sys.path; the module drops it before transformers is imported
    # (train plan builds a model on the meta device, which imports transformers' kernel integration).
    shards = tmp_path / "shards"
    proc = _run([sys.executable, "-m", "padless.prep", "pack", "demo:alpaca", "--max-len", "128", "--out",
                 str(shards)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _run([sys.executable, "-m", "padless.train", "plan", str(shards), "--modes", "lora", "--checkpointing",
                 "on", "--tokens", "1024"], tmp_path)  # fmt: skip
    assert proc.returncode == 0 and "lora" in proc.stdout, proc.stderr[-2000:]


def test_transformers_and_hugging_faces_kernels_are_not_shadowed(tmp_path: Path) -> None:
    """``import kernels`` is Hugging Face's package (or absent), never our kernels/ folder; transformers loads."""
    code = textwrap.dedent(
        """
        import importlib
        import importlib.util

        from transformers import AutoModelForCausalLM

        import padless.kernels.rope
        import padless.train.modeling

        spec = importlib.util.find_spec("kernels")
        print("KERNELS", [] if spec is None else [spec.origin, *(spec.submodule_search_locations or [])])
        for name in ("padless.train", "padless.kernels", "padless.prep", "padless.shards"):
            print("PACKAGE", name, list(importlib.import_module(name).__path__))
        """
    )
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    proc = _run([sys.executable, "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    places = ast.literal_eval(proc.stdout.split("KERNELS ", 1)[1].splitlines()[0])
    ours = str(REPO / "kernels")
    assert not any(str(p).startswith(ours) for p in places), f"`import kernels` finds our folder: {places}"
    if places:  # Hugging Face's package, installed: a regular package in site-packages
        assert places[0] and ("site-packages" in places[0] or "dist-packages" in places[0]), places
    for line in proc.stdout.splitlines():
        if line.startswith("PACKAGE padless.kernels"):
            assert ours in line, line  # our kernels are reachable, under their padless name only
