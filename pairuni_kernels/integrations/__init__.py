"""Thin adapters with the signatures of other RL codebases, backed by pairuni kernels.

    from pairuni_kernels.integrations.verl import compute_grpo_outcome_advantage, compute_policy_loss
    from pairuni_kernels.integrations.trl import PairUniGRPOTrainer      # needs `pip install trl`

Each submodule is imported only when asked for, so `import pairuni_kernels` (and even
`import pairuni_kernels.integrations`) never needs TRL or verl installed.
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("trl", "verl")
__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
