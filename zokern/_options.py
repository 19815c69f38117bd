"""Checks of the commands' option values, shared by the command line and the functions behind it.

Each ``check_*`` raises a ValueError that names the problem; ``argtype`` turns a check into an argparse ``type=``,
so a bad value is reported by argparse (one ``zokern CMD: error: argument --X: ...`` line after the usage, exit
status 2) before a command starts any work.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from zokern.ops import EPS_LIMIT
from zokern.ops import FLOAT32_OVERFLOW
from zokern.ops import FLOAT32_TINY
from zokern.ops import INDEX_LIMIT as SEED_LIMIT  # the optimizers' seeds are the stream's: [0, 2^63)
from zokern.ops import Z_BOUND

T = TypeVar("T")


def argtype(check: Callable[[str], T]) -> Callable[[str], T]:
    """``check`` as an argparse type: its ValueError becomes argparse's error, message kept."""

    def parse(text: str) -> T:
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = check.__name__
    return parse


def _int(text: str | int, what: str) -> int:
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"expected {what}, got {text!r}")
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected {what}, got {text!r}") from None


def _float(text: str | float, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected {what}, got {text!r}") from None
    if not abs(value) < FLOAT32_OVERFLOW:  # the passes compute in float32: a larger value is infinite there
        raise ValueError(f"expected {what} (below 3.4e38, float32's range), got {text!r}")
    return value


def check_positive_int(text: str | int) -> int:
    value = _int(text, "a positive integer")
    if value < 1:
        raise ValueError(f"expected a positive integer, got {value}")
    return value


def check_seed(text: str | int) -> int:
    value = _int(text, "an integer seed")
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"expected a seed in [0, 2^63), got {value}")
    return value


def check_non_negative_float(text: str | float) -> float:
    value = _float(text, "a finite number >= 0")
    if value < 0:
        raise ValueError(f"expected a finite number >= 0, got {value:g}")
    return value


def check_positive_float(text: str | float) -> float:
    value = _float(text, "a finite number > 0")
    if value < FLOAT32_TINY:  # 0, or so small that float32 holds it as 0 or a subnormal: a step would do nothing
        raise ValueError(f"expected a finite number > 0 (at least 1.2e-38, float32's smallest normal), got {value:g}")
    return value


def check_eps(text: str | float) -> float:
    """A perturbation scale: positive, and with a step's largest move, 2 |z| eps, still finite in float32."""
    value = check_positive_float(text)
    if not value < EPS_LIMIT:
        raise ValueError(
            f"expected eps below {EPS_LIMIT:.4g} (a step moves by up to 2 x {Z_BOUND} x eps, which float32 must hold), "
            f"got {value:g}"
        )
    return value


def check_regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise ValueError(f"{text!r} is not a regular expression ({e})") from None
    return text


def check_device(text: str) -> str:
    """A device torch can place a tensor on here: parsed, then tried (a CPU-only torch raises an AssertionError for
    "cuda", a missing GPU a RuntimeError; both become this ValueError)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"{text!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "meta":
        raise ValueError("'meta' holds no data; the models need a real device (cpu, cuda, ...)")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"device {text!r} is not usable here ({reason})") from None
    return text


def check_path(text: str | Path) -> Path:
    """A path as the user means it: ``~`` expanded (the shell leaves it in ``--out=~/x`` or in quotes); not empty
    (an unset variable, which would name the current directory)."""
    if not str(text).strip():
        raise ValueError("an empty path (an unset variable?): name it")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~name of no user here
        raise ValueError(f"{text}: no home directory for {str(text).split('/')[0]!r}") from None


def check_output_dir(text: str | Path) -> Path:
    """A directory that exists, or that can be created (its nearest existing ancestor is a writable directory); not
    created here."""
    path = check_path(text)
    try:
        return _creatable_directory(path)
    except OSError as e:  # a parent the user may not search, a name too long: what the filesystem said
        raise ValueError(f"{path}: {e.strerror or e}") from None


def _creatable_directory(path: Path) -> Path:
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{path} is a symbolic link to nothing")
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{path} is not writable")
        return path
    ancestor = next(p for p in path.absolute().parents if p.exists())
    if not ancestor.is_dir():
        raise ValueError(f"{path} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{path} cannot be created: {ancestor} is not writable")
    return path


positive_int = argtype(check_positive_int)
seed = argtype(check_seed)
non_negative_float = argtype(check_non_negative_float)
eps = argtype(check_eps)
regex = argtype(check_regex)
device = argtype(check_device)
output_dir = argtype(check_output_dir)
path = argtype(check_path)
