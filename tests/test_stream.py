"""The perturbation stream: Philox known answers, statistics, slice invariance, identity across backends.

Thresholds are set at about five standard errors (or a 1e-4 significance level) of the tested statistic, so a
correct stream fails with negligible probability and the seeds being fixed makes every run identical anyway.
"""

import math

import pytest
import torch
from helpers import DEVICE
from helpers import Z_ATOL
from helpers import backends_for
from scipy import stats

import zokern
from zokern import _dispatch
from zokern import _reference

# Interpreted Triton runs ~1e5 elements a second: it gets a smaller sample than the compiled backends.
SAMPLE = {"torch": 1_000_000, "cpu": 1_000_000, "cuda": 1_000_000, "triton": 1_000_000 if DEVICE == "cuda" else 40_000}
BACKENDS = backends_for()

KNOWN_ANSWERS = [  # Random123's Philox4x32-10 test vectors: (counter, key, output)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_reference_philox_known_answers(counter, key, expected):
    words = _reference.philox4x32(*(torch.tensor([c]) for c in counter), key[0] | (key[1] << 32))
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("domain", [0, 1, 2, 3])
def test_philox_words_bit_identical_across_backends(backend, domain):
    impl = _dispatch._module(backend)
    for seed, first in ((0, 0), (2**63 - 1, 2**32 - 3), (0x299F31D0A4093822, 2**59 + 17)):
        expected = _reference.philox_block_words(seed, domain, first, 37)
        got = impl.philox_block_words(seed, domain, first, 37, DEVICE).cpu()
        assert torch.equal(got, expected), (seed, first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_stream_within_stated_bound_of_exact_values(backend, distribution):
    n = min(SAMPLE[backend], 200_000)
    for start in (0, 2**31 + 5, 2**62 + 3):
        z = getattr(zokern, distribution)(17, start, n, backend=backend, device=DEVICE).double().cpu()
        exact = _reference.stream(17, start, n, distribution)
        err = (z - exact).abs().max().item()
        assert err <= (Z_ATOL if distribution == "gaussian" else 0.0), (start, err)


def _sample(backend, distribution, seed=2024, start=0):
    n = SAMPLE[backend]
    return getattr(zokern, distribution)(seed, start, n, backend=backend, device=DEVICE).double().cpu()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_moments_and_ks(backend):
    z = _sample(backend, "gaussian")
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z.numpy())) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z.numpy())) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    assert z.abs().max().item() <= 4.8547


@pytest.mark.parametrize("backend", BACKENDS)
def test_rademacher_balance(backend):
    z = _sample(backend, "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_no_correlation_between_neighbours_or_seeds(backend, distribution):
    z = _sample(backend, distribution)
    n = z.numel()
    bound = 5 / math.sqrt(n)
    # lag 1: within a Box-Muller pair; 8 and 128: across Philox groups; 2: across pairs of one group.
    for lag in (1, 2, 8, 128):
        c = torch.corrcoef(torch.stack((z[:-lag], z[lag:])))[0, 1].item()
        assert abs(c) < bound, (lag, c)
    # Seeds that differ in one bit of either key word, and consecutive seeds.
    for other in (2025, 2024 ^ (1 << 40), 2024 ^ 1):
        c = torch.corrcoef(torch.stack((z, _sample(backend, distribution, seed=other))))[0, 1].item()
        assert abs(c) < bound, (other, c)
    # The pair (z_2m, z_2m+1) is uncorrelated in magnitude too: Box-Muller gives independent normals.
    if distribution == "gaussian":
        c = torch.corrcoef(torch.stack((z[0::2] ** 2, z[1::2] ** 2)))[0, 1].item()
        assert abs(c) < 5 / math.sqrt(n / 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_slices_and_shardings_regenerate_the_same_stream(backend, distribution):
    fn = getattr(zokern, distribution)
    whole = fn(9, 1000, 1200, backend=backend, device=DEVICE)
    for a, b in ((0, 1), (3, 130), (127, 129), (517, 1200), (1199, 1200)):
        assert torch.equal(fn(9, 1000 + a, b - a, backend=backend, device=DEVICE), whole[a:b])
    # Sharded: whoever holds elements [a, b) of a tensor perturbs exactly that slice.
    full = torch.rand(1200, device=DEVICE) + 0.5
    shards = [full[:333].clone(), full[333:900].clone(), full[900:].clone()]
    zokern.perturb_(full, 9, 0.1, offset=1000, distribution=distribution, backend=backend)
    for shard, start in zip(shards, (0, 333, 900)):
        zokern.perturb_(shard, 9, 0.1, offset=1000 + start, distribution=distribution, backend=backend)
    assert torch.equal(torch.cat(shards), full)


def test_stream_version_is_exported():
    assert zokern.STREAM_VERSION == 2
