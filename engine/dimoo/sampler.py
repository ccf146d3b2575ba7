"""DiMOO's two samplers, exact and batch-invariant: the MaskGIT cosine image sampler and LLaDA's block
low-confidence text sampler (../shared/DIMOO.md sections 2.1, 2.2), against a model-agnostic interface.

    start, uncond, pos = image_rows(ids, prompt_ids, uncond_prompt_ids, height=32, width=32)
    ro = sample_image(model_logits_fn(model, ids.image_slice), start, pos, uncond_start=uncond, seeds=seeds,
                      steps=64, cfg_scale=4.0, temperature=1.0, mask_id=ids.mask, vocab_offset=ids.image_offset)
    ro.tokens [B, L]; ro.step_map [B, P]; ro.state(t) [B, L]; ro.reveal_masks() [B, T, P]

`logits_fn(ids [B, L] long) -> [B, L, V] float` gives the logits of a vocabulary slice whose column j is token
`vocab_offset + j` (the image sampler: the 8192 codes); a pair `(cond_fn, uncond_fn)` gives the unconditional rows
their own function. The B rows of one call are the samples of ONE prompt: they share one length, so they are
batched without padding; prompts of other lengths are other calls.

Every step, for each sample b and each position p whose value is drawn, one row of `pairuni_kernels.cfg_sample`:
    z = cfg_mix(c, u, g) / T,  g = 1 + cfg_scale,  token ~ softmax(z)  (fp32 Gumbel-max)
DiMOO's image CFG `(1 + w) c - w u` and LLaDA's text CFG `u + (w + 1)(c - u)` are both `cfg_mix(c, u, 1 + w)`
(`pairuni_kernels.reference.cfg_mix`, the formula's one home); w = 0 draws from c alone (the unconditional rows
are then the conditional ones: u + 1 * (c - u) = c exactly). The row's seed is `row_seeds(seed_b, p)` and its
`step` the denoising step, so a draw depends on (sample seed, position, step) and its own logits only, never on
its batch partners. T = 0 is greedy (first argmax).

Reveal orders (`REVEAL_ORDERS`):
- `confidence` (DiMOO's / LLaDA's): values are drawn at every eligible masked position (image: all masked codes;
  text: the masked positions of the current block), conf = softmax(cfg_mix(c, u, g))[drawn] (temperature 1), and
  the step's scheduled count of positions with the largest `log conf + s * Gumbel` is revealed (ties: the lower
  position first), s = T for the image sampler (DiMOO's `mask_by_random_topk`, generation_utils.py:L48-61) and 0
  for the text sampler (LLaDA's plain top-k); the Gumbel noise is the counter stream keyed by (sample seed, step,
  position) (`confidence_noise`). DiMOO's `conf < cut_off` can reveal more than scheduled on ties (DIMOO.md
  section 4 row 3); here exactly the scheduled count is revealed.
- `random`: the reveal order is a permutation drawn from the sample's seed alone (`reveal_order`; text: within
  each block), each step reveals the scheduled count in that order and draws values at those positions only.
  The position choice then does not depend on the model, so the trajectory's probability ratio between two
  policies is exactly the product of the token probability ratios (engine/dimoo/scoring.py).

Schedules: image `cosine_schedule` (DiMOO's keep_n), text `block_schedule` (LLaDA's get_num_transfer_tokens
per block). The record (`DiffusionRollout`) holds the final rows and the step at which each position was
revealed (dLLM-RL's step_map): state t has the tokens revealed before step t and MASK elsewhere.

Not reproduced on purpose: ML-Cache (an approximation of the sampler, DIMOO.md 2.4), the global RNG and bf16 noise
(section 4 rows 3, 4), DiMOO's `assert B == 1`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pairuni_kernels.reference import cfg_mix, gumbel_from_bits, philox4x32_10

REVEAL_ORDERS = ("confidence", "random")
KINDS = ("image", "text")

# Streams keyed by a sample's seed (Philox counters (position, 0, step, stream), the layout of `cfg_random_bits`
# with step (stream << 32) + step): the stream word differs, so no two streams share a counter.
ROW_SEED_STREAM = 1
CONFIDENCE_STREAM = 2
ORDER_STREAM = 3
_MAX_STEP = 2**32

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- schedules
def cosine_schedule(n: int, steps: int) -> list[int]:
    """Tokens revealed at each of `steps` steps by DiMOO's image sampler for n masked codes
    (image_generation_generator.py:L92-96): keep_t = max(1, floor(n cos(pi/2 (t + 1) / steps))) stay masked after
    step t < steps - 1, none after the last; reveals_t = keep_{t-1} - keep_t with keep_{-1} = n (float64 cos)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < _MAX_STEP:
        raise ValueError(f"steps: expected an int in [1, 2^32), got {steps!r}")
    keep = [max(1, math.floor(n * math.cos(math.pi / 2 * (t + 1) / steps))) for t in range(steps - 1)] + [0]
    return [prev - k for prev, k in zip([n] + keep[:-1], keep)]


def block_schedule(gen_length: int, block_length: int, steps: int) -> list[int]:
    """Tokens revealed at each step by LLaDA's sampler (generate.py:L44-117; DiMOO
    text_understanding_generator.py): gen_length / block_length blocks, steps / blocks steps per block, a block's
    block_length tokens split evenly over its steps, the remainder one each to the first steps
    (get_num_transfer_tokens)."""
    for name, v in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if gen_length % block_length:
        raise ValueError(f"block_length: must divide gen_length={gen_length}, got {block_length}")
    blocks = gen_length // block_length
    if steps % blocks or steps >= _MAX_STEP:
        raise ValueError(f"steps: expected a multiple of the {blocks} blocks below 2^32, got {steps}")
    per = steps // blocks
    base, extra = divmod(block_length, per)
    return [base + (i < extra) for i in range(per)] * blocks


# ----------------------------------------------------------------------------- random streams
def _stream_words(seeds: torch.Tensor, stream: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """[B, P, 4] uint32 words (in int64): Philox4x32-10 keyed by seeds[b] at counter (positions[p], 0, step, stream),
    i.e. the words 4p .. 4p + 3 of `cfg_random_bits(seeds, (stream << 32) + step, .)` (computed at `positions`
    only)."""
    key = seeds.to(torch.int64).view(-1, 1)
    ctr = positions.to(torch.int64).view(1, -1)
    zero = torch.zeros_like(ctr)
    words = philox4x32_10((ctr, zero, zero + step, zero + stream), (key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF))
    shape = torch.broadcast_shapes(key.shape, ctr.shape)
    return torch.stack([w.expand(shape) for w in words], -1)


def _int63(words: torch.Tensor) -> torch.Tensor:
    """[..., 4] words -> [...] int64 in [0, 2^63) from words 0 (high, 31 bits) and 1 (low)."""
    return ((words[..., 0] & 0x7FFFFFFF) << 32) | words[..., 1]


def row_seeds(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] sample seeds, [P] positions -> [B, P] int64 seeds in [0, 2^63) of the rows (sample b, position p):
    two words of the sample's ROW_SEED_STREAM at counter p."""
    return _int63(_stream_words(seeds, ROW_SEED_STREAM, 0, positions))


def confidence_noise(seeds: torch.Tensor, step: int, positions: torch.Tensor) -> torch.Tensor:
    """[B, P] fp32 standard Gumbel noise of the position choice at `step`, keyed by (sample seed, step, position)
    (`gumbel_from_bits` of word 0 of the sample's CONFIDENCE_STREAM at counter (position, step))."""
    return gumbel_from_bits(_stream_words(seeds, CONFIDENCE_STREAM, step, positions)[..., 0])


def reveal_order(seeds: torch.Tensor, positions: torch.Tensor, block_length: int | None = None) -> torch.Tensor:
    """[B, P] long: a permutation of range(P) per sample, drawn from the sample's seed alone (ORDER_STREAM; 63-bit
    keys sorted, ties by index); with block_length, index i stays in block i // block_length (blocks in order)."""
    keys = _int63(_stream_words(seeds, ORDER_STREAM, 0, positions))
    order = torch.sort(keys, dim=1, stable=True).indices
    if block_length is not None:
        blocks = order // block_length
        order = order.gather(1, torch.sort(blocks, dim=1, stable=True).indices)
    return order


# ----------------------------------------------------------------------------- the record
@dataclass
class DiffusionRollout:
    """B samples of one prompt, rows of one length L, and how they were drawn.

    tokens:         [B, L] long, the final rows (every position revealed).
    positions:      [P] long, the generated columns (image: the codes, row-major, newlines excluded).
    step_map:       [B, P] long, the step at which each position was revealed (dLLM-RL's step_map).
    old_logp:       [B, P] float32, the sampler's log-prob of each revealed token at its state:
                    log softmax(cfg_mix(c, u, g) / T)[token - vocab_offset] over the slice, T = temperature (1 when
                    greedy).
    seeds:          [B] int64 sample seeds.
    start:          [L] long, the row at step 0 (MASK at `positions`).
    uncond_start:   [Lu] long or None (no CFG), the unconditional row at step 0.
    uncond_columns: [P] long, the column of position p's token in the unconditional row.
    schedule:       per step, how many positions were revealed (the same for every sample).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    step_map: torch.Tensor
    old_logp: torch.Tensor
    seeds: torch.Tensor
    start: torch.Tensor
    uncond_start: torch.Tensor | None
    uncond_columns: torch.Tensor
    schedule: list[int]
    kind: str
    order: str
    cfg_scale: float
    temperature: float
    mask_id: int
    vocab_offset: int
    vocab_size: int
    block_length: int | None = None

    @property
    def guidance_scale(self) -> float:
        """cfg_sample's / cfg_mix's scale: 1 + cfg_scale."""
        return 1.0 + self.cfg_scale

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @property
    def scoring_temperature(self) -> float:
        """The temperature the drawn tokens' log-probs are taken at: the sampler's, 1 for greedy (0)."""
        return self.temperature if self.temperature > 0 else 1.0

    def targets(self) -> torch.Tensor:
        """[B, P] long: each position's token as a column of the vocabulary slice (token - vocab_offset)."""
        return self.tokens[:, self.positions] - self.vocab_offset

    def state(self, step: int) -> torch.Tensor:
        """[B, L] the rows at the start of `step` (0..steps): tokens revealed before it, MASK elsewhere."""
        rows = self.tokens.clone()
        hidden = self.step_map >= step
        rows[:, self.positions] = torch.where(hidden, torch.full_like(hidden, self.mask_id, dtype=rows.dtype),
                                              self.tokens[:, self.positions])
        return rows

    def uncond_state(self, step: int) -> torch.Tensor | None:
        """[B, Lu] the unconditional rows at the start of `step`, or None without CFG."""
        if self.uncond_start is None:
            return None
        rows = self.uncond_start.expand(self.tokens.shape[0], -1).clone()
        rows[:, self.uncond_columns] = self.state(step)[:, self.positions]
        return rows

    def reveal_masks(self) -> torch.Tensor:
        """[B, steps, P] bool: position p revealed at step t."""
        return self.step_map[:, None, :] == torch.arange(self.steps, device=self.step_map.device)[None, :, None]


# ----------------------------------------------------------------------------- layouts
def image_rows(ids, prompt_ids: torch.Tensor, uncond_prompt_ids: torch.Tensor | None, height: int,
               width: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """DiMOO's T2I rows (DIMOO.md 1.6): (start [L], uncond_start [Lu] or None, positions [h*w]) with
    start = prompt + [BOA, BOI] + masked grid (newline after every row) + [EOI, EOA] and uncond_start = the
    `<uncondition>` prompt + the same tail from BOA on (image_generation_generator.py:L106). `ids`: a DimooIds."""
    tail = torch.cat([torch.tensor([ids.boa, ids.boi]), ids.mask_grid(height, width)[0],
                      torch.tensor([ids.eoi, ids.eoa])])
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    start = torch.cat([prompt_ids, tail])
    positions = prompt_ids.numel() + 2 + ids.code_positions(height, width)
    uncond = None
    if uncond_prompt_ids is not None:
        uncond = torch.cat([torch.as_tensor(uncond_prompt_ids, dtype=torch.long).reshape(-1), tail])
    return start, uncond, positions


def text_rows(ids, prompt_ids: torch.Tensor, gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DiMOO's answer region after a prompt (DIMOO.md 2.2): (start [L], positions [gen_length]) with
    start = prompt + [BOA] + [MASK] * gen_length + [EOA]."""
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    start = torch.cat([prompt_ids, torch.tensor([ids.boa]), torch.full((gen_length,), ids.mask),
                       torch.tensor([ids.eoa])])
    return start, prompt_ids.numel() + 1 + torch.arange(gen_length)


def model_logits_fn(model, vocab: slice | None = None) -> LogitsFn:
    """A `logits_fn` of a DimooModel: ids [B, L] -> logits [B, L, len(vocab)] (all rows attended, no padding)."""
    return lambda ids: model(ids, vocab=vocab).logits


# ----------------------------------------------------------------------------- the samplers
@torch.no_grad()
def sample_image(logits_fn: LogitsFn | Sequence[LogitsFn], start: torch.Tensor, positions: torch.Tensor, *,
                 seeds: torch.Tensor, steps: int, mask_id: int, vocab_offset: int,
                 uncond_start: torch.Tensor | None = None, cfg_scale: float = 4.0, temperature: float = 1.0,
                 order: str = "confidence") -> DiffusionRollout:
    """DiMOO's MaskGIT image sampler (`generate_image`) for B = len(seeds) samples of one prompt.

    start: [L] long row (MASK at `positions`, [P] columns); uncond_start: [Lu] long, the unconditional row, whose
    last L - min(positions) tokens are start's (the tail from BOA on), or None for no CFG (then cfg_scale must be
    0). Per step `cosine_schedule(P, steps)` positions are revealed; confidence order: DiMOO's
    `log conf + temperature * Gumbel` choice. Returns the DiffusionRollout."""
    start, positions, seeds = _check_rows(start, positions, seeds, mask_id)
    ucols = None
    if uncond_start is not None:
        uncond_start = torch.as_tensor(uncond_start, dtype=torch.long, device=start.device).reshape(-1)
        tail = start.numel() - int(positions.min())
        if uncond_start.numel() < tail or not torch.equal(uncond_start[-tail:], start[-tail:]):
            raise ValueError(f"uncond_start: must end with start's last {tail} tokens (the image tail)")
        ucols = positions - start.numel() + uncond_start.numel()
    schedule = cosine_schedule(positions.numel(), steps)
    return _denoise(logits_fn, start, positions, uncond_start, ucols, seeds, schedule, kind="image", order=order,
                    cfg_scale=cfg_scale, temperature=temperature, mask_id=mask_id, vocab_offset=vocab_offset,
                    block_length=None, choice_noise=float(temperature))


@torch.no_grad()
def sample_text(logits_fn: LogitsFn | Sequence[LogitsFn], start: torch.Tensor, positions: torch.Tensor, *,
                seeds: torch.Tensor, steps: int, block_length: int, mask_id: int, vocab_offset: int = 0,
                cfg_scale: float = 0.0, temperature: float = 0.0, order: str = "confidence") -> DiffusionRollout:
    """LLaDA's block low-confidence text sampler (DiMOO `generate_text_understanding`) for B samples of one prompt.

    start: [L] long row (MASK at `positions`, [P] = gen_length columns, blocks of block_length in that order).
    cfg_scale w > 0: LLaDA's CFG, the unconditional row = the current row with every column outside `positions`
    set to MASK, guided `u + (w + 1)(c - u)`. Confidence order: LLaDA's top-k of softmax(guided)[drawn] among the
    current block's masked positions (no noise on the choice; positions right of the block never chosen).
    The vocabulary is the caller's `logits_fn` slice from `vocab_offset`: LLaDA/DiMOO sample the full vocabulary,
    which can draw image codes or the MASK id itself (DIMOO.md section 4 row 7); a text slice avoids that."""
    start, positions, seeds = _check_rows(start, positions, seeds, mask_id)
    schedule = block_schedule(positions.numel(), block_length, steps)
    uncond_start = ucols = None
    if cfg_scale != 0:
        uncond_start = torch.full_like(start, mask_id)
        ucols = positions
    return _denoise(logits_fn, start, positions, uncond_start, ucols, seeds, schedule, kind="text", order=order,
                    cfg_scale=cfg_scale, temperature=temperature, mask_id=mask_id, vocab_offset=vocab_offset,
                    block_length=block_length, choice_noise=0.0)


def _check_rows(start, positions, seeds, mask_id):
    start = torch.as_tensor(start)
    if start.dim() != 1 or start.is_floating_point() or start.numel() == 0:
        raise ValueError(f"start: expected a non-empty 1-D integer row, got {start.dtype} {tuple(start.shape)}")
    positions = torch.as_tensor(positions, device=start.device)
    if positions.dim() != 1 or positions.is_floating_point() or positions.numel() == 0:
        raise ValueError(f"positions: expected a non-empty 1-D integer tensor, got {tuple(positions.shape)}")
    if int(positions.min()) < 0 or int(positions.max()) >= start.numel() or positions.unique().numel() != \
            positions.numel():
        raise ValueError(f"positions: expected distinct columns in [0, {start.numel()})")
    if not bool((start[positions] == mask_id).all()):
        raise ValueError(f"start: every generated position must hold the mask id {mask_id}")
    if not isinstance(seeds, torch.Tensor) or seeds.dim() != 1 or seeds.dtype != torch.int64 or seeds.numel() == 0:
        raise ValueError("seeds: expected a non-empty 1-D int64 tensor (one seed per sample)")
    return start.long(), positions.long(), seeds.to(start.device)


def _logits_at(fn: LogitsFn, rows: torch.Tensor, b_idx: torch.Tensor, cols: torch.Tensor, width: int | None):
    """fn(rows) [B, L', V] -> [R, V] float32 at (b_idx[r], cols[r]); checks the output's shape."""
    out = fn(rows)
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(rows.shape) \
            or not out.is_floating_point():
        raise ValueError(f"logits_fn: expected float logits [{rows.shape[0]}, {rows.shape[1]}, V], got "
                         f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
    if width is not None and out.shape[2] != width:
        raise ValueError(f"logits_fn: expected the same V every call ({width}), got {out.shape[2]}")
    return out[b_idx, cols].float()


def _denoise(logits_fn, start, positions, uncond_start, ucols, seeds, schedule, *, kind, order, cfg_scale,
             temperature, mask_id, vocab_offset, block_length, choice_noise) -> DiffusionRollout:
    """The loop both samplers share (see the module docstring)."""
    from pairuni_kernels import cfg_sample

    if order not in REVEAL_ORDERS:
        raise ValueError(f"order: expected one of {REVEAL_ORDERS}, got {order!r}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale: expected a finite float, got {cfg_scale!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite float >= 0 (0 = greedy), got {temperature!r}")
    if cfg_scale != 0 and uncond_start is None:
        raise ValueError("uncond_start: CFG (cfg_scale != 0) needs the unconditional row")
    if isinstance(logits_fn, (tuple, list)):
        if len(logits_fn) != 2:
            raise ValueError("logits_fn: expected a callable or a (cond_fn, uncond_fn) pair")
        cond_fn, uncond_fn = logits_fn
    else:
        cond_fn = uncond_fn = logits_fn
    use_cfg = cfg_scale != 0
    g = 1.0 + float(cfg_scale)
    n, p = seeds.numel(), positions.numel()
    device = start.device
    state = start.expand(n, -1).clone()
    ustate = uncond_start.expand(n, -1).clone() if use_cfg else None
    step_map = torch.full((n, p), -1, dtype=torch.long, device=device)
    old_logp = torch.zeros(n, p, dtype=torch.float32, device=device)
    rseeds = row_seeds(seeds, positions)
    order_idx = reveal_order(seeds, positions, block_length) if order == "random" else None
    index = torch.arange(p, device=device)
    width, done = None, 0
    for t, k in enumerate(schedule):
        if k == 0:  # nothing revealed: no draw is kept, and no stream is shared with another step
            continue
        if order == "random":
            draw = torch.zeros(n, p, dtype=torch.bool, device=device)
            draw.scatter_(1, order_idx[:, done: done + k], True)
        else:
            draw = step_map < 0
            if block_length is not None:  # LLaDA: only the current block (later blocks get -inf confidence)
                block = done // block_length
                draw &= ((index >= block * block_length) & (index < (block + 1) * block_length))[None]
        b_idx, p_idx = draw.nonzero(as_tuple=True)  # row-major: sample, then position
        cond = _logits_at(cond_fn, state, b_idx, positions[p_idx], width)
        width = cond.shape[1]
        uncond = _logits_at(uncond_fn, ustate, b_idx, ucols[p_idx], width) if use_cfg else cond
        tok, lp = cfg_sample(torch.cat([cond, uncond]), guidance_scale=g, temperature=float(temperature),
                             seeds=rseeds[b_idx, p_idx].contiguous(), step=t)
        if temperature == 0 or order == "confidence":  # log softmax(guided)[drawn] at temperature 1
            log_conf = torch.log_softmax(cfg_mix(cond, uncond, g), dim=-1).gather(1, tok[:, None])[:, 0]
            if temperature == 0:
                lp = log_conf  # a greedy draw's log-prob is taken at temperature 1
        if order == "random":
            reveal = draw
        else:
            score = torch.full((n, p), -math.inf, dtype=torch.float32, device=device)
            noise = confidence_noise(seeds, t, positions)[b_idx, p_idx] if choice_noise else 0.0
            score[b_idx, p_idx] = log_conf + choice_noise * noise
            rank = torch.sort(score, dim=1, descending=True, stable=True).indices  # ties: lower position first
            undrawn = (~draw.gather(1, rank)).to(torch.int8)
            rank = rank.gather(1, torch.sort(undrawn, dim=1, stable=True).indices)  # drawn ones first
            reveal = torch.zeros_like(draw).scatter_(1, rank[:, :k], True) & draw
        tok_grid = torch.zeros(n, p, dtype=torch.long, device=device)
        lp_grid = torch.zeros(n, p, dtype=torch.float32, device=device)
        tok_grid[b_idx, p_idx] = tok + vocab_offset
        lp_grid[b_idx, p_idx] = lp.float()
        state[:, positions] = torch.where(reveal, tok_grid, state[:, positions])
        if use_cfg:
            ustate[:, ucols] = state[:, positions]
        step_map = torch.where(reveal, t, step_map)
        old_logp = torch.where(reveal, lp_grid, old_logp)
        done += k
    if bool((step_map < 0).any()):
        raise ValueError("schedule: left positions unrevealed (a sample had fewer eligible positions than scheduled)")
    return DiffusionRollout(state, positions, step_map, old_logp, seeds, start, uncond_start if use_cfg else None,
                            ucols if use_cfg else positions, schedule, kind, order, float(cfg_scale),
                            float(temperature), int(mask_id), int(vocab_offset), int(width), block_length)
