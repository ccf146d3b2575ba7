"""group_advantages and pair_weights (Triton kernels + launchers). Placeholder dispatch."""
from __future__ import annotations

from . import reference as ref


def group_advantages(rewards, group_ids, *, weights=None, eps=1e-6, scale="group"):
    return ref.group_advantages(rewards, group_ids, weights=weights, eps=eps, scale=scale)


def pair_weights(similarity, aligned):
    return ref.pair_weights(similarity, aligned)
