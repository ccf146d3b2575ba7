"""Argument validation shared by every op: errors name the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, x, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """Raise ValueError unless `x` is a tensor with the given rank, dtype family and device."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected device {device}, got {x.device}")
    return x


def check_shape(name: str, x: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def check_mask(name: str, mask, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A mask is bool, integer or floating; a nonzero entry means 'counted'."""
    check_tensor(name, mask, ndim=len(shape), dtypes=(torch.bool,) + INT_DTYPES + FLOAT_DTYPES, device=device)
    check_shape(name, mask, shape)
    return mask
