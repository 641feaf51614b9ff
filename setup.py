"""Build of ``ippo`` with its compiled extension ``ippo._C`` (pybind11 + CMake, never torch).

    pip install --no-build-isolation -e .        # editable, with the extension built in place

Environment knobs (all optional):

* ``IPPO_CUDA=0``             build CPU-only even when nvcc is present (default: CUDA when nvcc is found)
* ``IPPO_CUDA_ARCHS="80;90"`` CUDA architectures (default ``80;90``; ``native`` fails without a GPU)
* ``IPPO_BUILD_TYPE=Release`` CMake build type (Release, RelWithDebInfo, Debug)
* ``IPPO_BUILD_JOBS=N``       parallel compile jobs (default: ``os.cpu_count()``)
* ``IPPO_SKIP_EXT=1``         skip the extension entirely (pure-Python install; the torch backend still works)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _cmake_executable() -> str:
    """cmake from the PATH, else the one shipped by the ``cmake`` PyPI package."""
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:
        import cmake  # type: ignore[import-not-found]

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError as e:  # pragma: no cover - build-system requires lists cmake
        raise RuntimeError("cmake not found: pip install cmake") from e


def _pybind11_cmakedir() -> str:
    import pybind11

    return pybind11.get_cmake_dir()


def _nvcc() -> str | None:
    exe = shutil.which("nvcc")
    if exe:
        return exe
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("IPPO_BUILD_TYPE", "Release")
        want_cuda = os.environ.get("IPPO_CUDA", "1").strip().lower() not in ("0", "off", "false", "no")
        nvcc = _nvcc() if want_cuda else None
        archs = os.environ.get("IPPO_CUDA_ARCHS", "80;90")
        jobs = os.environ.get("IPPO_BUILD_JOBS") or str(os.cpu_count() or 1)

        tag = f"{'cuda' if nvcc else 'cpu'}-{build_type}"
        if getattr(self, "editable_mode", False) or self.inplace:
            build_temp = ROOT / "build" / f"cmake-{tag}"  # persistent: incremental rebuilds
        else:
            build_temp = Path(self.build_temp).resolve() / tag
        build_temp.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DIPPO_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_pybind11_cmakedir()}",
            f"-DIPPO_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DIPPO_CUDA_ARCHS={archs}",
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        cmake = _cmake_executable()
        print(f"ippo: cmake configure ({build_type}, CUDA={'on: ' + nvcc if nvcc else 'off'})", flush=True)
        subprocess.run([cmake, "-S", ext.sourcedir, "-B", str(build_temp), *args], check=True)
        subprocess.run(
            [cmake, "--build", str(build_temp), "--config", build_type, "--parallel", jobs], check=True
        )


ext_modules = [] if os.environ.get("IPPO_SKIP_EXT") == "1" else [CMakeExtension("ippo._C")]

# The Triton kernels live in kernels/ippo_kernels/ and are installed as the subpackage ippo.kernels.
# kernels/ itself is a plain folder (no __init__.py): a top-level package named `kernels` would shadow
# Hugging Face's `kernels` (imported by transformers) whenever the repository root is on sys.path.
KERNELS_DIR = "kernels/ippo_kernels"
packages = find_packages(include=["ippo", "ippo.*"])
package_dir = {"ippo": "ippo"}
if (ROOT / KERNELS_DIR).is_dir():
    packages.append("ippo.kernels")
    package_dir["ippo.kernels"] = KERNELS_DIR
    for sub in find_packages(where=KERNELS_DIR):
        packages.append(f"ippo.kernels.{sub}")
        package_dir[f"ippo.kernels.{sub}"] = f"{KERNELS_DIR}/" + sub.replace(".", "/")

setup(
    packages=packages,
    package_dir=package_dir,
    # the bundled task model, tokenizer and GSM8K sample ship inside the package (no hub at run time)
    package_data={"ippo": ["assets/*.jsonl", "assets/GSM8K_LICENSE", "assets/tiny_arith/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
