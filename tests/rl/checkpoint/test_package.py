"""The package's layering: each module imports only the modules listed before it in ``LAYERS`` (so none
can form a cycle, however the package grows), and the package re-exports its API. Cycles, private names
and imports of ``ippo`` itself are checked for the whole package by tests/test_layout.py."""

from __future__ import annotations

import ast
from pathlib import Path

import ippo.rl.checkpoint as ck

PACKAGE = Path(ck.__file__).parent
LAYERS = ["layout", "files", "manifest", "whole", "sharded", "restore"]  # each may import those before it


def test_each_module_imports_only_the_layers_before_it():
    assert sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__") == sorted(LAYERS)
    for i, module in enumerate(LAYERS):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in LAYERS[:i], f"{module} imports .{node.module}"


def test_every_exported_name_resolves():
    assert all(hasattr(ck, name) for name in ck.__all__)
