"""Loads the compiled extension `pairuni_kernels._C` once; the package works without it.

When the extension is missing (not built, or built for another torch), ops that have a
C++/CUDA kernel fall back to the pure-torch reference and one warning says so.
"""

from __future__ import annotations

import functools
import warnings


@functools.cache
def has_extension() -> bool:
    """True when `_C` imported and registered its `torch.ops.pairuni.*` kernels."""
    try:
        from . import _C  # noqa: F401  (registers the ops as a side effect)
    except ImportError as exc:
        warnings.warn(
            f"pairuni_kernels._C is not available ({exc}); compiled ops fall back to the "
            "pure-torch reference. Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True
