"""How to compile the MSDeformAttn extension; shared by setup.py, the JIT fallback and the CUDA check.

Kept free of project imports so setup.py can load it by path before anything is installed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

CSRC_DIR = Path(__file__).resolve().parent
# Turing (T4), Ampere (A100; its SASS also runs on sm_86/89) and Hopper, plus Hopper PTX that the
# driver JIT-compiles for newer GPUs (Blackwell sm_100/120). CUDA 13 no longer targets sm_70 (Volta).
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0+PTX"


def sources(with_cuda: bool, relative_to: Optional[Path] = None) -> List[str]:
    """Source files of the extension: absolute, or relative to ``relative_to`` (setup.py needs that)."""
    files = ["bindings.cpp", "ms_deform_attn_cpu.cpp"]
    if with_cuda:
        files.append("ms_deform_attn_cuda.cu")
    paths = [CSRC_DIR / name for name in files]
    if relative_to is not None:
        paths = [path.relative_to(relative_to) for path in paths]
    return [path.as_posix() for path in paths]


def compile_args(with_cuda: bool) -> Dict[str, List[str]]:
    """Compiler flags per compiler ("cxx" and, with CUDA, "nvcc")."""
    if sys.platform == "win32":
        cxx = ["/O2", "/openmp"]
    else:
        # -fopenmp: ATen's parallel_for is an inline OpenMP region, so without it the kernels run on
        # one thread. The extension binds to torch's own libgomp, which is loaded first.
        cxx = ["-O3", "-g0", "-fopenmp"]
    args = {"cxx": cxx + (["-DDINO_WITH_CUDA"] if with_cuda else [])}
    if with_cuda:
        args["nvcc"] = ["-O3", "-DDINO_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
    return args


def link_args() -> List[str]:
    return [] if sys.platform == "win32" else ["-fopenmp"]


def ensure_cuda_arch_list(for_visible_gpus: bool = False) -> str:
    """TORCH_CUDA_ARCH_LIST for the build: the caller's, else :data:`DEFAULT_CUDA_ARCH_LIST`.

    ``for_visible_gpus`` (the JIT build on a GPU machine): without the caller's list, leave it
    unset so torch compiles for the visible GPUs' architectures, plus PTX of the newest one.
    """
    if for_visible_gpus and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return "visible GPUs (+PTX)"
    return os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)


def make_extension(cpp_extension, with_cuda: bool, root: Path, name: str = "dino_core._C"):
    """A setuptools Extension built with ``torch.utils.cpp_extension`` (passed in by the caller).

    Paths are relative to ``root``, the directory of setup.py, as setuptools requires.
    """
    kwargs = dict(
        name=name,
        sources=sources(with_cuda, relative_to=root),
        include_dirs=[CSRC_DIR.relative_to(root).as_posix()],
        # Headers and this file: setuptools rebuilds the extension when any of them is newer.
        depends=[(CSRC_DIR / dep).relative_to(root).as_posix() for dep in ("ms_deform_attn.h", "build.py")],
        extra_compile_args=compile_args(with_cuda),
        extra_link_args=link_args(),
    )
    if with_cuda:
        ensure_cuda_arch_list()
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)
