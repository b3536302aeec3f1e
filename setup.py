"""Thin driver: CMakeLists.txt is the one description of the native build.

The extension is built against the torch that is already installed, so install with
``pip install --no-build-isolation .`` (or ``-e .``).

Environment knobs:
  NETMERGE_SKIP_EXTENSION=1   install the pure-Python package only (torch backend)
  NETMERGE_WITH_CUDA=0|1      force the CUDA sources off/on (default: on when torch has CUDA and nvcc is found)
  NETMERGE_CPU_ISAS=...       instruction sets compiled besides the baseline, chosen at run time by CPUID
                              (default "avx2;avx512"; "" for a quicker baseline-only build)
  NETMERGE_BUILD_TYPE=...     CMake build type (default Release)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _want_cuda() -> bool:
    forced = os.environ.get("NETMERGE_WITH_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and shutil.which("nvcc") is not None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch.utils

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A fixed build folder keeps rebuilds incremental, editable installs included.
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        config = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('NETMERGE_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DNETMERGE_OUTPUT_DIR={out_dir}",
            f"-DNETMERGE_WITH_CUDA={'ON' if _want_cuda() else 'OFF'}",
            f"-DNETMERGE_CPU_ISAS={os.environ.get('NETMERGE_CPU_ISAS', 'avx2;avx512')}",
        ]
        subprocess.run(config, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


ext_modules = [] if os.environ.get("NETMERGE_SKIP_EXTENSION") == "1" else [CMakeExtension("netmerge_fast._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
