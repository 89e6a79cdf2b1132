"""What every tool must respect: no sys.path edits, nothing from tests/, no private product names, a small folder."""

from __future__ import annotations

import ast

import pytest

from .tooling import TOOLS

SCRIPTS = sorted(TOOLS.glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_imports_are_public_and_paths_untouched(path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    product_aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("tests"), f"{path.name} imports {alias.name}"
                if alias.name.startswith("padless."):
                    assert not any(p.startswith("_") for p in alias.name.split(".")), f"{path.name}: {alias.name}"
                    product_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert not module.startswith("tests") and node.level == 0, f"{path.name} imports from {module!r}"
            if module.startswith("padless"):
                names = [*module.split("."), *(a.name for a in node.names)]
                assert not any(n.startswith("_") for n in names), f"{path.name}: from {module} import {names}"
                product_aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id in product_aliases:
                assert not node.attr.startswith("_"), f"{path.name} uses {base.id}.{node.attr}"
            if isinstance(base, ast.Name) and base.id == "sys":
                assert node.attr != "path", f"{path.name} touches sys.path"


def test_tools_stay_small() -> None:
    lines = sum(len(p.read_text().splitlines()) for p in TOOLS.iterdir() if p.is_file())
    assert lines < 2500, f"tools/ holds {lines} lines; the folder is for tools, not lab notebooks"
