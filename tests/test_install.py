"""The package degrades, never breaks: without the C++ extension it imports, says why, and runs on torch."""

import os
import subprocess
import sys
import textwrap

import pytest


def test_imports_and_runs_without_the_extension():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["zokern._C"] = None  # makes `import zokern._C` fail, as a failed build would
        import torch, zokern
        status = zokern.backend_status()
        assert "cpu" not in zokern.available_backends() and "torch" in zokern.available_backends(), status
        assert "extension not loaded" in status["cpu"], status["cpu"]
        t = torch.ones(10)
        zokern.perturb_(t, 1, 0.5)
        assert torch.equal(t, 1 + 0.5 * zokern.gaussian(1, 0, 10, backend="torch"))
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_triton_sources_install_inside_the_zokern_namespace():
    import importlib.metadata

    import zokern.kernels

    assert zokern.kernels.__name__ == "zokern.kernels"
    # The top-level import name `kernels` belongs to another PyPI project: the zokern distribution must not own it.
    owners = importlib.metadata.packages_distributions()
    assert "zokern" in owners.get("zokern", [])
    assert "zokern" not in owners.get("kernels", [])


def _pack(source, *args: str) -> None:
    """Run ``python ARGS`` in ``source`` with the extension's build skipped: packing, not compiling."""
    env = dict(os.environ, ZOKERN_SKIP_BUILD="1")
    out = subprocess.run([sys.executable, *args], cwd=source, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_wheel_ships_every_subpackage_and_no_top_level_kernels(tmp_path):
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".git", "build", "*.so", "__pycache__", "*.egg-info"))
    _pack(source, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), ".")
    (wheel,) = tmp_path.glob("zokern-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "zokern/ops.py",
        "zokern/optim/base.py",
        "zokern/integrations/transformers.py",
        "zokern/kernels/zo_pass.py",
    ):
        assert module in names, module
    assert not any(name.startswith("kernels/") for name in names)


def _setup_module():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("zokern_setup", Path(__file__).resolve().parents[1] / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


def _fake_toolkit(root, *, headers=True):
    """A CUDA toolkit whose nvcc answers a dry run as nvcc 13 does, and a wrapper script elsewhere exec-ing it."""
    toolkit = root / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    if headers:
        (toolkit / "include" / "cuda_runtime.h").write_text("// stand-in\n")
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text('#!/bin/sh\necho "#$ _HERE_=${0%/*}"\necho "#$ TOP=${0%/*}/.."\n')  # no PATH needed
    wrapper = root / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    for script in (nvcc, wrapper):
        script.chmod(0o755)
    return toolkit


def test_build_finds_the_cuda_toolkit_behind_an_nvcc_wrapper(tmp_path, monkeypatch):
    # torch would take CUDA_HOME = the wrapper's grandparent, which has no cuda_runtime.h (seen on our machines).
    setup = _setup_module()
    toolkit = _fake_toolkit(tmp_path)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert setup.cuda_toolkit_behind_wrapper() == str(toolkit.resolve())
    monkeypatch.setenv("PATH", str(toolkit / "bin"))  # torch's own guess finds the headers: left alone
    assert setup.cuda_toolkit_behind_wrapper() is None
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("CUDA_HOME", "/opt/elsewhere")  # the user's choice wins
    assert setup.cuda_toolkit_behind_wrapper() is None
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no nvcc at all
    assert setup.cuda_toolkit_behind_wrapper() is None


def test_build_leaves_cuda_home_alone_when_the_wrapped_toolkit_has_no_headers(tmp_path, monkeypatch):
    setup = _setup_module()
    _fake_toolkit(tmp_path, headers=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert setup.cuda_toolkit_behind_wrapper() is None


def _build_command(setup, monkeypatch, extension, *, cpu_fails=False):
    """zokern's build_ext command around `extension`, with torch's build replaced by one that fails on CUDA sources
    (as a broken nvcc or a CUDA version mismatch does), and on any if `cpu_fails`, recording each attempt's sources."""
    from setuptools import Distribution
    from torch.utils import cpp_extension

    attempts = []

    def build_extensions(command):
        (ext,) = command.extensions
        attempts.append(list(ext.sources))
        if cpu_fails or any(source.endswith(".cu") for source in ext.sources):
            raise RuntimeError("Error compiling objects for extension")

    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extensions", build_extensions)
    monkeypatch.delenv("ZOKERN_SKIP_BUILD", raising=False)
    monkeypatch.delenv("ZOKERN_SKIP_CUDA_BUILD", raising=False)
    # A CUDA_HOME of the user's: the build looks for no toolkit and so leaves this process's environment alone.
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    command = setup._extension_setup()["cmdclass"]["build_ext"](Distribution())
    command.extensions = [extension]
    return command, attempts


def test_a_failed_cuda_build_still_builds_the_cpu_kernels(monkeypatch, capsys):
    from setuptools import Extension
    from torch.utils.cpp_extension import CppExtension

    setup = _setup_module()
    monkeypatch.delenv("ZOKERN_REQUIRE_BUILD", raising=False)
    monkeypatch.delenv("ZOKERN_SKIP_BUILD", raising=False)
    cuda = Extension(
        "zokern._C",
        ["csrc/cpu/zo_pass.cpp", "csrc/cuda/zo_pass.cu", "csrc/cuda/bindings.cpp"],
        define_macros=[("ZOKERN_WITH_CUDA", "1")],
        libraries=["c10", "c10_cuda", "torch", "torch_cpu", "torch_python", "cudart", "torch_cuda"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    command, attempts = _build_command(setup, monkeypatch, cuda)
    command.build_extensions()
    assert len(attempts) == 2 and "csrc/cuda/zo_pass.cu" in attempts[0]
    assert all(source.startswith("csrc/cpu/") for source in attempts[1]), attempts[1]
    (ext,) = command.extensions
    assert ext is cuda  # the object setuptools prepared, now CPU-only
    cpu = CppExtension("zokern._C", ["csrc/cpu/zo_pass.cpp"])
    assert ext.libraries == cpu.libraries and "nvcc" not in ext.extra_compile_args and not ext.define_macros
    assert not ext.optional  # the CPU kernels were built
    assert "building the CUDA kernels failed" in capsys.readouterr().out

    monkeypatch.setenv("ZOKERN_REQUIRE_BUILD", "1")  # CI and the GPU session: an incomplete build is an error
    cuda.sources = ["csrc/cuda/zo_pass.cu"]
    command, attempts = _build_command(setup, monkeypatch, cuda)
    with pytest.raises(RuntimeError, match="Error compiling"):
        command.build_extensions()
    assert len(attempts) == 1


def test_a_failed_cpu_build_leaves_an_installable_package(monkeypatch, capsys):
    from setuptools import Extension

    setup = _setup_module()
    monkeypatch.delenv("ZOKERN_REQUIRE_BUILD", raising=False)
    cpu = Extension("zokern._C", ["csrc/cpu/zo_pass.cpp"])
    command, attempts = _build_command(setup, monkeypatch, cpu, cpu_fails=True)
    command.build_extensions()
    assert len(attempts) == 1
    assert "zokern will use its torch/triton backends" in capsys.readouterr().out
    assert cpu.optional  # else setuptools' editable install fails copying the library that was not built


# ------------------------------------------------------------------------------------------ version floors


def test_pyproject_declares_the_floors_the_package_checks():
    import re
    from pathlib import Path

    from zokern import _floors

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for name, floor in (("torch", _floors.TORCH_FLOOR), ("triton", _floors.TRITON_FLOOR)):
        declared = re.findall(rf'"{name}>=([\d.]+)"', pyproject)
        assert declared == [".".join(map(str, floor))], (name, declared)


@pytest.mark.parametrize(
    "version, too_old",
    [("2.5.1+cu121", True), ("2.4", True), ("1.13.1", True), ("2.6.0", False), ("2.6.0a0+ecf3bae40a.nv25.01", False)]
    + [("2.13.0+cpu", False), ("3.0", False), ("2.10.0.dev20261101", False)],
)
def test_torch_versions_are_judged_by_their_release_numbers(version, too_old):
    from zokern import _floors

    reason = _floors.torch_too_old(version)
    assert (reason is not None) == too_old
    if too_old:
        assert version in reason and "torch >= 2.6" in reason


def test_an_older_torch_is_refused_at_import_and_before_a_build():
    """Named at ``import zokern`` (not an AttributeError from a newer API deep inside a step), and by the script
    run.sh calls before it builds, where pip would otherwise replace the user's torch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pretend = "import torch; torch.__version__ = '2.5.1+cu121'; "
    imported = subprocess.run(
        [sys.executable, "-c", pretend + "import zokern"], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert imported.returncode != 0
    assert "ImportError: zokern needs torch >= 2.6, found 2.5.1+cu121" in imported.stderr
    script = pretend + "import runpy; runpy.run_path('zokern/_floors.py', run_name='__main__')"
    checked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    assert checked.returncode == 1 and "run.sh: zokern needs torch >= 2.6, found 2.5.1+cu121" in checked.stderr
    current = subprocess.run([sys.executable, "zokern/_floors.py"], capture_output=True, text=True, cwd=root)
    assert current.returncode == 0, current.stderr


@pytest.mark.parametrize(
    "installed, reason",
    [("3.1.0", "triton 3.1.0 is older than 3.2"), ("3.2.0", None), ("3.6.0+git1a2b", None), (None, None)]
    + [("", None), ("broken", "triton does not import")],
)
def test_a_triton_below_its_floor_is_reported_unavailable(monkeypatch, installed, reason):
    """torch pins its Triton (2.5 pins 3.1), which wins over the triton extra: an older one would fail inside a
    kernel's compilation, so the backend says why it cannot run instead. Judged by the module that imports (a
    distribution record may be stale); a version it cannot read is not judged."""
    triton = pytest.importorskip("triton")
    from zokern import _dispatch

    assert _dispatch._triton_installed()  # (found before the import is broken below)
    if installed == "broken":
        monkeypatch.setitem(sys.modules, "triton", None)  # the import fails
    else:
        monkeypatch.setattr(triton, "__version__", installed)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _dispatch._triton_too_old.cache_clear()
    try:
        status = _dispatch.backend_status()["triton"]
        if reason is None:
            assert status == "available"
        else:
            assert status.startswith(reason), status
            with pytest.raises(RuntimeError, match=reason):
                _dispatch.available_requested_backend("triton")
        if installed == "3.1.0":
            assert "pip install 'triton>=3.2'" in status
    finally:
        _dispatch._triton_too_old.cache_clear()


def test_the_sdist_carries_every_file_a_build_and_the_tests_need(tmp_path):
    """setuptools puts an Extension's sources into an sdist, not the headers they include (a build from it failed:
    zokern/stream.h: No such file), and only the sources of the extension the packing machine would build."""
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    needed = [f for f in listed.stdout.split() if not f.startswith(".")]
    source = tmp_path / "source"
    for name in needed:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((root / name).read_bytes())
    _pack(source, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist"))  # the manifest alone decides
    (sdist,) = (tmp_path / "dist").glob("zokern-*.tar.gz")
    with tarfile.open(sdist) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert not [f for f in needed if f not in packed]


def test_a_cuda_build_without_a_visible_gpu_targets_the_architectures_torch_was_built_for(monkeypatch):
    """torch picks the architectures from the visible GPUs and, with none (a build machine, a container build),
    failed with an IndexError: the build names torch's own architectures instead."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    setup = _setup_module()
    for flag in ("ZOKERN_SKIP_BUILD", "ZOKERN_SKIP_CUDA_BUILD", "ZOKERN_REQUIRE_BUILD"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")  # unset (and restored after the test)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90", "sm_90a", "sm_120", "compute_120"])
    (ext,) = setup._extension_setup()["ext_modules"]
    assert "csrc/cuda/zo_pass.cu" in ext.sources
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;12.0+PTX"
    # torch <= 2.11 answers [] without a visible GPU: the build's own flags say the same.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])
    monkeypatch.setattr(torch._C, "_cuda_getArchFlags", lambda: "sm_75 sm_90 compute_90", raising=False)
    setup._extension_setup()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # the user's choice stands
    setup._extension_setup()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
