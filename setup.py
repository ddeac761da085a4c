"""Build hook for the optional MSDeformAttn extension (see csrc/ and README "Kernels").

All metadata lives in pyproject.toml; this file only adds the compiled extension ``dino_core._C``
when it can be built. The install never fails because of it: without torch at build time, or when
compiling fails, the package installs without the extension and the PyTorch reference is used.

Environment:
    FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible (needs nvcc / CUDA_HOME)
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default "7.5;8.0;9.0+PTX", csrc/build.py)
    DINO_BUILD_EXT=0        skip the extension entirely
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _warn(message: str) -> None:
    print(f"dino-platform setup: {message}", file=sys.stderr)


def _load_build_config():
    spec = importlib.util.spec_from_file_location("dino_msda_build", ROOT / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_options() -> dict:
    if os.environ.get("DINO_BUILD_EXT", "1") == "0":
        _warn("DINO_BUILD_EXT=0: installing without the MSDeformAttn extension")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch absent (e.g. build isolation): pure-Python install
        _warn(f"torch is not importable at build time ({exc}); installing without the MSDeformAttn extension")
        return {}

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = (force_cuda or torch.cuda.is_available()) and cpp_extension.CUDA_HOME is not None
    if force_cuda and not with_cuda:
        _warn("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME); building the CPU kernel only")

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Reports a failed compile and carries on, so the install still succeeds."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                _warn(f"building the MSDeformAttn extension failed ({exc}); the PyTorch reference will be used")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                _warn(f"building {ext.name} failed ({exc}); the PyTorch reference will be used")

    extension = _load_build_config().make_extension(cpp_extension, with_cuda, ROOT)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_extension_options())
