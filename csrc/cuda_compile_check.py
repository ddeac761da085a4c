"""Compile the CUDA build of the extension into a temporary directory and import it.

CI has no GPU; this proves that csrc/ compiles and links against the installed torch for the
architectures in TORCH_CUDA_ARCH_LIST (default: build.DEFAULT_CUDA_ARCH_LIST, with +PTX). Needs CUDA_HOME pointing at a toolkit
whose major version matches torch.version.cuda (``make cuda-compile-check`` sets one up).
"""
from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path


def _load_build_config():
    spec = importlib.util.spec_from_file_location("dino_msda_build", Path(__file__).with_name("build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    build = _load_build_config()
    arch_list = build.ensure_cuda_arch_list()
    from torch.utils import cpp_extension  # reads CUDA_HOME at import

    if cpp_extension.CUDA_HOME is None:
        print("cuda-compile-check: no CUDA toolkit found; set CUDA_HOME", file=sys.stderr)
        return 2
    flags = build.compile_args(with_cuda=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dino_msda_cuda_") as build_dir:
        module = cpp_extension.load(
            name="dino_msda_cuda_compile_check",
            sources=build.sources(with_cuda=True),
            extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags["nvcc"],
            extra_ldflags=build.link_args(),
            extra_include_paths=[str(build.CSRC_DIR)],
            build_directory=build_dir,
            with_cuda=True,
            verbose="-v" in sys.argv,
        )
        if not module.with_cuda:
            print("cuda-compile-check: the module was built without its CUDA kernels", file=sys.stderr)
            return 1
    print(f"cuda-compile-check: CUDA extension compiled for TORCH_CUDA_ARCH_LIST={arch_list} "
          f"with {cpp_extension.CUDA_HOME} in {time.perf_counter() - started:.0f} s and imported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
