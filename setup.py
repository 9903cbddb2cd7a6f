"""Optional native extensions of fastirl (metadata lives in pyproject.toml).

* ``fastirl._C``: the C++ CPU epilogues and the op schemas (csrc/iq_cpu.cpp),
  built when torch is importable at build time and a C++ compiler works;
* ``fastirl._C_cuda``: the CUDA epilogues (csrc/iq_cuda.cu), built only with a
  CUDA-enabled torch and nvcc, when a GPU is visible or FASTIRL_BUILD_CUDA=1
  (FASTIRL_BUILD_CUDA=0 never builds it), for TORCH_CUDA_ARCH_LIST, by default
  "8.0;9.0+PTX" (Ampere and Hopper code, plus PTX that newer GPUs such as
  sm_100 / sm_120 compile at load time).

Beside each built module a ``<module file>.json`` records the torch version and
CUDA architectures it was built for; fastirl checks it before importing the
module and compiles from source instead when torch differs or no kernel image
fits the GPU (fastirl.backends.native_build.prebuilt_problem).

Both are optional: without them (or with FASTIRL_BUILD_EXT=0) the package is
pure Python, and the "cpu" / "cuda" backends compile the same sources on first
use from a source checkout (torch.utils.cpp_extension.load, ninja), else
backend="auto" uses the PyTorch backend.  torch must be importable for the
build itself, i.e. ``pip install --no-build-isolation -e .`` with torch already
installed; an isolated build (plain ``pip install -e .``) skips the extension.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

from setuptools import setup

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _compiler_flags() -> dict:
    """CXX_FLAGS and NVCC_FLAGS as fastirl/backends/native_build.py declares them
    for the JIT build (read, not imported: importing the package needs more
    than the build has)."""
    src = Path(__file__).resolve().parent / "fastirl" / "backends" / "native_build.py"
    return {t.id: ast.literal_eval(node.value)
            for node in ast.parse(src.read_text()).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)
            and t.id in ("CXX_FLAGS", "NVCC_FLAGS")}


_FLAGS = _compiler_flags()
CXX_FLAGS, NVCC_FLAGS = _FLAGS["CXX_FLAGS"], _FLAGS["NVCC_FLAGS"]


def _want_cuda(torch) -> bool:
    flag = os.environ.get("FASTIRL_BUILD_CUDA")
    if flag == "0" or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return False
    return flag == "1" or torch.cuda.is_available()


def _extensions():
    if os.environ.get("FASTIRL_BUILD_EXT") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastirl: torch is not importable at build time; skipping the native extension "
              "(it is compiled on first use instead)", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import include_paths
    # torch's headers as system headers: -Wall -Wextra then warn about ours only
    # (GCC ignores a -I for a directory that is also given with -isystem).
    quiet = [f for p in include_paths() for f in ("-isystem", p)]
    macros = [("FASTIRL_PYMODULE", None)]
    exts = [CppExtension("fastirl._C", ["csrc/iq_cpu.cpp"], include_dirs=["csrc"],
                         define_macros=macros, extra_compile_args={"cxx": CXX_FLAGS + quiet},
                         extra_link_args=["-fopenmp"], optional=True)]
    if _want_cuda(torch):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        exts.append(CUDAExtension("fastirl._C_cuda", ["csrc/iq_cuda.cu"], include_dirs=["csrc"],
                                  define_macros=macros,
                                  extra_compile_args={"cxx": ["-O3", "-Wall", "-Wextra"] + quiet,
                                                      "nvcc": NVCC_FLAGS},
                                  optional=True))
    class OptionalBuildExtension(BuildExtension):
        """A failed build of an optional extension is a warning, not an error
        (torch's ninja path raises errors that setuptools' `optional` misses)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                if not getattr(ext, "optional", False):
                    raise
                print(f"fastirl: building {ext.name} failed ({exc}); the package works "
                      f"without it (compiled on first use instead)", file=sys.stderr)
                return
            cuda = ext.name.endswith("_cuda")
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
            info = {"torch": torch.__version__,
                    "cuda_archs": [a for a in archs.replace(" ", ";").split(";") if a]
                    if cuda else []}
            with open(self.get_ext_fullpath(ext.name) + ".json", "w") as fh:
                json.dump(info, fh)

    return exts, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
