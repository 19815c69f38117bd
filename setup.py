"""Build zokern's C++ extension, zokern._C.

The C++ CPU kernels are always built; the CUDA kernels too when torch has CUDA and nvcc is found. The extension is
optional: if it cannot be built, the install still succeeds, says why, and zokern runs on its other backends
(``zokern.available_backends()`` lists them). Environment toggles:

- ZOKERN_SKIP_BUILD=1        build no extension at all (pure-Python install: torch and Triton backends);
- ZOKERN_SKIP_CUDA_BUILD=1   build the C++ CPU kernels only, even where CUDA is available;
- ZOKERN_REQUIRE_BUILD=1     fail the install if the extension does not build (CI uses this);
- MAX_JOBS, TORCH_CUDA_ARCH_LIST: as for any torch extension.
"""

import os
import sys

from setuptools import find_packages
from setuptools import setup

PACKAGES = ["zokern", *(f"zokern.{name}" for name in find_packages("zokern")), "zokern.kernels"]
# The Triton sources live in kernels/ but install as zokern.kernels: PyPI already has a top-level `kernels`.
PACKAGE_DIR = {"zokern": "zokern", "zokern.kernels": "kernels"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "") == "1"


def _extension_setup() -> dict:
    if _flag("ZOKERN_SKIP_BUILD"):
        print("zokern: ZOKERN_SKIP_BUILD=1, building no C++ extension")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
        from torch.utils.cpp_extension import BuildExtension
        from torch.utils.cpp_extension import CppExtension
        from torch.utils.cpp_extension import CUDAExtension
    except ImportError as e:
        print(
            f"zokern: torch is not importable at build time ({e}); building no C++ extension. "
            "Install torch first and build with --no-build-isolation."
        )
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile skips the extension (with the reason) instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compiler failure degrades to the Python backends
                if _flag("ZOKERN_REQUIRE_BUILD"):
                    raise
                print(
                    f"zokern: WARNING: building {ext.name} failed ({e}); zokern will use its torch/triton "
                    "backends. Set ZOKERN_REQUIRE_BUILD=1 to make this an error."
                )

    include = [os.path.abspath("csrc/include")]
    # No FMA contraction: the fused pass is specified as separately rounded float32 operations (docs/stream.md).
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off"]
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP in such torch builds: without -fopenmp the CPU kernels run on one thread.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = [f"csrc/cpu/{name}.cpp" for name in ("zo_pass", "copy_pass", "ldsd_pass", "zopro_pass", "sketch")]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("ZOKERN_SKIP_CUDA_BUILD")
    if torch.version.cuda is not None and CUDA_HOME is None:
        print("zokern: torch has CUDA but nvcc was not found (set CUDA_HOME); building the CPU kernels only")
    if with_cuda:
        sources += ["csrc/cuda/zo_pass.cu", "csrc/cuda/bindings.cpp"]
        ext = CUDAExtension(
            "zokern._C",
            sources,
            include_dirs=include,
            define_macros=[("ZOKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "zokern._C",
            sources,
            include_dirs=include,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, **_extension_setup())
