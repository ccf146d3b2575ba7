"""The PairGRPO loss straight from hidden states, never the [N*T, V] logits: `fused_linear_policy_loss`.

    logp[i] = log_softmax((hidden[i] @ weight.T + bias) / temperature)[targets[i]]
    loss    = clipped_policy_loss(logp.view(N, T), old_logp, advantages, mask, ...)

Holds the op and its front (the kernels, the chunk planners `fused_chunk_tokens` / `fused_chunks` /
`loss_pieces` and the chunk helpers are in `chunked_head.py`):
  chunk loop `_fused_loss_impl`: chunks hold a number of tokens (`fused_chunk_tokens`), and forward
             finishes each chunk completely: logits, logp, the clipped loss and d loss / d logp of its
             tokens (the policy-loss op itself, `clipped_policy_loss_and_grad`, on the rows the chunk
             touches, weighted by `loss_share`: the loss maths is stated once), d logits in place, then
             grad hidden / grad weight. Logits are computed once, the three matmuls of the unfused path
             are all there is, and backward only scales the stored gradients by the incoming scalar.
  op         `pairuni::fused_linear_policy_loss_fwd` (torch.library custom op, fake implementation,
             registered autograd), so torch.compile(fullgraph=True) traces it.
  front      `fused_linear_policy_loss` (validation, dispatch). Sequence-level ratios keep rows whole;
             rows whose logits exceed SINGLE_PASS_MAX_ELEMENTS fall back to `linear_logprobs_fwd` + the
             [N, T] loss: logits twice.

Departures from the textbook composition:
  * masked tokens are skipped entirely: their hidden rows are never multiplied by the head, their
    targets are never read (padding ids such as -100 are fine), their gradients are exactly zero even
    when the hidden row holds NaN.
  * The matmuls run in the input dtype (bf16 stays bf16 on the tensor cores, as in the unfused
    model); the softmax and the gradient of the logits are computed in fp32. `grad_weight` is
    accumulated over chunks in the weight's dtype (one rounding per chunk) unless
    `accum_dtype=torch.float32` (V*H*4 more bytes, one rounding in all).
"""

from __future__ import annotations

import itertools

import torch

from . import reference as ref
from ._backend import use_triton
from ._checks import FLOAT_DTYPES, INT_DTYPES, check_mask, check_shape, check_tensor
from .chunked_head import (
    VOCAB_ALIGN,
    _check_targets,
    _Chunk,
    _dlogits_torch,
    _dlogits_triton,
    _stat_dtype,
    _stats_torch,
    _stats_triton,
    _take,
    _valid_rows,
    fused_chunk_tokens,
    fused_chunks,
    input_grads,
    loss_pieces,
)
from .linear_logprobs import _check_head, linear_logprobs_fwd
from .policy_loss import (
    _TYPE_KNOB_NAMES,
    _op_knobs,
    clipped_policy_loss,
    clipped_policy_loss_and_grad,
    loss_denominator,
    loss_share,
)
from .reference import PolicyLossOutput, compute_dtype

#: With sequence-level ratios the fused loss's chunks hold whole sequences; it computes each chunk's
#: logits once (gradients folded into the forward pass) while one sequence's logits, T * (V + H)
#: elements, take up to this (token-level ratios cut sequences anywhere and always do).
SINGLE_PASS_MAX_ELEMENTS = 1 << 26


def _whole_rows(importance_sampling_level: str, loss_type: str) -> bool:
    """Whether a token's loss needs its whole row (sequence ratios, vespo / geo_mean row terms)."""
    return importance_sampling_level != "token" or loss_type in ref.ROW_COUPLED_LOSS_TYPES


# ============================================================================ chunk loop
def _entropy_weights(mask, entropy_mask, entropy_agg_mode, dt) -> torch.Tensor:
    """[N, T] d agg(entropy) / d entropy_t of the entropy bonus (`reference.clipped_policy_loss`): the bonus is
    linear in the entropies, so its weights depend on the masks alone."""
    em = mask != 0 if entropy_mask is None else (mask != 0) & (entropy_mask != 0)
    w = em.to(dt)
    count = w.sum(-1, keepdim=True)
    if entropy_agg_mode == "token-mean":
        return w / count.sum().clamp(min=1)
    if entropy_agg_mode == "seq-mean-token-mean":
        return w / count.clamp(min=1) / (count > 0).sum().clamp(min=1)
    return w / (mask.shape[0] if entropy_agg_mode == "seq-mean-token-sum" else mask.shape[1])


def _fused_loss_impl(hidden, weight, targets, bias, old_logp, advantages, mask, ref_logp, selected, entropy_mask,
                     temperature, epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode,
                     importance_sampling_level, loss_type, kl_ratio_correction, type_knobs, entropy_coef,
                     entropy_agg_mode, compute_entropy, chunk_size, accum_fp32, need_hidden, need_weight, need_bias):
    """One pass over chunks of tokens: each chunk's logits once, its log-probs, its loss terms and
    d loss / d logp from the policy-loss op on the rows it touches, then d logits in place and the three
    gradients. hidden: [N*T, H], targets: [N*T] (masked tokens are skipped: never read).

    The loss maths is `clipped_policy_loss`'s alone (`clipped_policy_loss_and_grad`: the reference on
    CPU, the Triton kernels on CUDA). A piece of rows whose mask is cut down to the chunk's tokens is a
    part of the batch like a micro-batch: its loss times `loss_share` (its `loss_denominator` over the
    batch's) is its share of the batch's loss, and that same factor scales its d loss / d logp. The one
    exception is "seq-mean-token-mean", where the op divides a row by its own token count: a row the
    chunk holds only c of its C tokens of is then a piece of its own, its share times c / C."""
    n, t = mask.shape
    n_tok, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    out_dt = compute_dtype(hidden.dtype)
    fast = use_triton(hidden)
    dt = _stat_dtype(hidden, fast)
    dev = hidden.device
    valid = mask != 0
    row_index, _ = _valid_rows(valid.reshape(n_tok), n_tok)
    row_tokens = valid.sum(-1).tolist() if row_index is not None else [t] * n  # one host sync: chunk plan
    starts = list(itertools.accumulate(row_tokens, initial=0))
    total = starts[-1]
    positions = row_index if row_index is not None else torch.arange(n_tok, device=dev)  # flat [N*T] index
    tg = targets if row_index is None else targets.index_select(0, row_index)
    _check_targets(tg, vocab)
    tg = tg.to(torch.int64)

    grad_hidden = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight) if need_weight else weight.new_empty(0)
    accum_fp32 = accum_fp32 and need_weight and weight.dtype not in (torch.float32, torch.float64)
    grad_weight_acc = torch.zeros_like(weight, dtype=torch.float32) if accum_fp32 else grad_weight
    grad_bias_acc = torch.zeros(vocab, dtype=dt, device=dev) if need_bias else None
    sums = torch.zeros(5, dtype=out_dt, device=dev)  # loss, clip_fraction, kl, ratio_mean, entropy
    den_total = loss_denominator(mask, loss_agg_mode).to(out_dt)
    need_grad = need_hidden or need_weight or need_bias
    whole_rows = _whole_rows(importance_sampling_level, loss_type)
    split_rows = not whole_rows and loss_agg_mode == "seq-mean-token-mean"
    with_entropy = compute_entropy or entropy_coef != 0
    if with_entropy:  # the bonus's d loss / d entropy per token, and the entropy metric's 1 / token count
        ent_grad = (-entropy_coef * _entropy_weights(mask, entropy_mask, entropy_agg_mode, out_dt)).reshape(n_tok)
        ent_grad = ent_grad if row_index is None else ent_grad.index_select(0, row_index)
        ent_metric = 1.0 / max(total, 1)
    chunks = fused_chunks(row_tokens, chunk_size or fused_chunk_tokens(vocab, hidden_dim, hidden.dtype, dev),
                          whole_rows=whole_rows)
    buf = torch.empty(max((c1 - c0 for c0, c1 in chunks), default=0) * vocab, dtype=hidden.dtype, device=dev)
    inv_temp = 1.0 / temperature
    stats_step = _stats_triton if fast else _stats_torch
    dlogits_step = _dlogits_triton if fast else _dlogits_torch
    knobs = {"epsilon_low": epsilon_low, "epsilon_high": epsilon_high, "dual_clip_c": dual_clip_c, "beta": beta,
             "kl_estimator": kl_estimator, "loss_agg_mode": loss_agg_mode,
             "importance_sampling_level": importance_sampling_level, "loss_type": loss_type,
             "kl_ratio_correction": kl_ratio_correction, **dict(zip(_TYPE_KNOB_NAMES, type_knobs))}
    knobs["dro_beta"] = knobs["dro_beta"] or None  # the op's 0 stands for None
    for c0, c1 in chunks:
        m = c1 - c0
        sel = slice(c0, c1) if row_index is None else row_index[c0:c1]
        h = _take(hidden, sel)
        logits = buf[:m * vocab].view(m, vocab)
        torch.mm(h, weight.t(), out=logits)
        mx = torch.full((m,), float("-inf"), dtype=dt, device=dev)
        sm = torch.zeros(m, dtype=dt, device=dev)
        tgt = torch.zeros(m, dtype=dt, device=dev)
        ent = torch.zeros(m, dtype=dt, device=dev) if with_entropy else tgt
        chunk = _Chunk(logits, tg[c0:c1], bias, 0, inv_temp)
        stats_step(chunk, mx, sm, tgt, ent, with_entropy, preserve=True)  # the logits are reused for the gradient
        lse = mx + torch.log(sm)
        logp = (tgt - lse).to(out_dt)
        if with_entropy:
            ent = torch.log(sm) - ent / sm  # each token's entropy
            g_ent = ent_grad[c0:c1]
            sums += torch.stack([(g_ent * ent.to(out_dt)).sum(), *(sums[:0].new_zeros(3)),
                                 ent.to(out_dt).sum() * ent_metric])
        g = torch.empty(m, dtype=out_dt, device=dev)  # d loss / d logp of the chunk's tokens
        for s0, s1, p0, p1 in loss_pieces(starts, c0, c1, split_rows=split_rows):
            rows = slice(s0, s1)
            pos = positions[p0:p1] - s0 * t  # the piece's tokens inside its rows [s1 - s0, T], flattened
            piece_mask = torch.zeros((s1 - s0) * t, dtype=torch.bool, device=dev).index_fill_(0, pos, True)
            piece_lp = torch.zeros((s1 - s0) * t, dtype=out_dt, device=dev).index_copy_(0, pos, logp[p0 - c0:p1 - c0])
            piece_mask, piece_lp = piece_mask.view(s1 - s0, t), piece_lp.view(s1 - s0, t)
            share = loss_share(piece_mask, loss_agg_mode, den_total)
            if split_rows and p1 - p0 < row_tokens[s0]:  # part of one row: the op divided by p1 - p0 tokens
                share = share * ((p1 - p0) / row_tokens[s0])
            out, dlp = clipped_policy_loss_and_grad(
                piece_lp, old_logp[rows], advantages[rows], piece_mask,
                ref_logp=None if ref_logp is None else ref_logp[rows], grad_scale=share if need_grad else None,
                selected=None if selected is None else selected[rows], **knobs)
            token_share = (p1 - p0) / total  # the metrics are token means
            sums += torch.stack([out.loss * share, out.clip_fraction * token_share, out.kl * token_share,
                                 out.ratio_mean * token_share, out.entropy * 0]).to(out_dt)
            if need_grad:
                g[p0 - c0:p1 - c0] = dlp.reshape(-1).index_select(0, pos)
        if not need_grad:
            continue
        if with_entropy:
            dlogits_step(chunk, lse, g.to(dt), g_ent.to(dt), ent)
        else:
            dlogits_step(chunk, lse, g.to(dt), None, None)
        if need_hidden:
            if row_index is None:
                torch.mm(logits, weight, out=grad_hidden[sel])
            else:
                grad_hidden.index_copy_(0, sel, torch.mm(logits, weight))
        if accum_fp32:
            for v0 in range(0, vocab, 4 * VOCAB_ALIGN):
                v1 = min(vocab, v0 + 4 * VOCAB_ALIGN)
                grad_weight_acc[v0:v1] += torch.mm(logits[:, v0:v1].t(), h)
        elif need_weight:
            grad_weight.addmm_(logits.t(), h)
        if need_bias:
            grad_bias_acc += logits.sum(0, dtype=dt)
    if accum_fp32:
        grad_weight.copy_(grad_weight_acc)
    grad_bias = grad_bias_acc.to(bias.dtype) if need_bias else hidden.new_empty(0)
    return (*(x.clone() for x in sums), grad_hidden, grad_weight, grad_bias)  # outputs may not alias each other


# ============================================================================ torch.library op
@torch.library.custom_op("pairuni::fused_linear_policy_loss_fwd", mutates_args=())
def fused_linear_policy_loss_fwd(
        hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None,
        old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor | None,
        selected: torch.Tensor | None, entropy_mask: torch.Tensor | None,
        temperature: float, epsilon_low: float, epsilon_high: float, dual_clip_c: float | None, beta: float,
        kl_estimator: str, loss_agg_mode: str, importance_sampling_level: str, loss_type: str,
        kl_ratio_correction: bool, type_knobs: list[float], entropy_coef: float, entropy_agg_mode: str,
        compute_entropy: bool, chunk_size: int, accum_fp32: bool, need_hidden: bool, need_weight: bool,
        need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(loss, clip_fraction, kl, ratio_mean, entropy, grad_hidden, grad_weight, grad_bias); the gradients are
    those of `loss` (empty when not needed), computed in this same pass. type_knobs: the values of
    `policy_loss._TYPE_KNOB_NAMES` (divergences resolved, dro_beta 0 = None)."""
    return _fused_loss_impl(hidden, weight, targets, bias, old_logp, advantages, mask, ref_logp, selected,
                            entropy_mask, temperature, epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator,
                            loss_agg_mode, importance_sampling_level, loss_type, kl_ratio_correction, type_knobs,
                            entropy_coef, entropy_agg_mode, compute_entropy, chunk_size, accum_fp32, need_hidden,
                            need_weight, need_bias)


@fused_linear_policy_loss_fwd.register_fake
def _(hidden, weight, targets, bias, *args):
    need_hidden, need_weight, need_bias = args[-3:]
    dt = compute_dtype(hidden.dtype)
    scalars = [hidden.new_empty((), dtype=dt) for _ in range(5)]
    return (*scalars, torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


def _fused_setup_context(ctx, inputs, output):
    # the stored gradients are outputs of the op: without this the engine would hand backward a
    # zero tensor of each of their shapes (a [V, H] allocation for nothing)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[5:])
    ctx.has_bias = inputs[3] is not None


def _fused_backward(ctx, grad_loss, *_):
    gh, gw, gb = ctx.saved_tensors
    if grad_loss is None:  # only the metrics were used
        return input_grads(fused_linear_policy_loss_fwd)
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    # the stored gradients are d loss / d input: chain with the incoming scalar in place, since a
    # scaled copy would hold a second [V, H] gradient (a retain_graph second backward then fails
    # the saved-tensor version check instead of scaling twice)
    return input_grads(fused_linear_policy_loss_fwd,
                       hidden=gh.mul_(grad_loss.to(gh.dtype)) if need_hidden else None,
                       weight=gw.mul_(grad_loss.to(gw.dtype)) if need_weight else None,
                       bias=gb.mul_(grad_loss.to(gb.dtype)) if need_bias and ctx.has_bias else None)


fused_linear_policy_loss_fwd.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ============================================================================ front
def fused_linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                             bias: torch.Tensor | None = None, temperature: float = 1.0,
                             ref_logp: torch.Tensor | None = None, epsilon_low: float = 0.2,
                             epsilon_high: float = 0.2, dual_clip_c: float | None = None, beta: float = 0.0,
                             kl_estimator: str = "k3", loss_agg_mode: str = "token-mean",
                             importance_sampling_level: str = "token", chunk_size: int | None = None,
                             vocab_chunk_size: int | None = None, accum_dtype: torch.dtype | None = None,
                             compute_entropy: bool = False, **loss_type_knobs) -> PolicyLossOutput:
    """The clipped policy loss of a linear head's token log-probs, without [N*T, V] logits.

    Equals `clipped_policy_loss(linear_logprobs(hidden.flatten(0, 1), weight, targets.flatten(),
    bias=bias, temperature=temperature).view(N, T), old_logp, advantages, mask, ...)`, except that
    masked tokens are skipped: their hidden rows and targets are never read (padding ids are fine)
    and get zero gradient.

    Chunks hold a number of tokens (`fused_chunk_tokens`: from V, H and free memory) and cut
    sequences anywhere. Each chunk's logits are computed once, in forward, which also computes the
    loss's gradients (the loss terms and d loss / d logp from the policy-loss op on the rows the chunk
    touches, folded into d logits in place), so the step costs the three matmuls of the unfused path;
    backward only scales the stored gradients. Sequence-level ratios need a row's every log-prob
    first: there chunks end on row ends, and rows whose logits exceed SINGLE_PASS_MAX_ELEMENTS, or
    `vocab_chunk_size`, make forward keep only the per-row log-sum-exp and backward recompute the
    logits (twice in all).

    Args:
        hidden:     [N, T, H] float; differentiable.
        weight:     [V, H], same dtype as hidden; differentiable.
        targets:    [N, T] int, token ids in [0, V) where mask is set.
        old_logp, advantages ([N] or [N, T]), mask, ref_logp and the loss knobs (loss_type and the rest of
                    `reference.LOSS_TYPE_DEFAULTS`): as in `clipped_policy_loss`, except `entropy`: the head
                    computes each token's entropy itself when entropy_coef != 0 or compute_entropy, and folds
                    the bonus's gradient into d logits (entropy_mask, entropy_agg_mode as there).
        bias, temperature, vocab_chunk_size, accum_dtype: as in `linear_logprobs`.
        chunk_size: tokens per chunk (sequence level: rounded down to whole sequences, at least
                    one); default `fused_chunk_tokens`.
        compute_entropy: report the entropy metric even when entropy_coef is 0.
    Returns:
        PolicyLossOutput(loss, clip_fraction, kl, ratio_mean, entropy); loss differentiable in hidden,
        weight and bias.
    """
    check_tensor("hidden", hidden, ndim=3, dtypes=FLOAT_DTYPES)
    n, t, _ = hidden.shape
    _check_head(hidden, weight, bias, temperature, chunk_size, vocab_chunk_size, accum_dtype)
    check_tensor("targets", targets, ndim=2, dtypes=INT_DTYPES, device=hidden.device)
    check_shape("targets", targets, (n, t))
    check_tensor("old_logp", old_logp, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    check_shape("old_logp", old_logp, (n, t))
    check_mask("mask", mask, (n, t), hidden.device)
    if n == 0 or t == 0:
        raise ValueError(f"hidden: expected a non-empty [N, T, H] tensor, got shape {tuple(hidden.shape)}")
    # old_logp stands in for logp: it was just checked to have logp's shape, device and dtype family
    unknown = set(loss_type_knobs) - set(ref.LOSS_TYPE_DEFAULTS)
    if unknown:
        raise TypeError(f"fused_linear_policy_loss() got unexpected keyword arguments {sorted(unknown)}")
    if not isinstance(compute_entropy, bool):
        raise ValueError(f"compute_entropy: expected a bool, got {compute_entropy!r}")
    ppo = dict(ref_logp=ref_logp, epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip_c=dual_clip_c,
               beta=beta, kl_estimator=kl_estimator, loss_agg_mode=loss_agg_mode,
               importance_sampling_level=importance_sampling_level)
    ref.validate_policy_loss_inputs(old_logp, old_logp, advantages, mask, **ppo, **loss_type_knobs,
                                    entropy_in_head=True)
    kw = {**ref.LOSS_TYPE_DEFAULTS, **loss_type_knobs}
    with_entropy = compute_entropy or kw["entropy_coef"] != 0
    vocab, hidden_dim = weight.shape
    whole_rows_fit = t * (vocab + hidden_dim) <= SINGLE_PASS_MAX_ELEMENTS
    if vocab_chunk_size is None and (not _whole_rows(importance_sampling_level, kw["loss_type"]) or whole_rows_fit):
        grad_on = torch.is_grad_enabled()
        need = [grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias)]
        k = _op_knobs(epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode,
                      importance_sampling_level, **loss_type_knobs)
        out = fused_linear_policy_loss_fwd(
            hidden.reshape(n * t, hidden_dim), weight, targets.reshape(n * t), bias, old_logp, advantages, mask,
            ref_logp, kw["selected"], kw["entropy_mask"], float(temperature), float(epsilon_low),
            float(epsilon_high), None if dual_clip_c is None else float(dual_clip_c), float(beta), kl_estimator,
            loss_agg_mode, importance_sampling_level, kw["loss_type"], bool(kw["kl_ratio_correction"]),
            list(k.type_knobs), float(kw["entropy_coef"]), kw["entropy_agg_mode"], compute_entropy, chunk_size or 0,
            accum_dtype == torch.float32, *need)
        return PolicyLossOutput(*out[:5])
    # sequence-level ratios of rows too long for one chunk (or a vocabulary split asked for): logp chunk by
    # chunk, the loss on [N, T], then the gradient chunk by chunk in backward (logits computed twice)
    row_mask = (mask != 0).reshape(n * t)
    logp, entropy, _ = linear_logprobs_fwd(hidden.reshape(n * t, hidden.shape[2]), weight, targets.reshape(n * t),
                                           bias, row_mask, float(temperature), with_entropy, chunk_size or 0,
                                           vocab_chunk_size or 0, accum_dtype == torch.float32)
    if with_entropy:
        loss_type_knobs = {**loss_type_knobs, "entropy": entropy.view(n, t)}
    return clipped_policy_loss(logp.view(n, t), old_logp, advantages, mask, **ppo, **loss_type_knobs)
