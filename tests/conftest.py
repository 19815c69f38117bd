import os

import pytest
import torch

# Triton runs on the CPU through its interpreter when no GPU is present; the variable must be set before any
# @triton.jit decorator runs, so before zokern.kernels is imported anywhere in the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker is its own process: with torch's default of one thread per core in every worker
# (and in the subprocesses the tests start), the cores are oversubscribed and OpenMP's waiting threads slow the
# model-training tests tenfold. One thread per worker keeps the machine's cores for the workers.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # A ZOKERN_BACKEND in the caller's shell must not silently change what the tests exercise.
    monkeypatch.delenv("ZOKERN_BACKEND", raising=False)
