"""The oldest torch and Triton zokern runs on, checked where pip's own check does not reach.

pip refuses an older torch only by replacing it, and a Triton pinned by torch (torch 2.5 pins 3.1) wins over the
``triton`` extra; so ``import zokern`` refuses a torch below the floor, naming it, and the Triton backend reports
itself unavailable below its floor instead of failing inside a kernel's compilation. Versions are compared by their
release numbers only: NVIDIA's containers ship pre-releases such as ``2.8.0a0+...nv25.05`` that have every API of
their release. ``pyproject.toml`` declares the same floors (tests/test_install.py checks that they agree).

Run as a script (no import of zokern, before it is built), it exits 1 with the message when the installed torch is
too old: ``run.sh`` checks this before building, where pip would replace the user's torch.
"""

from __future__ import annotations

import re

# torch 2.5 brought increment_version over a list, Module.register_load_state_dict_pre_hook, torch.library.register_fake
# and torch::Library::set_python_module; 2.6 is the oldest the whole suite was run on (its Adam groups lack 2.7's
# decoupled_weight_decay key: docs/optim.md). Triton 3.2: the interpreter runs the kernels (3.1's rejected the
# Philox helper's tl.arange).
TORCH_FLOOR = (2, 6)
TRITON_FLOOR = (3, 2)


def release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: ``"2.6.0a0+git1"`` -> (2, 6, 0)."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def _dotted(floor: tuple[int, ...]) -> str:
    return ".".join(map(str, floor))


def torch_too_old(version: str) -> str | None:
    """Why torch ``version`` cannot run zokern, or None."""
    if release(version)[:2] >= TORCH_FLOOR:
        return None
    return (
        f"zokern needs torch >= {_dotted(TORCH_FLOOR)}, found {version}: upgrade torch (the build for your platform, "
        "e.g. with your CUDA version's index URL), then reinstall zokern"
    )


def triton_too_old() -> str | None:
    """Why the Triton that imports cannot run zokern's kernels, or None. Judged by the imported module's
    ``__version__`` (a distribution's record may be stale: a torch nightly's pytorch-triton installed over a stable
    triton leaves both); one without a readable version is not judged."""
    try:
        import triton
    except Exception as e:  # noqa: BLE001 - any import failure makes the backend unusable
        return f"triton does not import ({type(e).__name__}: {e})"
    version = getattr(triton, "__version__", None)
    if not isinstance(version, str) or not release(version) or release(version)[:2] >= TRITON_FLOOR:
        return None
    floor = _dotted(TRITON_FLOOR)
    return f"triton {version} is older than {floor} (pip install 'triton>={floor}')"


def require_torch() -> None:
    """ImportError naming the installed torch when it is below the floor."""
    import torch

    reason = torch_too_old(torch.__version__)
    if reason is not None:
        raise ImportError(reason)


if __name__ == "__main__":
    import sys

    try:
        require_torch()
    except ImportError as e:
        sys.exit(f"run.sh: {e}")
