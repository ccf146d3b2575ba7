"""Test-wide setup. Triton kernels run in the numpy interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, hence at the top here.
Tests of a Triton or CUDA path build their inputs on the `device` fixture: a GPU when there is
one (the compiled kernels run), else the CPU (`triton_backend` then forces the interpreted kernels),
so one suite checks both.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    """Where the inputs of a kernel test live: CUDA when available, else CPU (interpreted kernels)."""
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreted on CPU) for the duration of a test."""
    monkeypatch.setenv("PAIRUNI_BACKEND", "triton")
    return DEVICE


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("PAIRUNI_BACKEND", "reference")
    return DEVICE


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: random inputs, never zeros, reproducible.

    Seed 1234 by default. PAIRUNI_RANDOM_SEED=1 (or any non-number) draws a fresh seed per test and
    prints it (pytest shows it with a failure); PAIRUNI_RANDOM_SEED=<that seed> replays it.
    """
    choice = os.environ.get("PAIRUNI_RANDOM_SEED")
    if not choice:
        return torch.Generator().manual_seed(1234)
    replay = choice.isdigit() and int(choice) > 1
    seed = int(choice) if replay else int.from_bytes(os.urandom(4), "little")
    print(f"PAIRUNI_RANDOM_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def janus_pro_dir(tmp_path_factory):
    """A directory in the format of `deepseek-community/Janus-Pro-1B` with tiny random weights, written
    once per session (engine/testing/janus_pro_format.py; seed 0)."""
    from engine.testing.janus_pro_format import write_janus_pro_format

    return write_janus_pro_format(tmp_path_factory.mktemp("janus_pro") / "Janus-Pro-tiny", seed=0)
