"""Classifier-free-guidance sampling of image tokens: the Python front of `torch.ops.pairuni.cfg_sample`.

One call per decode step replaces the official Janus sequence (split, subtract, scale,
add, divide, softmax, `torch.multinomial`): on CPU a C++ kernel parallel over rows, on
CUDA one kernel launch without host synchronisation, so a decode step that calls it can
be captured in a CUDA graph.

How it departs from `torch.multinomial`: the draw is a Gumbel-max (exponential race)
over a counter-based Philox stream keyed by (seed of the row, step, token index), so a
row's token depends only on its own logits, seed and step, never on its batch neighbours
or on a global generator. `pairuni_kernels.reference.cfg_sample` implements the same
stream in torch, and the CPU and CUDA kernels draw the same tokens as it where floating
point allows.

Without the compiled extension the reference runs instead (one warning at import);
`PAIRUNI_BACKEND=reference` forces the reference.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import backend_name
from ._ext import has_extension

__all__ = ["cfg_sample"]

_HAS_OP = has_extension()  # decided once; a missing `_C` warns once and uses the reference


def cfg_sample(logits: torch.Tensor, *, guidance_scale: float, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seeds: torch.Tensor, step, layout: str = "blocked",
               check_finite: bool | None = None, cond_logprobs: bool = False):
    """Sample one token per row from classifier-free-guided logits.

    ``z = (u + guidance_scale * (c - u)) / temperature``, then top-k, then top-p, then one
    draw from ``softmax(z)`` restricted to the kept tokens.

    Parameters
    ----------
    logits : torch.Tensor
        ``[2B, V]`` float32, bfloat16 or float16: B conditional and B unconditional rows.
    guidance_scale : float
        CFG scale (Janus-Pro uses 5); 1 samples the conditional logits.
    temperature : float, default 1.0
        Divides the guided logits; 0 is greedy (first argmax, logprob 0).
    top_k : int, default 0
        Keep the tokens whose z is at least the k-th largest (ties kept); 0 or >= V: off.
    top_p : float, default 1.0
        In (0, 1]. Keep token i when the probability mass (after top-k) of tokens with a
        strictly larger z is below ``top_p``; 1: off.
    seeds : torch.Tensor
        ``[B]`` int64, one seed per conditional row, on the device of ``logits``.
    step : int or torch.Tensor
        Decode step (>= 0) keying the random stream, or an int64 tensor of one element or
        ``[B]`` on the device of ``logits`` (a device tensor can be advanced in place inside
        a captured CUDA graph; ``[B]`` gives every row its own step).
    layout : {"blocked", "interleaved"}, default "blocked"
        ``"blocked"``: rows ``[cond_0..cond_{B-1}, uncond_0..uncond_{B-1}]`` (HF transformers);
        ``"interleaved"``: ``[cond_0, uncond_0, cond_1, ...]`` (official Janus).
    check_finite : bool, optional
        Raise ``ValueError`` for NaN / inf logits. Default: on for CPU tensors, off for CUDA
        tensors (the check would synchronise with the host every step) and under
        ``torch.compile``.
    cond_logprobs : bool, default False
        Also return the conditional branch's log-probability of each drawn token,
        ``log_softmax(c / T)[token]`` with T = ``temperature`` (1 when greedy) and no
        top-k / top-p, computed in the same pass over the row (the image rollouts' old
        log-prob, without a second softmax over ``[B, V]``).

    Returns
    -------
    tokens : torch.Tensor
        ``[B]`` int64 drawn token ids.
    logprobs : torch.Tensor
        ``[B]`` float32 log-probability of each drawn token under the final (guided,
        tempered, truncated) distribution.
    cond_logprobs : torch.Tensor
        ``[B]`` float32, only with ``cond_logprobs=True``.

    Raises
    ------
    ValueError
        Naming the argument, for a wrong shape, dtype, device or value.

    Examples
    --------
    >>> logits = torch.randn(2 * 4, 16384)            # 4 prompts: 4 cond rows, then 4 uncond rows
    >>> seeds = torch.arange(4, dtype=torch.int64)
    >>> tokens, logprobs = cfg_sample(logits, guidance_scale=5.0, seeds=seeds, step=0)
    >>> tokens.shape, logprobs.dtype
    (torch.Size([4]), torch.float32)
    """
    compiling = torch.compiler.is_compiling()
    if check_finite is None:
        check_finite = not compiling and not logits.is_cuda
    reference.validate_cfg_sample_inputs(logits, seeds, step, guidance_scale, temperature, top_k, top_p, layout,
                                         dtypes=reference.CFG_LOGIT_DTYPES, check_finite=check_finite)
    if not _HAS_OP or backend_name() == "reference":
        return reference.cfg_sample(logits, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seeds=seeds, step=step, layout=layout, check_finite=False,
                                    cond_logprobs=cond_logprobs)
    steps = step if isinstance(step, torch.Tensor) else None
    out = torch.ops.pairuni.cfg_sample(logits, seeds, steps, 0 if steps is not None else int(step),
                                       float(guidance_scale), float(temperature), int(top_k), float(top_p),
                                       layout == "interleaved", bool(cond_logprobs))
    return out if cond_logprobs else out[:2]


if _HAS_OP:

    @torch.library.register_fake("pairuni::cfg_sample")
    def _cfg_sample_fake(logits, seeds, steps, step, guidance_scale, temperature, top_k, top_p, interleaved,
                         with_cond=False):
        torch._check(logits.dim() == 2, lambda: "cfg_sample: logits must be [2B, V]")
        torch._check(logits.shape[0] % 2 == 0, lambda: "cfg_sample: logits.size(0) must be even")
        batch = logits.shape[0] // 2
        torch._check(seeds.shape[0] == batch, lambda: "cfg_sample: seeds must be [B]")
        return (logits.new_empty((batch,), dtype=torch.int64), logits.new_empty((batch,), dtype=torch.float32),
                logits.new_empty((batch if with_cond else 0,), dtype=torch.float32))
