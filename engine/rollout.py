"""Rollouts: G sampled answers per question, G CFG-sampled images per prompt, with old log-probs.

Both loops are the engine's own: prefill once into a static KV cache, then one token per step.
Every draw goes through `pairuni_kernels.cfg_sample` with one seed per rollout, so a rollout's
tokens depend on (seed, step, row seed) only, never on which other rows share the batch.

- Understanding: rows are [B] prompts (image placeholders filled with vision features). Text
  sampling reuses `cfg_sample` with the logits stacked as [c; c] and guidance 1, which gives
  `z = c` exactly; the recorded log-prob is that of `softmax(c / temperature)`.
- Generation: the batch is [cond; uncond] (2B rows, "blocked" layout). The unconditional prompt
  replaces every token except BOS and begin-of-image by the pad token and keeps the attention mask,
  as transformers' and the official Janus code do. Each of the K image-token steps is one
  `cfg_sample` over the [2B, V_img] logits. The recorded old log-prob is, by default, that of the
  conditional branch `log softmax(c / T)` (T2I-R1 / PairUni); `image_logprob="cfg"` records the
  guided distribution's.

The trainer scores these rollouts again, teacher-forced and differentiable: engine/policy.py.
Positions count attended tokens only (left padding gets none), unlike transformers' image
`generate`, which counts pads; the two agree on unpadded prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import StaticCache

from pairuni_kernels.reference import cfg_mix

from . import model as janus
from .policy import IMAGE_LOGPROBS
from .seeds import rollout_stream


# ----------------------------------------------------------------------------- batches
@dataclass
class UnderstandingRollout:
    """B = P * G rows, row `p * G + g` is answer g to question p.

    prompt_ids:    [B, Lp] long, left-padded prompts with image placeholders.
    prompt_mask:   [B, Lp] long, 1 on real tokens.
    pixel_values:  [B, 3, S, S] float or None.
    response_ids:  [B, T] long, sampled tokens (after EOS: whatever was sampled, masked out).
    response_mask: [B, T] bool, tokens up to and including the first EOS.
    old_logp:      [B, T] float32, log-prob of each sampled token under the rollout policy.
    texts:         B decoded answers (up to EOS).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logp: torch.Tensor
    texts: list[str]
    temperature: float


@dataclass
class GenerationRollout:
    """B = P * G rows, row `p * G + g` is image g for prompt p.

    prompt_ids:   [B, Lp] long, left-padded conditional prompts ending in begin-of-image.
    uncond_ids:   [B, Lp] long, the unconditional prompts.
    prompt_mask:  [B, Lp] long.
    image_tokens: [B, K] long, VQ codebook ids.
    old_logp:     [B, K] float32.
    images:       [B, 3, S, S] float in [0, 1], or None when not decoded.
    """

    prompt_ids: torch.Tensor
    uncond_ids: torch.Tensor
    prompt_mask: torch.Tensor
    image_tokens: torch.Tensor
    old_logp: torch.Tensor
    images: torch.Tensor | None
    cfg_scale: float
    temperature: float
    image_logprob: str


def rollout_seeds(seed: int, step: int, stream: str, n: int) -> torch.Tensor:
    """[n] int64 seeds, one per rollout, a pure function of (seed, step, stream) (`engine.seeds`)."""
    g = torch.Generator().manual_seed(rollout_stream(seed, step, stream))
    return torch.randint(0, 2**62, (n,), generator=g, dtype=torch.int64)


def uncond_prompt(prompt_ids: torch.Tensor, *, bos: int, boi: int, pad: int) -> torch.Tensor:
    """Every token but BOS and begin-of-image replaced by pad (the CFG unconditional prompt)."""
    keep = (prompt_ids == bos) | (prompt_ids == boi)
    return torch.where(keep, prompt_ids, torch.full_like(prompt_ids, pad))


def _static_cache(model, max_len: int) -> StaticCache:
    """KV cache preallocated (lazily, at the first layer call) for `max_len` positions per row."""
    return StaticCache(config=model.config.text_config, max_cache_len=max_len)


# Text answers: `done.all()` is read on the host once per this many tokens, not every token.
# Tokens past the point where every row has ended are dropped, so the result does not depend on it.
STOP_CHECK_EVERY = 8


def distinct_rows(*tensors: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first [U], inverse [B]) long: the first row of each distinct row of `tensors` taken together
    (equal bytes in every tensor), in order of appearance, and for each row the index of its
    distinct row, so that `first[inverse]` maps every row to an identical one. Reads the rows on the host."""
    rows = [t.reshape(t.shape[0], -1).contiguous().view(torch.uint8).cpu() for t in tensors if t is not None]
    seen: dict[tuple, int] = {}
    first, inverse = [], []
    for r in range(rows[0].shape[0]):
        key = tuple(t[r].numpy().tobytes() for t in rows)
        if key not in seen:
            seen[key] = len(first)
            first.append(r)
        inverse.append(seen[key])
    device = tensors[0].device
    return torch.tensor(first, device=device), torch.tensor(inverse, device=device)


def shared_prefill(model, embeds: torch.Tensor, prompt_mask: torch.Tensor, inverse: torch.Tensor, max_len: int):
    """Prefill the U distinct prompts once and copy each one's KV cache to its rows.

    embeds: [U, Lp, H] and prompt_mask: [U, Lp] of the distinct rows; inverse: [B] row -> distinct row.
    Returns (cache with B rows, last hidden state [B, H], next position [B]).
    """
    cache = _static_cache(model, max_len)
    pos = janus.positions_from_mask(prompt_mask)
    h = janus.policy_hidden(model, embeds, prompt_mask, pos, cache)[:, -1]
    if inverse.numel() != embeds.shape[0]:
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, inverse)
            layer.values = layer.values.index_select(0, inverse)
            layer.batch_size = inverse.numel()
            torch._dynamo.mark_static_address(layer.keys)  # a compiled decode step sees fixed buffers
            torch._dynamo.mark_static_address(layer.values)
    return cache, h[inverse], pos[inverse, -1] + 1


def _text_decode(model, tokens: torch.Tensor, full_mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    """One text step: [B] tokens at positions [B] -> [B, V] logits. Static shapes: the mask is always
    the full-length one (the cache masks positions not yet written), so it can be compiled once."""
    e = model.get_input_embeddings()(tokens[:, None])
    return janus.text_logits(model, janus.policy_hidden(model, e, full_mask, pos[:, None], cache)[:, -1])


def _image_decode(model, tokens: torch.Tensor, full_mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    """One CFG image step: [B] tokens fed to both branches at positions [2B] -> [2B, V_img] logits."""
    e = janus.image_token_embeddings(model, torch.cat([tokens, tokens])[:, None])
    return model.model.generation_head(janus.policy_hidden(model, e, full_mask, pos[:, None], cache)[:, -1]).float()


_COMPILED: dict = {}


def decode_step(fn, device: torch.device, compile: bool):
    """`fn` itself, or compiled once per process: CUDA graphs on CUDA (reduce-overhead), inductor on CPU."""
    if not compile:
        return fn
    mode = "reduce-overhead" if device.type == "cuda" else None
    if (fn, mode) not in _COMPILED:
        _COMPILED[fn, mode] = torch.compile(fn, mode=mode, dynamic=False)
    return _COMPILED[fn, mode]


def sample_text_tokens(logits: torch.Tensor, *, temperature: float, seeds: torch.Tensor, step: int):
    """[B, V] logits -> (tokens [B], logp [B]) drawn from softmax(logits / temperature) by `cfg_sample`;
    logp is scored at `scoring_temperature` (1 when greedy), in the same pass as the draw."""
    from pairuni_kernels import cfg_sample

    logits = logits.float()
    tokens, _, logp = cfg_sample(torch.cat([logits, logits]), guidance_scale=1.0, temperature=temperature,
                                 seeds=seeds, step=step, cond_logprobs=True)
    return tokens, logp


# ----------------------------------------------------------------------------- understanding
@torch.no_grad()
def rollout_understanding(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          pixel_values: torch.Tensor | None, *, max_new_tokens: int, temperature: float,
                          seeds: torch.Tensor, decode_text=None, compile: bool = False) -> UnderstandingRollout:
    """Sample one answer per row (rows already repeated G times), with per-token old log-probs.

    Stops early once every row has produced EOS (checked every `STOP_CHECK_EVERY` tokens);
    `response_ids` then has fewer than `max_new_tokens` columns. `compile`: the decode step
    through `torch.compile` (see `decode_step`).
    """
    ids = janus.special_ids(model)
    b, lp = prompt_ids.shape
    device = prompt_ids.device
    first, inverse = distinct_rows(prompt_ids, prompt_mask, pixel_values)
    embeds = janus.text_embeddings(model, prompt_ids[first], None if pixel_values is None else pixel_values[first])
    cache, h, next_pos = shared_prefill(model, embeds, prompt_mask[first], inverse, lp + max_new_tokens)
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(b, max_new_tokens)], 1)
    step_fn = decode_step(_text_decode, device, compile)
    seeds = seeds.to(device)
    tokens = torch.empty(b, max_new_tokens, dtype=torch.long, device=device)
    logps = torch.empty(b, max_new_tokens, dtype=torch.float32, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    mask = torch.zeros(b, max_new_tokens, dtype=torch.bool, device=device)
    logits = janus.text_logits(model, h)
    for t in range(max_new_tokens):
        tok, lpr = sample_text_tokens(logits, temperature=temperature, seeds=seeds, step=t)
        tokens[:, t], logps[:, t] = tok, lpr
        mask[:, t] = ~done
        done = done | (tok == ids["eos"])
        if t == max_new_tokens - 1 or ((t + 1) % STOP_CHECK_EVERY == 0 and bool(done.all())):
            break
        logits = step_fn(model, tok, full_mask, next_pos, cache)
        next_pos = next_pos + 1
    length = int(mask.any(0).sum())  # columns up to the step where the last row ended
    tokens, logps, mask = tokens[:, :length], logps[:, :length], mask[:, :length]
    texts = [""] * b
    if decode_text is not None:
        texts = [decode_text(tokens[i][mask[i]].tolist()) for i in range(b)]
    return UnderstandingRollout(prompt_ids, prompt_mask, pixel_values, tokens, mask, logps, texts, temperature)


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def rollout_generation(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, cfg_scale: float,
                       temperature: float, seeds: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                       image_logprob: str = "cond", decode: bool = True, compile: bool = False) -> GenerationRollout:
    """CFG image rollouts: K image tokens per row (rows already repeated G times).

    Each distinct prompt (conditional or unconditional: the unconditional prompts of equally padded
    prompts are all the same) is prefilled once. The image loop never reads a device value on the
    host, so on CUDA with `compile` its decode step replays a captured graph.
    """
    from pairuni_kernels import cfg_sample

    if image_logprob not in IMAGE_LOGPROBS:
        raise ValueError(f"image_logprob: expected one of {IMAGE_LOGPROBS}, got {image_logprob!r}")
    ids = janus.special_ids(model)
    b, lp = prompt_ids.shape
    device = prompt_ids.device
    k_img = janus.image_token_count(model)
    uncond = uncond_prompt(prompt_ids, bos=ids["bos"], boi=ids["boi"], pad=ids["pad"])
    both_ids = torch.cat([prompt_ids, uncond])
    both_mask = torch.cat([prompt_mask, prompt_mask])
    first, inverse = distinct_rows(both_ids, both_mask)
    embeds = model.get_input_embeddings()(both_ids[first])
    cache, h, next_pos = shared_prefill(model, embeds, both_mask[first], inverse, lp + k_img)
    full_mask = torch.cat([both_mask, both_mask.new_ones(2 * b, k_img)], 1)
    step_fn = decode_step(_image_decode, device, compile)
    seeds = seeds.to(device)
    greedy_cfg = image_logprob == "cfg" and temperature == 0
    tokens = torch.empty(b, k_img, dtype=torch.long, device=device)
    logps = torch.empty(b, k_img, dtype=torch.float32, device=device)
    logits = model.model.generation_head(h).float()  # [2B, V_img]
    for k in range(k_img):
        tok, lpr, cond_lpr = cfg_sample(logits, guidance_scale=cfg_scale, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seeds=seeds, step=k, layout="blocked", cond_logprobs=True)
        if image_logprob == "cond":
            lpr = cond_lpr
        elif greedy_cfg:  # a greedy draw's own log-prob is 0: score the guided softmax at temperature 1
            guided = cfg_mix(logits[:b], logits[b:], cfg_scale)
            lpr = torch.log_softmax(guided, -1).gather(-1, tok[:, None])[:, 0]
        tokens[:, k], logps[:, k] = tok, lpr
        if k == k_img - 1:
            break
        logits = step_fn(model, tok, full_mask, next_pos, cache)
        next_pos = next_pos + 1
    images = janus.decode_images(model, tokens) if decode else None
    return GenerationRollout(prompt_ids, uncond, prompt_mask, tokens, logps, images, cfg_scale, temperature,
                             image_logprob)


# ----------------------------------------------------------------------------- batching
def concat_rollouts(parts: list):
    """Rollouts of consecutive row chunks (same padded prompt width) joined along rows."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for f in dataclasses.fields(parts[0]):
        vals = [getattr(p, f.name) for p in parts]
        if isinstance(vals[0], torch.Tensor):
            if vals[0].dim() >= 2:  # answers of chunks that stopped early: right-pad (masked) to one width
                width = max(v.shape[1] for v in vals)
                vals = [F.pad(v, (0, 0) * (v.dim() - 2) + (0, width - v.shape[1])) for v in vals]
            out[f.name] = torch.cat(vals)
        elif isinstance(vals[0], list):
            out[f.name] = [x for v in vals for x in v]
        else:
            out[f.name] = vals[0]
    return type(parts[0])(**out)


def row_chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` of `n` rows (size 0: one slice of all rows)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def generation_rollouts(model, prompts, captions: list[str], seeds: torch.Tensor, settings, *,
                        device: torch.device, decode: bool | None = None) -> GenerationRollout:
    """CFG image rollouts of `captions` (one row each, rows already repeated G times; seeds [B], one per row)
    with the `rollout.*` settings (`engine.config.RolloutConfig`), in row chunks of `settings.max_batch`.
    decode: VQ-decode the images (None: settings.decode_images)."""
    r = settings
    decode = r.decode_images if decode is None else decode
    ids, mask = prompts.generation(captions)
    return concat_rollouts([rollout_generation(
        model, ids[c].to(device), mask[c].to(device), cfg_scale=r.cfg_scale, temperature=r.image_temperature,
        top_k=r.image_top_k, top_p=r.image_top_p, seeds=seeds[c], image_logprob=r.image_logprob,
        decode=decode, compile=r.compile) for c in row_chunks(len(captions), r.max_batch)])


def answer_questions(model, prompts, images: torch.Tensor, questions: list[str], *, max_new_tokens: int) -> list[str]:
    """The policy's greedy answers to `questions` about `images` [B, 3, S, S] (rewards that ask the policy)."""
    device = next(model.parameters()).device
    ids, mask, pv = prompts.understanding(questions, images.cpu())
    ro = rollout_understanding(model, ids.to(device), mask.to(device), pv.to(device, model.dtype),
                               max_new_tokens=max_new_tokens, temperature=0.0,
                               seeds=torch.zeros(len(questions), dtype=torch.long), decode_text=prompts.decode)
    return ro.texts
