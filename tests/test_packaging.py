"""The repository must not shadow its dependencies' import names.

``python -m pytest``, ``python -m ippo.cli`` and ``torchrun -m ...`` put the working directory on
``sys.path`` ahead of site-packages, so any top-level package or module of this repository whose name a
dependency also uses is imported instead of the dependency. transformers 5.x imports Hugging Face's
``kernels`` at start-up, which a top-level ``kernels/__init__.py`` of ours once shadowed (issue 19).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _regular_top_level_names(root: Path) -> dict[str, Path]:
    """Names importable from ``root`` that win over site-packages: packages with an ``__init__.py``
    and ``.py`` modules. (A folder without ``__init__.py`` is only a namespace portion: Python keeps
    searching the path and a dependency's regular package of the same name wins.)"""
    names = {}
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.name == "setup.py":
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names[entry.name] = entry
        elif entry.is_file() and entry.suffix == ".py":
            names[entry.stem] = entry
    return names


def test_no_top_level_package_shares_a_dependency_import_name():
    owners = md.packages_distributions()  # top-level import name -> distributions providing it
    ours = _regular_top_level_names(ROOT)
    clashes = {
        name: sorted(set(owners[name]) - {"ippo"})
        for name in ours
        if name in owners and set(owners[name]) - {"ippo"}
    }
    assert not clashes, (
        f"top-level packages of the repository shadow installed distributions: {clashes}; "
        "rename them (see README, 'Layout')"
    )


def test_the_triton_kernels_folder_is_not_a_top_level_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes `import kernels` from the repository root find this folder instead of "
        "Hugging Face's `kernels`, which transformers imports"
    )
    import ippo.kernels

    assert Path(ippo.kernels.__file__).parent.name == "ippo_kernels"


def _transformers_requires_kernels() -> bool:
    reqs = md.requires("transformers") or []
    return any(r.split(";")[0].strip().startswith("kernels") and "extra ==" not in r for r in reqs)


def test_transformers_imports_from_the_repository_root():
    """The exact failure of issue 19: with Hugging Face's ``kernels`` installed, importing a transformers
    model with the repository root as working directory (as ``python -m pytest`` does)."""
    try:
        md.distribution("kernels")
    except md.PackageNotFoundError:
        if _transformers_requires_kernels():
            pytest.fail("transformers requires Hugging Face's `kernels` but it is not installed")
        pytest.skip("Hugging Face's `kernels` is not installed (this transformers does not require it)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, ''); import transformers.models.llama.modeling_llama"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
