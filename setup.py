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
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages
from setuptools import setup

PACKAGES = ["zokern", *(f"zokern.{name}" for name in find_packages("zokern")), "zokern.kernels"]
# The Triton sources live in kernels/ but install as zokern.kernels: PyPI already has a top-level `kernels`.
PACKAGE_DIR = {"zokern": "zokern", "zokern.kernels": "kernels"}


# What differs between the CUDA extension and the CPU-only one (setuptools' Extension attributes).
CPU_EXTENSION_FIELDS = (
    "sources",
    "include_dirs",
    "define_macros",
    "libraries",
    "library_dirs",
    "runtime_library_dirs",
    "extra_compile_args",
    "extra_link_args",
    "language",
)


def _flag(name: str) -> bool:
    return os.environ.get(name, "") == "1"


def cuda_toolkit_behind_wrapper() -> str | None:
    """The CUDA toolkit that `nvcc` runs, where torch's guess of CUDA_HOME would miss its headers.

    Without CUDA_HOME, torch takes the folder above nvcc's folder on PATH. When that nvcc is a wrapper script (here,
    /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc), that folder has no cuda_runtime.h and the binding
    fails to compile; nvcc's dry run names the toolkit it belongs to. None: leave torch's choice alone.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None or (Path(nvcc).parent.parent / "include" / "cuda_runtime.h").exists():
        return None
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    if top is None:
        return None
    toolkit = Path(top.group(1).strip()).resolve()
    return str(toolkit) if (toolkit / "include" / "cuda_runtime.h").exists() else None


def _extension_setup() -> dict:
    if _flag("ZOKERN_SKIP_BUILD"):
        print("zokern: ZOKERN_SKIP_BUILD=1, building no C++ extension")
        return {}
    try:
        import torch

        if torch.version.cuda is not None and not _flag("ZOKERN_SKIP_CUDA_BUILD"):
            toolkit = cuda_toolkit_behind_wrapper()
            if toolkit is not None:  # before torch.utils.cpp_extension reads CUDA_HOME, at its import
                print(f"zokern: nvcc on PATH runs the CUDA toolkit in {toolkit}; building against it (CUDA_HOME)")
                os.environ["CUDA_HOME"] = toolkit
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

    include = [os.path.abspath("csrc/include")]
    # No FMA contraction: the fused pass is specified as separately rounded float32 operations (docs/stream.md).
    # No trapping math: nothing reads the floating-point exception flags, and with them GCC keeps the float16
    # conversions' selects as branches that AVX2 cannot vectorise (AVX-512 masks can): values are unchanged.
    # No -std: torch adds the standard its headers need (C++17 up to torch 2.12, C++20 from 2.13; zokern builds
    # with either).
    cxx = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP in such torch builds: without -fopenmp the CPU kernels run on one thread.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    cpu_sources = [f"csrc/cpu/{name}.cpp" for name in ("zo_pass", "copy_pass", "ldsd_pass", "zopro_pass", "sketch")]

    def cpu_extension():
        return CppExtension(
            "zokern._C",
            cpu_sources,
            include_dirs=list(include),  # torch appends its own paths to the list it is given
            extra_compile_args={"cxx": list(cxx)},
            extra_link_args=link,
        )

    def give_up(ext, error: Exception) -> None:
        print(
            f"zokern: WARNING: building {ext.name} failed ({error}); zokern will use its torch/triton backends. "
            "Set ZOKERN_REQUIRE_BUILD=1 to make this an error."
        )
        ext.optional = True  # else setuptools' editable install fails copying the missing library into the tree

    class OptionalBuildExtension(BuildExtension):
        """A failed CUDA build falls back to the C++ CPU kernels, and a failed CPU build to no extension, each with
        the reason, instead of failing the install (unless ZOKERN_REQUIRE_BUILD=1)."""

        def build_extensions(self):
            try:
                super().build_extensions()  # also where torch checks nvcc's CUDA version against its own
                return
            except Exception as e:  # noqa: BLE001 - any compiler failure degrades to the remaining backends
                if _flag("ZOKERN_REQUIRE_BUILD"):
                    raise
                (ext,) = self.extensions
                if not any(source.endswith(".cu") for source in ext.sources):
                    give_up(ext, e)
                    return
                print(f"zokern: WARNING: building the CUDA kernels failed ({e}); building the C++ CPU kernels alone")
                cpu = cpu_extension()  # copied into the Extension object setuptools prepared
                for attribute in CPU_EXTENSION_FIELDS:
                    setattr(ext, attribute, getattr(cpu, attribute))
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001
                give_up(ext, e)

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("ZOKERN_SKIP_CUDA_BUILD")
    if torch.version.cuda is not None and CUDA_HOME is None:
        message = "torch has CUDA but nvcc was not found (set CUDA_HOME)"
        if _flag("ZOKERN_REQUIRE_BUILD"):  # the whole extension was asked for: its CUDA kernels too
            raise RuntimeError(f"zokern: {message}; ZOKERN_REQUIRE_BUILD=1")
        print(f"zokern: {message}; building the CPU kernels only")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        # torch derives the architectures from the visible GPUs, and with none (a build machine, a container build)
        # it fails (IndexError in _get_cuda_arch_flags): build for the architectures this torch was built for.
        arch_list = arch_list_of(torch_cuda_archs())
        if arch_list:
            print(f"zokern: no GPU is visible; building the CUDA kernels for torch's architectures ({arch_list})")
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    if with_cuda:
        ext = CUDAExtension(
            "zokern._C",
            [*cpu_sources, "csrc/cuda/zo_pass.cu", "csrc/cuda/bindings.cpp"],
            include_dirs=list(include),
            define_macros=[("ZOKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": list(cxx), "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = cpu_extension()
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


def torch_cuda_archs() -> list[str]:
    """The architectures this torch was built for, GPU or none: ``torch.cuda.get_arch_list()`` answers [] without a
    visible GPU up to torch 2.11 (pytorch#169414), so the build's own flags are read then."""
    import torch

    archs = torch.cuda.get_arch_list()
    if not archs:
        flags = getattr(torch._C, "_cuda_getArchFlags", lambda: None)()
        archs = flags.split() if flags else []
    return archs


def arch_list_of(torch_archs: list[str]) -> str:
    """TORCH_CUDA_ARCH_LIST for the real architectures of ``torch.cuda.get_arch_list()`` (``sm_80``; not ``sm_90a``,
    nor ``compute_90``), the newest also as PTX for later GPUs; "" for none."""
    numbers = sorted({int(a[3:]) for a in torch_archs if re.fullmatch(r"sm_\d+", a)})
    return ";".join(f"{n // 10}.{n % 10}" for n in numbers) + "+PTX" if numbers else ""


if __name__ == "__main__":  # as pip's build backend runs it; tests import the helpers above
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, **_extension_setup())
