"""Where the optimizers' seeds come from: a pure function of (base seed, step, probe), so a run is reproducible from
its base seed and a resumed run draws exactly the seeds the uninterrupted one would have.

    step_seed(base, t)      = mix(base XOR mix(t + 1)) >> 1
    probe_seed(s, 0)        = s
    probe_seed(s, k)        = mix(s + k * 0x9E3779B97F4A7C15 mod 2^64) >> 1      (k >= 1)
    rounding_seed(s, j)     = mix(s XOR mix(j + 0x5851F42D4C957F2D mod 2^64)) >> 1

``mix`` is SplitMix64's finaliser (Steele, Lea and Flood 2014), a bijection of 64-bit integers with full avalanche;
the final shift keeps seeds in [0, 2^63), the stream's range. The base seed is the optimizer's ``seed`` argument,
or, when it is None, one integer drawn from torch's global generator at construction (so ``torch.manual_seed``
makes a run reproducible).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def mix(x: int) -> int:
    """SplitMix64's finaliser on a 64-bit integer."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(base_seed: int, step: int) -> int:
    """The seed of optimizer step ``step`` (0-based) of a run with base seed ``base_seed``."""
    return mix(base_seed ^ mix(step + 1)) >> 1


def probe_seed(seed: int, probe: int) -> int:
    """The seed of probe ``probe`` of a step whose seed is ``seed``; probe 0 uses the step's seed itself."""
    return seed if probe == 0 else mix(seed + probe * _GOLDEN) >> 1


def rounding_seed(seed: int, update_pass: int) -> int:
    """The stochastic-rounding seed of update pass ``update_pass`` (1, 2, ...) of a step whose seed is ``seed``."""
    return mix(seed ^ mix(update_pass + 0x5851F42D4C957F2D)) >> 1


def draw_base_seed() -> int:
    """A base seed from torch's global generator."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
