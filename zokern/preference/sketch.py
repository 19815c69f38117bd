r"""Count-sketches of parameters: a fixed random linear map S from parameter space to k dimensions, generated from the
Philox stream and never stored, so that a run can record where its models are in a few kilobytes per point.

Element j of the tensor named ``name`` goes to bucket :math:`h(\text{name}, j) \in [0, k)` with sign
:math:`s(\text{name}, j) = \pm 1`, both read from one 32-bit Philox word: counter block ``j // 4`` (word ``j % 4``)
of Philox4x32-10 keyed by ``name_seed(name, seed)``, counter word 2 = ``DOMAIN_SKETCH``; the bucket is the word's low
31 bits modulo k, the sign its top bit. :math:`(Sx)_b = \sum_{h(j) = b} s(j) x_j`, accumulated in float64.

Because the hash depends on the name and the index within the tensor only, two models that share a tensor name and
shape (the policy and the reward model the loop maps onto it) share that part of S, and S is linear: the sketch of
an update is the difference of two sketches. For unit vectors u and v, :math:`\langle Su, Sv\rangle` is an unbiased
estimate of :math:`\langle u, v\rangle` with variance
:math:`(1 + \langle u, v\rangle^2 - 2\sum_j u_j^2 v_j^2)/k \le 2/k` (Weinberger et al. 2009; Charikar et al. 2002):
a sketched cosine or squared norm has a standard deviation of at most :math:`\sqrt{2/k}` (k = 512: about 0.06).

On the CPU one C++ pass (csrc/cpu/sketch.cpp) generates the words and accumulates the buckets as the data streams by
(about 5 ns per element on 2 cores); elsewhere the words come in chunks from the fastest backend and torch adds them
into the buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from zokern._dispatch import select_backend
from zokern.optim.seeds import mix

DOMAIN_SKETCH = 3  # Philox counter word 2: apart from the Gaussian (0), Rademacher (1) and rounding (2) streams
_CHUNK_BLOCKS = 1 << 18  # Philox blocks per chunk: 2^20 elements, a few tens of MiB of temporaries


def name_seed(name: str, seed: int = 0) -> int:
    """The Philox key of a tensor's hash: FNV-1a of its name's UTF-8 bytes, mixed with the sketch seed."""
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & ((1 << 64) - 1)
    return mix(h ^ mix(seed)) >> 1


@torch.no_grad()
def sketch_tensor(
    t: torch.Tensor, name: str, k: int, seed: int = 0, out: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """Add S restricted to ``name``'s elements applied to ``t`` into ``out`` (float64, k values; new if None).

    On the CPU the C++ kernel sketches in one pass (float32/bfloat16/float16 tensors); elsewhere, or with
    ``backend="torch"``, the stream's words come from the fastest backend in chunks and torch accumulates them
    (``index_add_``: atomic adds on a GPU)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if out is None:
        out = torch.zeros(k, dtype=torch.float64, device=t.device)
    key = name_seed(name, seed)
    flat = t.detach().reshape(-1)
    if backend != "torch" and _native_sketch(flat):
        out += torch.ops.zokern.count_sketch([flat.contiguous()], [key], k).to(out.device)
        return out
    words_of = select_backend(t.device, backend).philox_block_words
    for first in range(0, -(-flat.numel() // 4), _CHUNK_BLOCKS):
        n_blocks = min(_CHUNK_BLOCKS, -(-flat.numel() // 4) - first)
        words = words_of(key, DOMAIN_SKETCH, first, n_blocks, t.device).reshape(-1)
        values = flat[4 * first : 4 * (first + n_blocks)].double()
        words = words[: values.numel()]
        signs = 1.0 - 2.0 * (words >> 31).double()
        out.index_add_(0, (words & 0x7FFFFFFF) % k, signs * values)
    return out


def _native_sketch(flat: torch.Tensor) -> bool:
    from zokern import _native

    return (
        flat.device.type == "cpu"
        and flat.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and _native.cpu_available()
        and hasattr(torch.ops.zokern, "count_sketch")
    )


def sketch_named(tensors: Iterable[tuple[str, torch.Tensor]], k: int, seed: int = 0) -> torch.Tensor:
    """S applied to the concatenation of named tensors (name, tensor), as float64 on the CPU."""
    out = torch.zeros(k, dtype=torch.float64)
    for name, t in tensors:
        out += sketch_tensor(t, name, k, seed).cpu()
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two vectors (sketches or exact), NaN if either is zero."""
    na, nb = float(a.double().norm()), float(b.double().norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float(a.double() @ b.double()) / (na * nb)


class SketchRecorder:
    """Appends sketches of a run's models to a JSON-lines file as the run goes: one line per recorded point,
    ``{"method", "model", "iteration", "step", "gamma", "k", "seed", "norm", "names", "sketch"}`` (``norm``: the exact
    norm of the sketched parameters, for reference; ``names``: theirs, in order). k = 512 float64 values: about 10 KB of
    text per point. With ``fresh=True`` an existing file is emptied at the first point recorded, not before
    (zokern.preference.records: a run that fails earlier keeps the previous run's sketches)."""

    def __init__(self, path, k: int = 512, seed: int = 0, fresh: bool = False) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.path, self.k, self.seed = path, k, seed
        self._mode = "w" if fresh else "a"

    def record(self, method: str, model: str, named: list[tuple[str, torch.Tensor]], iteration: int, step: int,
               gamma: float | None = None) -> None:  # fmt: skip
        import json

        sketch = sketch_named(named, self.k, self.seed)
        norm = math.sqrt(sum(float(t.detach().double().square().sum()) for _, t in named))
        line = dict(method=method, model=model, iteration=iteration, step=step, gamma=gamma, k=self.k,
                    seed=self.seed, norm=norm, names=[n for n, _ in named], sketch=sketch.tolist())  # fmt: skip
        with open(self.path, self._mode) as fh:
            fh.write(json.dumps(line) + "\n")
        self._mode = "a"
