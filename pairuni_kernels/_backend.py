"""Which implementation runs: chosen per call from the tensor's device and PAIRUNI_BACKEND.

- CUDA tensors run the Triton / CUDA kernels.
- CPU tensors run the pure-torch reference (the spec), or the C++ CPU kernel where one exists.
- `PAIRUNI_BACKEND=reference` forces the reference everywhere; `PAIRUNI_BACKEND=triton`
  forces Triton kernels on CPU tensors too (set `TRITON_INTERPRET=1` before importing
  triton; the tests do this to check the kernels on machines without a GPU).
"""

from __future__ import annotations

import os

import torch

_VALID = ("auto", "reference", "triton")


def backend_name() -> str:
    name = os.environ.get("PAIRUNI_BACKEND", "auto").strip().lower() or "auto"
    if name not in _VALID:
        raise ValueError(f"PAIRUNI_BACKEND: expected one of {_VALID}, got {name!r}")
    return name


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernels should handle a tensor on `x.device`."""
    name = backend_name()
    if name == "reference":
        return False
    if name == "triton":
        return True
    return x.is_cuda
