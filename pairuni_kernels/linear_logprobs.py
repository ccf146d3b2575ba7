"""Token log-probs straight from hidden states, never the [M, V] logits: the `linear_logprobs` op.

    logp[i] = log_softmax((hidden[i] @ weight.T + bias) / temperature)[targets[i]]

Holds the op and its front (the chunk loops, the kernels and the chunk planner `chunk_shape` are in
`chunked_head.py`):
  ops     `pairuni::linear_logprobs_fwd` / `_bwd` (torch.library custom ops, fake implementations,
          registered autograd), so torch.compile(fullgraph=True) traces them. Forward keeps only the
          per-row log-sum-exp (and entropy when asked); backward recomputes each chunk's logits once.
          `fused_linear_policy_loss` also runs `linear_logprobs_fwd` (with a row mask) for
          sequence-level rows too long for one chunk.
  front   `linear_logprobs` (validation, dispatch), and `_check_head`, the checks of the head's
          arguments both fronts share.

CUDA tensors run the Triton kernels for the softmax work; CPU tensors run the same chunk loops with
in-place torch ops. The matmuls run in the input dtype; the softmax, the entropy and the gradient of
the logits in fp32; `grad_weight` is accumulated over row chunks in the weight's dtype (one rounding
per row chunk) unless `accum_dtype=torch.float32` (V*H*4 more bytes, one rounding in all).
"""

from __future__ import annotations

import math

import torch

from ._backend import use_triton
from ._checks import FLOAT_DTYPES, INT_DTYPES, check_shape, check_tensor
from .chunked_head import _backward_impl, _forward_impl, input_grads
from .reference import compute_dtype


# ============================================================================ torch.library ops
@torch.library.custom_op("pairuni::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None, row_mask: torch.Tensor | None, temperature: float,
                        return_entropy: bool, chunk_size: int, vocab_chunk_size: int, accum_fp32: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [M], entropy [M] or [0], lse [M] fp32/fp64); rows where row_mask is 0 are skipped (logp 0).
    `accum_fp32` is only read by backward (grad_weight accumulation dtype)."""
    return _forward_impl(hidden, weight, targets, bias, row_mask, temperature, return_entropy, chunk_size,
                         vocab_chunk_size)


@linear_logprobs_fwd.register_fake
def _(hidden, weight, targets, bias, row_mask, temperature, return_entropy, chunk_size, vocab_chunk_size,
      accum_fp32):
    n = hidden.shape[0]
    out_dt = compute_dtype(hidden.dtype)
    lse_dt = torch.float32 if use_triton(hidden) else out_dt
    return (hidden.new_empty(n, dtype=out_dt), hidden.new_empty(n if return_entropy else 0, dtype=out_dt),
            hidden.new_empty(n, dtype=lse_dt))


@torch.library.custom_op("pairuni::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
                        weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None,
                        row_mask: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor | None,
                        temperature: float, chunk_size: int, vocab_chunk_size: int, accum_fp32: bool,
                        need_hidden: bool,
                        need_weight: bool, need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias); a gradient that is not needed comes back empty."""
    return _backward_impl(grad_logp, grad_entropy, hidden, weight, targets, bias, row_mask, lse, entropy,
                          temperature, chunk_size, vocab_chunk_size, accum_fp32, need_hidden, need_weight,
                          need_bias)


@linear_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, bias, row_mask, lse, entropy, temperature, chunk_size,
      vocab_chunk_size, accum_fp32, need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    (hidden, weight, targets, bias, row_mask, temperature, return_entropy, chunk_size, vocab_chunk_size,
     accum_fp32) = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, targets, bias, row_mask, lse, entropy if return_entropy else None)
    ctx.temperature, ctx.chunk_size, ctx.vocab_chunk_size = temperature, chunk_size, vocab_chunk_size
    ctx.accum_fp32 = accum_fp32


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, targets, bias, row_mask, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    need_bias = bool(need_bias) and bias is not None
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if entropy is None:
        grad_entropy = None
    elif grad_entropy is None:
        entropy = None
    gh, gw, gb = linear_logprobs_bwd(
        grad_logp, grad_entropy, hidden, weight, targets, bias, row_mask, lse, entropy, ctx.temperature,
        ctx.chunk_size, ctx.vocab_chunk_size, ctx.accum_fp32, bool(need_hidden), bool(need_weight), need_bias)
    return input_grads(linear_logprobs_fwd, hidden=gh if need_hidden else None,
                       weight=gw if need_weight else None, bias=gb if need_bias else None)


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ front
def _check_head(hidden, weight, bias, temperature, chunk_size, vocab_chunk_size, accum_dtype,
                hidden_name="hidden"):
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected the dtype of {hidden_name} ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] with V > 0 "
                         f"(H from {hidden_name}), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device)
        check_shape("bias", bias, (weight.shape[0],))
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}: expected None or an int > 0, got {value!r}")
    if accum_dtype not in (None, weight.dtype, torch.float32):
        raise ValueError(f"accum_dtype: expected None, torch.float32 or {weight.dtype}, got {accum_dtype!r}")


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False,
                    chunk_size: int | None = None, vocab_chunk_size: int | None = None,
                    accum_dtype: torch.dtype | None = None):
    """Log-probability of `targets` under a linear head, chunk by chunk (no [M, V] logits).

    Args:
        hidden:  [M, H] float (fp32/bf16/fp16/fp64); differentiable.
        weight:  [V, H], same dtype as hidden (an lm_head / gen_head weight); differentiable.
        targets: [M] int, token ids in [0, V).
        bias:    [V] float or None; differentiable.
        temperature: logits are divided by it (> 0).
        return_entropy: also return the entropy of each row's distribution (differentiable).
        chunk_size: rows per chunk (default: from H, V and free memory, see `chunk_shape`).
        vocab_chunk_size: vocabulary columns per chunk (default: the whole vocabulary unless
            even MIN_CHUNK_ROWS rows would not fit the chunk budget; then an online log-sum-exp).
        accum_dtype: dtype grad_weight is accumulated in over row chunks: None (the weight's dtype;
            a bf16 weight gets one bf16 rounding per row chunk) or torch.float32 (V*H*4 bytes more).
    Returns:
        logp [M] in float32 (float64 for float64 inputs), or (logp, entropy) with return_entropy.
    Raises:
        ValueError naming the argument for a bad shape, dtype, device, temperature or token id.

    Example:
        >>> logp = linear_logprobs(h, model.lm_head.weight, tokens, temperature=1.0)
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    _check_head(hidden, weight, bias, temperature, chunk_size, vocab_chunk_size, accum_dtype)
    check_tensor("targets", targets, ndim=1, dtypes=INT_DTYPES, device=hidden.device)
    check_shape("targets", targets, (hidden.shape[0],))
    logp, entropy, _ = linear_logprobs_fwd(hidden, weight, targets, bias, None, float(temperature),
                                           bool(return_entropy), chunk_size or 0, vocab_chunk_size or 0,
                                           accum_dtype == torch.float32)
    return (logp, entropy) if return_entropy else logp

