"""clipped_policy_loss. Placeholder dispatch."""
from __future__ import annotations

from . import reference as ref


def clipped_policy_loss(logp, old_logp, advantages, mask, **kw):
    return ref.clipped_policy_loss(logp, old_logp, advantages, mask, **kw)
