"""The chunked linear head shared by `linear_logprobs` and `fused_linear_policy_loss`: never the [M, V] logits.

    logp[i] = log_softmax((hidden[i] @ weight.T + bias) / temperature)[targets[i]]

Holds the layers below the ops (the ops and their fronts are in `linear_logprobs.py` and
`fused_linear_loss.py`):
  kernels     `_chunk_stats_kernel` (online max / sum-exp / target logit / entropy over one
              [rows, vocab] chunk of logits) and `_chunk_dlogits_kernel` (turns a chunk of logits
              into d loss / d logits, in place in the same buffer). One program per row, looping
              over the chunk's vocabulary in BLOCK_V tiles; int64 offsets. `kernel_variants()` lists
              every launch. CPU tensors run the same per-chunk steps with in-place torch ops.
  planners    `chunk_shape` ([rows, vocab] of one chunk of linear_logprobs) and `fused_chunk_tokens`
              (tokens per chunk of the fused loss), with `fused_chunks` / `loss_pieces` (which tokens
              each fused chunk holds and which rows its loss terms cover).
  chunk loops `_forward_impl` / `_backward_impl` (linear_logprobs, also the fused loss's fallback for
              long sequence-level rows): rows are processed a chunk at a time (and the vocabulary a
              slice at a time when asked or needed); each chunk's logits are one cuBLAS (or CPU BLAS)
              matmul into a buffer allocated once and reused, so the extra memory is one chunk buffer
              plus O(M) per-row statistics, whatever M is. Forward keeps only the per-row log-sum-exp
              (and entropy when asked); backward recomputes each chunk's logits once (the gradient
              arriving at logp is unknown until then). The helpers they use (`_row_chunks`, `_take`,
              `_valid_rows`, `_check_targets`) serve the fused loss's loop as well.
  op helper   `input_grads`: what a custom op's autograd backward returns, one entry per input of
              the op's schema.

The matmuls run in the input dtype (bf16 stays bf16 on the tensor cores, as in the unfused model);
the softmax, the entropy and the gradient of the logits are computed in fp32. `grad_weight` is
accumulated over row chunks in the weight's dtype (one rounding per row chunk) unless `accum_fp32`
(V*H*4 more bytes, one rounding in all). `PAIRUNI_BACKEND=triton` forces the kernels on CPU under
TRITON_INTERPRET=1, as the tests do.
"""

from __future__ import annotations

import bisect
import itertools
import os

import torch
import triton
import triton.language as tl

from ._backend import use_triton
from ._checks import FLOAT_DTYPES
from ._launch import KernelLaunch, unique
from .reference import compute_dtype

#: Target size of one chunk of logits, in elements (64 MiB in fp32, 32 MiB in bf16). Large enough
#: for the chunk matmuls to run at full cuBLAS speed, small next to any Janus-sized logits tensor.
CHUNK_ELEMENTS = 1 << 24
#: A chunk never takes more than this share of the free memory of its device.
FREE_MEMORY_SHARE = 1 / 16
#: Fewer rows than this makes the matmuls skinny; the vocabulary is split instead.
MIN_CHUNK_ROWS = 16
#: On a GPU each chunk matmul streams the whole [V, H] weight: it takes ~rows FLOP per byte, and
#: H100-class tensor cores need a few hundred, so CUDA chunks get at least this many rows.
CUDA_MIN_CHUNK_ROWS = 512
#: On CUDA a large batch may use chunks up to 1/CUDA_BATCH_SHARE of its whole logits (and at most
#: CUDA_MAX_CHUNK_ELEMENTS): fewer chunks means fewer read-modify-writes of the [V, H] grad_weight.
CUDA_BATCH_SHARE = 16
CUDA_MAX_CHUNK_ELEMENTS = 1 << 26
#: CPU path, low-precision inputs: the fp32 softmax work runs on row blocks of about this many
#: elements, so the fp32 temporary stays small next to the chunk buffer.
CPU_FP32_BLOCK_ELEMENTS = 1 << 21
ROW_ALIGN = 16
VOCAB_ALIGN = 256
#: Vocabulary tiles of the two kernels: one for small vocabularies, one for real heads. Each entry
#: is a compiled variant of each kernel; a tile wider than the chunk only masks lanes.
VOCAB_BLOCKS = (256, 4096)


# ============================================================================ Triton kernels
@triton.jit
def _load_scaled_logits(base, bias_ptr, cols, valid, inv_temp, HAS_BIAS: tl.constexpr):
    z = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    return z * inv_temp


@triton.jit
def _chunk_stats_kernel(
    logits_ptr, stride_row, bias_ptr, targets_ptr, v_start, n_cols,
    max_ptr, sum_ptr, tgt_ptr, ent_ptr, inv_temp,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Folds one chunk of raw logits x (columns v_start .. v_start + n_cols) into per-row
    running statistics of z = (x + b) / temperature:
        max_i = max_j z_ij,  sum_i = sum_j e^(z_ij - max_i),  tgt_i += z_i,target (if in chunk),
        ent_i = sum_j e^(z_ij - max_i) (z_ij - max_i)            (unnormalised, for the entropy)
    so that lse = max + log(sum) and entropy = log(sum) - ent / sum once every chunk is folded."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    bias_base = bias_ptr + v_start
    target = tl.load(targets_ptr + row) - v_start
    m = tl.load(max_ptr + row)
    s = tl.load(sum_ptr + row)
    e_acc = tl.load(ent_ptr + row)
    t_acc = tl.load(tgt_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        valid = cols < n_cols
        z = _load_scaled_logits(base, bias_base, cols, valid, inv_temp, HAS_BIAS)
        m_new = tl.maximum(m, tl.max(tl.where(valid, z, float("-inf")), axis=0))
        alpha = tl.exp(m - m_new)  # 0 while m is still -inf
        zc = tl.where(valid, z - m_new, 0.0)
        e = tl.where(valid, tl.exp(zc), 0.0)
        if WITH_ENTROPY:
            # re-centre the running sum of e * (z - m) on the new max: sum e'(z - m') = alpha (E + s (m - m'))
            e_acc = alpha * (e_acc + s * tl.where(s > 0, m - m_new, 0.0)) + tl.sum(e * zc, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        t_acc += tl.sum(tl.where((cols == target) & valid, z, 0.0), axis=0)
        m = m_new
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    tl.store(tgt_ptr + row, t_acc)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, e_acc)


@triton.jit
def _chunk_dlogits_kernel(
    logits_ptr, stride_row, bias_ptr, targets_ptr, v_start, n_cols,
    lse_ptr, g_logp_ptr, g_ent_ptr, ent_ptr, inv_temp,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Overwrites a chunk of raw logits x with d loss / d x, where z = (x + b) / temperature,
    p = softmax(z), g = d loss / d logp, g_H = d loss / d entropy, H = entropy:
        d loss / d z_j = g (1[j = target] - p_j) - g_H p_j (log p_j + H)
        d loss / d x_j = (d loss / d z_j) / temperature"""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    bias_base = bias_ptr + v_start
    target = tl.load(targets_ptr + row) - v_start
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_logp_ptr + row)
    if WITH_ENTROPY:
        g_h = tl.load(g_ent_ptr + row)
        h = tl.load(ent_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        valid = cols < n_cols
        log_p = _load_scaled_logits(base, bias_base, cols, valid, inv_temp, HAS_BIAS) - lse
        p = tl.exp(log_p)
        dz = tl.where((cols == target) & valid, g, 0.0) - g * p
        if WITH_ENTROPY:
            dz -= g_h * p * (log_p + h)
        tl.store(base + cols, (dz * inv_temp).to(logits_ptr.dtype.element_ty), mask=valid)


def _block_v(n_cols: int) -> int:
    return next((b for b in VOCAB_BLOCKS if b >= n_cols), VOCAB_BLOCKS[-1])


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _chunk_constexprs(c: _Chunk, with_entropy: bool) -> tuple[dict, int]:
    block = _block_v(c.logits.shape[1])
    return {"HAS_BIAS": c.bias is not None, "WITH_ENTROPY": with_entropy, "BLOCK_V": block}, _num_warps(block)


def _bias_arg(c: _Chunk) -> torch.Tensor:
    """The bias is [V]: read as float32 whatever its dtype (one variant); absent, a stand-in pointer."""
    return c.bias.to(torch.float32) if c.bias is not None else c.logits


# ============================================================================ per-chunk steps
class _Chunk:
    """Everything the per-chunk softmax steps need: which rows, which columns, the logits."""

    __slots__ = ("bias", "inv_temp", "logits", "targets", "v0")

    def __init__(self, logits, targets, bias, v0, inv_temp):
        self.logits, self.targets, self.bias, self.v0, self.inv_temp = logits, targets, bias, v0, inv_temp


def _stats_launch(c: _Chunk, mx, sm, tgt, ent, with_entropy: bool) -> KernelLaunch:
    constexprs, warps = _chunk_constexprs(c, with_entropy)
    return KernelLaunch.build(
        _chunk_stats_kernel, (c.logits.shape[0],),
        (c.logits, c.logits.stride(0), _bias_arg(c), c.targets, c.v0, c.logits.shape[1], mx, sm, tgt, ent,
         c.inv_temp), constexprs, warps)


def _stats_triton(c: _Chunk, mx, sm, tgt, ent, with_entropy: bool, preserve: bool = False) -> None:
    _stats_launch(c, mx, sm, tgt, ent, with_entropy)()


def _scaled_logits_torch(c: _Chunk, dt: torch.dtype, preserve: bool = False) -> torch.Tensor:
    """z = (x + b) / temperature in the compute dtype, in place when x already is (no new buffer)
    unless `preserve` asks to keep the chunk's logits."""
    z = c.logits if c.logits.dtype == dt and not preserve else c.logits.to(dt, copy=True)
    if c.bias is not None:
        z.add_(c.bias[c.v0:c.v0 + z.shape[1]].to(dt))
    if c.inv_temp != 1.0:
        z.mul_(c.inv_temp)
    return z


def _row_blocks(c: _Chunk, dt: torch.dtype, copy: bool = False):
    """Row blocks of a chunk for the torch path: the whole chunk when it is already in the compute
    dtype (everything happens in place), else blocks small enough for their fp32 copy."""
    rows, n_cols = c.logits.shape
    step = rows if c.logits.dtype == dt and not copy else max(1, CPU_FP32_BLOCK_ELEMENTS // n_cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield slice(r0, r1), _Chunk(c.logits[r0:r1], c.targets[r0:r1], c.bias, c.v0, c.inv_temp)


def _stats_torch(c: _Chunk, mx, sm, tgt, ent, with_entropy: bool, preserve: bool = False) -> None:
    for rs, block in _row_blocks(c, mx.dtype, copy=preserve):
        _stats_torch_block(block, mx[rs], sm[rs], tgt[rs], ent[rs], with_entropy, preserve)


def _stats_torch_block(c: _Chunk, mx, sm, tgt, ent, with_entropy: bool, preserve: bool) -> None:
    dt = mx.dtype
    z = _scaled_logits_torch(c, dt, preserve)
    n_cols = z.shape[1]
    local = c.targets - c.v0
    inside = (local >= 0) & (local < n_cols)
    tgt.add_(torch.where(inside, z.gather(1, local.clamp(0, n_cols - 1)[:, None])[:, 0], 0.0))
    m_new = torch.maximum(mx, z.amax(1))
    alpha = torch.exp(mx - m_new)
    z.sub_(m_new[:, None])  # z - m'
    if with_entropy:
        e = torch.exp(z)
        chunk_ent = torch.bmm(e[:, None, :], z[:, :, None])[:, 0, 0]
        shift = torch.where(sm > 0, sm * (mx - m_new), 0.0)
        ent.copy_(alpha * (ent + shift) + chunk_ent)
        chunk_sum = e.sum(1)
        del e
    else:
        chunk_sum = z.exp_().sum(1)
    sm.mul_(alpha).add_(chunk_sum)
    mx.copy_(m_new)


def _dlogits_launch(c: _Chunk, lse, g, g_ent, ent) -> KernelLaunch:
    with_entropy = g_ent is not None
    constexprs, warps = _chunk_constexprs(c, with_entropy)
    return KernelLaunch.build(
        _chunk_dlogits_kernel, (c.logits.shape[0],),
        (c.logits, c.logits.stride(0), _bias_arg(c), c.targets, c.v0, c.logits.shape[1], lse, g,
         g_ent if with_entropy else g, ent if with_entropy else g, c.inv_temp), constexprs, warps)


def _dlogits_triton(c: _Chunk, lse, g, g_ent, ent) -> None:
    _dlogits_launch(c, lse, g, g_ent, ent)()


def kernel_variants() -> list[KernelLaunch]:
    """Every distinct launch of the two chunk kernels: each accepted hidden (= logits) and bias dtype,
    with and without bias and entropy, a chunk width for every vocabulary tile (meta tensors)."""
    launches = []
    rows = 4
    meta = {"device": "meta"}
    for dt, bias_dt, with_bias, with_entropy, cols in itertools.product(
            FLOAT_DTYPES, FLOAT_DTYPES, (False, True), (False, True), VOCAB_BLOCKS):
        stat = [torch.empty(rows, dtype=torch.float32, **meta) for _ in range(4)]
        bias = torch.empty(cols, dtype=bias_dt, **meta) if with_bias else None
        chunk = _Chunk(torch.empty(rows, cols, dtype=dt, **meta), torch.empty(rows, dtype=torch.int64, **meta),
                       bias, 0, 1.0)
        launches.append(_stats_launch(chunk, *stat, with_entropy))
        launches.append(_dlogits_launch(chunk, stat[0], stat[1], stat[2] if with_entropy else None,
                                        stat[3] if with_entropy else None))
    return unique(launches)


def _dlogits_torch(c: _Chunk, lse, g, g_ent, ent) -> None:
    """Same math as `_chunk_dlogits_kernel`, in place on the chunk buffer."""
    for rs, block in _row_blocks(c, lse.dtype):
        _dlogits_torch_block(block, lse[rs], g[rs], None if g_ent is None else g_ent[rs],
                             None if ent is None else ent[rs])


def _dlogits_torch_block(c: _Chunk, lse, g, g_ent, ent) -> None:
    dt = lse.dtype
    z = _scaled_logits_torch(c, dt)
    n_cols = z.shape[1]
    z.sub_(lse[:, None])  # log p
    if g_ent is None:
        dz = z.exp_().mul_(-g[:, None])  # -g p
    else:
        p = torch.exp(z)
        dz = z.add_(ent[:, None]).mul_(g_ent[:, None]).add_(g[:, None]).mul_(p).neg_()  # -p (g + g_H (log p + H))
        del p
    local = c.targets - c.v0
    inside = (local >= 0) & (local < n_cols)
    dz.scatter_add_(1, local.clamp(0, n_cols - 1)[:, None], torch.where(inside, g, 0.0)[:, None])
    if c.inv_temp != 1.0:
        dz.mul_(c.inv_temp)
    if dz is not c.logits:
        c.logits.copy_(dz)


# ============================================================================ chunk planners
def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def chunk_shape(n_rows: int, vocab: int, hidden_dim: int, device: torch.device, *,
                chunk_size: int | None = None, vocab_chunk_size: int | None = None) -> tuple[int, int]:
    """(rows, vocab columns) of one chunk of logits.

    A chunk holds about CHUNK_ELEMENTS values counting the logits chunk [rows, vocab] and the
    per-chunk hidden and gradient rows [rows, H], and never more than FREE_MEMORY_SHARE of the
    device's free memory (4 bytes per element); on CUDA at least CUDA_MIN_CHUNK_ROWS rows
    when free memory allows. The vocabulary is split only when even
    MIN_CHUNK_ROWS full-vocabulary rows would not fit; `chunk_size` / `vocab_chunk_size` override.
    """
    budget = CHUNK_ELEMENTS
    if device.type == "cuda":
        budget = max(budget, CUDA_MIN_CHUNK_ROWS * (vocab + hidden_dim),
                     min(n_rows * vocab // CUDA_BATCH_SHARE, CUDA_MAX_CHUNK_ELEMENTS))
    budget = min(budget, int(_free_bytes(device) * FREE_MEMORY_SHARE) // 4)
    budget = max(budget, MIN_CHUNK_ROWS * (VOCAB_ALIGN + hidden_dim))
    if vocab_chunk_size is not None:
        cols = min(vocab, vocab_chunk_size)
    elif MIN_CHUNK_ROWS * (vocab + hidden_dim) <= budget:
        cols = vocab
    else:
        cols = max(VOCAB_ALIGN, (budget // MIN_CHUNK_ROWS - hidden_dim) // VOCAB_ALIGN * VOCAB_ALIGN)
        cols = min(cols, vocab)
    if chunk_size is not None:
        rows = chunk_size
    else:
        rows = max(MIN_CHUNK_ROWS, budget // (cols + hidden_dim) // ROW_ALIGN * ROW_ALIGN)
    return max(1, min(rows, n_rows)), max(1, cols)



#: CPU: bytes one chunk of the fused loss may hold. A fixed default: the host's free memory says little
#: about what the rest of the step still needs. 32 MiB holds ~800 tokens of a Janus image head (bf16,
#: H 2048), more than one image's logits, and chunk matmuls of hundreds of rows already run at BLAS speed.
CPU_FUSED_CHUNK_BYTES = 1 << 25
#: CUDA: a fused-loss chunk takes at most FREE_MEMORY_SHARE of the free memory and never more than this.
CUDA_FUSED_CHUNK_BYTES = 1 << 30
#: Per token besides its logits and hidden rows: running statistics, target, index, log-prob, d loss / d logp.
FUSED_TOKEN_OVERHEAD_BYTES = 64


def fused_chunk_tokens(vocab: int, hidden_dim: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens one chunk of `fused_linear_policy_loss` holds, chosen from V, H and the memory free for it.

    Each token of a chunk keeps its row of logits [V] in the input dtype, turned into d loss / d logits
    in place, its hidden row gathered from the batch and its row of grad_hidden [H] in the input dtype,
    and a few scalars. (The fp32 softmax work runs in registers on the Triton path and on row blocks of
    CPU_FP32_BLOCK_ELEMENTS on the torch path, so it does not grow with the chunk.)

        bytes per token = (V + 2 H) * itemsize + FUSED_TOKEN_OVERHEAD_BYTES

    Budget: on CUDA FREE_MEMORY_SHARE of the free memory (`torch.cuda.mem_get_info`), at most
    CUDA_FUSED_CHUNK_BYTES; on CPU the fixed CPU_FUSED_CHUNK_BYTES. Tokens = budget // bytes per token,
    rounded down to ROW_ALIGN, at least MIN_CHUNK_ROWS (on CUDA at least CUDA_MIN_CHUNK_ROWS, so that the
    matmuls are not skinny, or as many as half the free memory holds if that is fewer).

    Example: Janus-Pro-7B's image head (V 16384, H 4096, bf16) with 60 GB free: 49216 bytes per token,
    budget 1 GiB -> 21808 tokens per chunk (37 images of 576 tokens).
    """
    per_token = (vocab + 2 * hidden_dim) * dtype.itemsize + FUSED_TOKEN_OVERHEAD_BYTES
    floor = MIN_CHUNK_ROWS
    if device.type == "cuda":
        free = _free_bytes(device)
        budget = min(int(free * FREE_MEMORY_SHARE), CUDA_FUSED_CHUNK_BYTES)
        floor = max(floor, min(CUDA_MIN_CHUNK_ROWS, free // 2 // per_token // ROW_ALIGN * ROW_ALIGN))
    else:
        budget = CPU_FUSED_CHUNK_BYTES
    return max(floor, budget // per_token // ROW_ALIGN * ROW_ALIGN)


def fused_chunks(row_tokens: list[int], chunk_tokens: int, *, whole_rows: bool) -> list[tuple[int, int]]:
    """[c0, c1) ranges of the computed tokens (row-major, row r holding row_tokens[r]), one per chunk.

    Chunks hold `chunk_tokens` tokens each (the last one fewer) and cut rows anywhere; with
    `whole_rows` they end on row ends instead, holding as many whole rows as fit and at least one
    (sequence-level ratios need every log-prob of a row before any of its gradients)."""
    total = sum(row_tokens)
    if not whole_rows:
        return [(c0, min(total, c0 + chunk_tokens)) for c0 in range(0, total, chunk_tokens)]
    chunks, c0, c1 = [], 0, 0
    for count in row_tokens:
        if c1 > c0 and c1 + count - c0 > chunk_tokens:
            chunks.append((c0, c1))
            c0 = c1
        c1 += count
    if c1 > c0:
        chunks.append((c0, c1))
    return chunks


def loss_pieces(starts: list[int], c0: int, c1: int, *, split_rows: bool) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first token, end token) of the pieces whose loss terms chunk [c0, c1) computes.

    starts: [N + 1] first computed token of each row (starts[N] = all tokens). One piece: the rows the
    chunk touches. With `split_rows` a row the chunk holds only part of is a piece of its own, and
    consecutive whole rows share one piece."""
    s0 = bisect.bisect_right(starts, c0) - 1  # the row holding token c0 (after any empty rows starting there)
    s1 = bisect.bisect_left(starts, c1)  # rows starting before c1
    if not split_rows:
        return [(s0, s1, c0, c1)]
    pieces: list[tuple[int, int, int, int, bool]] = []
    for s in range(s0, s1):
        a, b = max(starts[s], c0), min(starts[s + 1], c1)
        whole = a == starts[s] and b == starts[s + 1]
        if whole and pieces and pieces[-1][4]:
            pieces[-1] = (pieces[-1][0], s + 1, pieces[-1][2], b, True)
        else:
            pieces.append((s, s + 1, a, b, whole))
    return [p[:4] for p in pieces if p[3] > p[2]]  # an empty row between two cut ones holds no token



# ============================================================================ chunk loops
def _row_chunks(n_rows: int, rows: int, row_index: torch.Tensor | None):
    """Yields (slice or index tensor, number of rows): contiguous slices unless rows are gathered."""
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        yield (slice(r0, r1) if row_index is None else row_index[r0:r1]), r1 - r0


def _take(x: torch.Tensor, sel) -> torch.Tensor:
    return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)


def _valid_rows(row_mask: torch.Tensor | None, n_rows: int) -> tuple[torch.Tensor | None, int]:
    """Indices of the rows to compute (None: all of them) and their count. One host sync."""
    if row_mask is None:
        return None, n_rows
    index = row_mask.reshape(-1).nonzero().squeeze(1)
    if index.numel() == n_rows:
        return None, n_rows
    return index, index.numel()


def _check_targets(targets: torch.Tensor, vocab: int) -> None:
    if targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())  # one host sync: a bad id must fail loudly, not read OOB
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"targets: expected token ids in [0, {vocab}) (weight has {vocab} rows), got {bad}")


def _stat_dtype(x: torch.Tensor, triton_path: bool) -> torch.dtype:
    return torch.float32 if triton_path else compute_dtype(x.dtype)


def _forward_impl(hidden, weight, targets, bias, row_mask, temperature, return_entropy, chunk_size,
                  vocab_chunk_size):
    n_rows, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    out_dt = compute_dtype(hidden.dtype)
    fast = use_triton(hidden)
    dt = _stat_dtype(hidden, fast)
    row_index, n_valid = _valid_rows(row_mask, n_rows)
    tg = targets if row_index is None else targets.index_select(0, row_index)
    _check_targets(tg, vocab)
    tg = tg.to(torch.int64)
    lse = torch.zeros(n_rows, dtype=dt, device=hidden.device)
    logp = torch.zeros(n_rows, dtype=out_dt, device=hidden.device)
    entropy = torch.zeros(n_rows if return_entropy else 0, dtype=out_dt, device=hidden.device)
    if n_valid == 0:
        return logp, entropy, lse
    rows, cols = chunk_shape(n_valid, vocab, hidden_dim, hidden.device, chunk_size=chunk_size or None,
                             vocab_chunk_size=vocab_chunk_size or None)
    buf = torch.empty(rows * cols, dtype=hidden.dtype, device=hidden.device)
    inv_temp = 1.0 / temperature
    stats_step = _stats_triton if fast else _stats_torch
    for k, (sel, m) in enumerate(_row_chunks(n_valid, rows, row_index)):
        h = _take(hidden, sel)
        t = tg[k * rows:k * rows + m]
        mx = torch.full((m,), float("-inf"), dtype=dt, device=hidden.device)
        sm = torch.zeros(m, dtype=dt, device=hidden.device)
        tgt = torch.zeros(m, dtype=dt, device=hidden.device)
        ent = torch.zeros(m, dtype=dt, device=hidden.device)
        for v0 in range(0, vocab, cols):
            n = min(cols, vocab - v0)
            logits = buf[:m * n].view(m, n)
            torch.mm(h, weight[v0:v0 + n].t(), out=logits)
            stats_step(_Chunk(logits, t, bias, v0, inv_temp), mx, sm, tgt, ent, return_entropy)
        row_lse = mx + torch.log(sm)
        if row_index is None:
            lse[sel] = row_lse
            logp[sel] = (tgt - row_lse).to(out_dt)
            if return_entropy:
                entropy[sel] = (torch.log(sm) - ent / sm).to(out_dt)
        else:
            lse.index_copy_(0, sel, row_lse)
            logp.index_copy_(0, sel, (tgt - row_lse).to(out_dt))
            if return_entropy:
                entropy.index_copy_(0, sel, (torch.log(sm) - ent / sm).to(out_dt))
    return logp, entropy, lse


def _backward_impl(grad_logp, grad_entropy, hidden, weight, targets, bias, row_mask, lse, entropy,
                   temperature, chunk_size, vocab_chunk_size, accum_fp32, need_hidden, need_weight, need_bias):
    n_rows, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    fast = use_triton(hidden)
    dt = lse.dtype
    grad_hidden = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight) if need_weight else weight.new_empty(0)
    # fp32 accumulation of grad_weight over row chunks costs V*H*4 bytes; otherwise it is
    # accumulated in the weight's dtype (one rounding per row chunk, as Liger's default)
    accum_fp32 = accum_fp32 and need_weight and weight.dtype not in (torch.float32, torch.float64)
    grad_weight_acc = torch.zeros_like(weight, dtype=torch.float32) if accum_fp32 else grad_weight
    grad_bias_acc = torch.zeros(vocab, dtype=dt, device=hidden.device) if need_bias else None
    row_index, n_valid = _valid_rows(row_mask, n_rows)
    if n_valid == 0 or not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight, (grad_bias_acc.to(bias.dtype) if need_bias else hidden.new_empty(0))
    tg = (targets if row_index is None else targets.index_select(0, row_index)).to(torch.int64)
    rows, cols = chunk_shape(n_valid, vocab, hidden_dim, hidden.device, chunk_size=chunk_size or None,
                             vocab_chunk_size=vocab_chunk_size or None)
    buf = torch.empty(rows * cols, dtype=hidden.dtype, device=hidden.device)
    split_vocab = cols < vocab
    gh_acc = None
    direct = row_index is None and not split_vocab  # grad rows written straight into grad_hidden
    if need_hidden and not direct:
        gh_acc = torch.empty(rows, hidden_dim, dtype=dt if split_vocab else hidden.dtype, device=hidden.device)
    inv_temp = 1.0 / temperature
    dlogits_step = _dlogits_triton if fast else _dlogits_torch
    with_entropy = grad_entropy is not None
    for k, (sel, m) in enumerate(_row_chunks(n_valid, rows, row_index)):
        h = _take(hidden, sel)
        t = tg[k * rows:k * rows + m]
        row_lse = _take(lse, sel).contiguous()
        g = _take(grad_logp, sel).to(dt).contiguous()
        g_ent = _take(grad_entropy, sel).to(dt).contiguous() if with_entropy else None
        h_ent = _take(entropy, sel).to(dt).contiguous() if with_entropy else None
        gh = None
        if need_hidden:
            gh = grad_hidden[sel] if direct else gh_acc[:m]
            if split_vocab:
                gh.zero_()
        for v0 in range(0, vocab, cols):
            n = min(cols, vocab - v0)
            w = weight[v0:v0 + n]
            dlogits = buf[:m * n].view(m, n)
            torch.mm(h, w.t(), out=dlogits)
            dlogits_step(_Chunk(dlogits, t, bias, v0, inv_temp), row_lse, g, g_ent, h_ent)
            if need_hidden:
                if split_vocab:
                    gh.add_(torch.mm(dlogits, w).to(dt))
                else:
                    torch.mm(dlogits, w, out=gh)
            if accum_fp32:  # slabs of VOCAB_ALIGN*4 rows keep the low-precision temporary small
                for s0 in range(0, n, 4 * VOCAB_ALIGN):
                    s1 = min(n, s0 + 4 * VOCAB_ALIGN)
                    grad_weight_acc[v0 + s0:v0 + s1] += torch.mm(dlogits[:, s0:s1].t(), h)
            elif need_weight:
                grad_weight[v0:v0 + n].addmm_(dlogits.t(), h)
            if need_bias:
                grad_bias_acc[v0:v0 + n] += dlogits.sum(0, dtype=dt)
        if need_hidden and not direct:
            if row_index is None:
                grad_hidden[sel] = gh.to(hidden.dtype)
            else:
                grad_hidden.index_copy_(0, sel, gh.to(hidden.dtype))
    grad_bias = grad_bias_acc.to(bias.dtype) if need_bias else hidden.new_empty(0)
    if accum_fp32:
        grad_weight.copy_(grad_weight_acc)
    return grad_hidden, grad_weight, grad_bias



# ============================================================================ op helper
def input_grads(op, **grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """What the autograd backward of the custom op `op` returns: one entry per input of its schema, in
    order, holding the gradient passed under that input's name and None (no gradient) for every other
    input, so the count of Nones follows the op's argument list."""
    names = [arg.name for arg in op._opoverload._schema.arguments]
    unknown = sorted(set(grads) - set(names))
    if unknown:
        raise TypeError(f"{op._qualname} has no input named {unknown}")
    return tuple(grads.get(name) for name in names)
