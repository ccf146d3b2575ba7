"""The Lumina-DiMOO transformer (LLaDA-8B architecture) in plain torch, with the released parameter names.

    model = DimooModel.from_pretrained(path, dtype="bfloat16", device="cuda")   # a Lumina-DiMOO folder
    out = model(input_ids, attention_mask, vocab=model.ids.image_slice)       # logits [B, L, 8192]
    h = model.hidden_states(input_ids, attention_mask)                          # [B, L, H] after ln_f
    W = model.head_weight(model.ids.image_slice)                                # [8192, H]: logits = h @ W.T

Architecture (../shared/DIMOO.md section 1.3; Lumina-DiMOO@81344e6:model/modeling_llada.py): token embedding
`wte`; `n_layers` LLaMA-style blocks, each
    x = x + attn_out(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),  n = attn_norm(x)
    x = x + ff_out(silu(ff_proj(n)) * up_proj(n)),                         n = ff_norm(x)
bidirectional attention (no causal mask), RMSNorm `weight * (x / sqrt(mean(x^2) + eps))` computed in fp32, a
final `ln_f` and an untied output projection `ff_out` [V] modeling_llada.py:L856-972, L1097-1131; no biases.
State-dict names (DIMOO.md section 1.3) are exactly the released ones:

    model.transformer.wte.weight                              [V, H]
    model.transformer.blocks.{i}.attn_norm.weight, .ff_norm.weight   [H]
    model.transformer.blocks.{i}.q_proj.weight [H, H]; k_proj, v_proj [n_kv_heads * H / n_heads, H]
    model.transformer.blocks.{i}.attn_out.weight [H, H]
    model.transformer.blocks.{i}.ff_proj.weight, .up_proj.weight [M, H]; .ff_out.weight [H, M]
    model.transformer.ln_f.weight [H]; model.transformer.ff_out.weight [V, H]

Two deliberate differences from the released code (DIMOO.md section 4, rows 1 and 14):
- the padding mask is REAL: a key whose `attention_mask` is 0 is never attended (the released
  `_scaled_dot_product_attention` drops its `attention_bias`, so batched rows attend their right padding);
- nothing global is set (the released constructor flips `torch.backends.cuda.enable_*_sdp`).

RoPE: OLMo/LLaDA's `RotaryEmbedding` as read in OLMo-family code of the index (not in DiMOO's own file, which
DIMOO.md does not quote): inv_freq = theta^(-2j/d) in fp32, angles = pos * inv_freq repeated twice ([f, f]),
rotate_half splits the head in two halves: (x1, x2) -> (-x2, x1); applied in fp32 (`rope_full_precision`) and
cast back. Positions are 0..L-1 for every row, as released (DiMOO right-pads, so a row's positions do not
depend on its padding); `position_ids` may override them.

Attention backends: `sdpa` (torch's scaled_dot_product_attention with a boolean key mask) everywhere;
`flash_varlen` (flash_attn_varlen_func on the unpadded tokens) when flash-attn is importable, the tensors
are on CUDA and in fp16/bf16. `attention_backend()` picks; both attend exactly the unmasked keys.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .ids import DIMOO_IDS, DimooIds

log = logging.getLogger("pairuni.dimoo")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
SAFETENSORS_INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DimooConfig:
    """The LLaDAConfig fields the network reads, under their config.json names (DIMOO.md section 1.3).

    Defaults are Lumina-DiMOO's: d_model 4096 [V] train.py:L183; n_layers / n_heads / n_kv_heads 32,
    mlp_hidden_size 12288, rms_norm_eps 1e-5, rope_theta 500000 [I] LLaDA-8B; vocab_size = embedding_size =
    134548 [I] (126356 text ids + 8192 codes); mask_token_id 126336 [V]; eos/pad 126081 [I] LLaDA-8B;
    max_sequence_length 5120 [V] DiMOO train.sh:L9 (LLaDA-8B's config says 4096 [I]; positions are not limited
    by it here, RoPE has no table). `codebook_size` is not a LLaDAConfig key: the image codes are the last
    `codebook_size` ids of `embedding_size` (DiMOO's `vocab_offset = logits.size(-1) - 8192`)."""

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 134548
    embedding_size: int | None = 134548
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 5120
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    codebook_size: int = 8192

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size", "codebook_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads: d_model={self.d_model} must split into heads of even size, got {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads: must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        if self.vocab_rows < self.vocab_size:  # modeling_llada.py:L1075-1082 raises the same
            raise ValueError(f"embedding_size: must be >= vocab_size={self.vocab_size}, got {self.embedding_size}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def vocab_rows(self) -> int:
        """Rows of wte and ff_out = logits width: embedding_size, or vocab_size when null."""
        return self.embedding_size or self.vocab_size

    def ids(self) -> DimooIds:
        """The id layout: the released one for the released vocabulary, else the compact tiny layout."""
        if self.vocab_rows == DIMOO_IDS.vocab_size and self.codebook_size == DIMOO_IDS.codebook_size:
            layout = DIMOO_IDS
        else:
            layout = DimooIds.compact(self.vocab_rows - 9 - self.codebook_size, self.codebook_size)
        if layout.mask != self.mask_token_id:
            raise ValueError(f"mask_token_id: {self.mask_token_id} fits neither the released DiMOO id layout nor the "
                             f"compact one (mask {layout.mask} for embedding_size {self.vocab_rows})")
        return layout

    # ------------------------------------------------------------------ config.json
    def to_json_dict(self) -> dict:
        """A config.json in the released key set: LLaDA-8B's config (keys and fixed values as in its Hub copy,
        [I] DIMOO.md section 1.3; `architectures`/`auto_map` [U]: chosen `LLaDAModelLM` with the LLaDA
        remote-code map) with this config's sizes and DiMOO's ids; dropouts 0 (the class defaults are 0.1)."""
        d = {k: v for k, v in asdict(self).items() if k != "codebook_size"}
        d.update({
            "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
            "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                         "AutoModel": "modeling_llada.LLaDAModelLM",
                         "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
            "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "embedding_dropout": 0.0,
            "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
            "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
            "layer_norm_type": "rms", "layer_norm_with_affine": True, "mlp_ratio": 4, "model_type": "llada",
            "multi_query_attention": None, "precision": "amp_bf16", "residual_dropout": 0.0, "rope": True,
            "rope_full_precision": True, "scale_logits": False, "use_cache": False, "weight_tying": False,
            "transformers_version": "4.46.3"})
        return dict(sorted(d.items()))

    @classmethod
    def from_json_dict(cls, d: dict, *, codebook_size: int = 8192) -> DimooConfig:
        """Read a LLaDAConfig dict; settings this network does not implement are one-line ValueErrors."""
        must = {"model_type": "llada", "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
                "rope": True, "alibi": False, "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
                "scale_logits": False, "input_emb_norm": False, "attention_layer_norm": False,
                "block_group_size": 1, "bias_for_layer_norm": False, "layer_norm_with_affine": True}
        for key, want in must.items():
            if d.get(key, want) != want and not (key == "bias_for_layer_norm" and d[key] is None):
                raise ValueError(f"config.json {key}: expected {want!r} (Lumina-DiMOO), got {d[key]!r}")
        dropouts = {k: d[k] for k in ("attention_dropout", "residual_dropout", "embedding_dropout")
                    if float(d.get(k) or 0.0) != 0.0}
        if dropouts:  # DiMOO's values are [U] (the class defaults are 0.1); RL scoring must not drop anyway
            log.warning("config.json %s: this network applies no dropout", dropouts)
        if d.get("mlp_hidden_size") is None:
            d = {**d, "mlp_hidden_size": int(d.get("mlp_ratio", 4)) * int(d["d_model"])}
        names = {f.name for f in fields(cls)} - {"codebook_size"}
        missing = [k for k in ("d_model", "n_layers", "n_heads", "vocab_size") if k not in d]
        if missing:
            raise ValueError(f"config.json: missing {missing}")
        kw = {k: d[k] for k in names if k in d and (d[k] is not None or k in ("n_kv_heads", "embedding_size"))}
        return cls(**kw, codebook_size=codebook_size)


def tiny_dimoo_config(text_vocab_size: int = 128, *, codebook_size: int = 64, d_model: int = 64, n_layers: int = 2,
                      n_heads: int = 4, n_kv_heads: int | None = None, mlp_hidden_size: int | None = None,
                      rope_theta: float = 10000.0) -> DimooConfig:
    """A DiMOO small enough for the toy world on CPU, sized like the tiny Janus (hidden 64, 2 layers, MLP 2x,
    64-entry codebook, 16 codes = a 4x4 grid of 20 tokens with newlines): the compact id layout
    `DimooIds.compact(text_vocab_size, codebook_size)`, vocabulary text_vocab_size + 9 + codebook_size."""
    ids = DimooIds.compact(text_vocab_size, codebook_size)
    return DimooConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or n_heads,
                       mlp_hidden_size=mlp_hidden_size or 2 * d_model, vocab_size=ids.vocab_size,
                       embedding_size=ids.vocab_size, rope_theta=rope_theta, max_sequence_length=1024,
                       mask_token_id=ids.mask, eos_token_id=ids.endoftext, pad_token_id=ids.endoftext,
                       codebook_size=codebook_size)


def tiny_dimoo(text_vocab_size: int = 128, *, seed: int = 0, **kwargs) -> DimooModel:
    """A randomly initialised tiny DiMOO (fp32, eval mode, sdpa) of `tiny_dimoo_config(text_vocab_size, **kwargs)`;
    the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DimooModel(tiny_dimoo_config(text_vocab_size, **kwargs), attn_backend="sdpa")
    return model.eval()


# ----------------------------------------------------------------------------- pieces
class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2, -1) + eps); the normalisation in fp32, cast back, then the weight (as
    OLMo/LLaDA's RMSLayerNorm)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] integer positions -> (sin, cos) [B, 1, L, head_dim]: angle[p, j] = p * theta^(-2(j mod d/2)/d),
    computed in `dtype` (fp32 as released; fp64 for a float64 model)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim))
    freqs = positions.to(dtype)[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], -1)[:, None]
    return angles.sin(), angles.cos()


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """[B, nh, L, d] -> x * cos + rotate_half(x) * sin in the angles' dtype, cast back;
    rotate_half(x1, x2) = (-x2, x1)."""
    xf = x.to(cos.dtype)
    x1, x2 = xf.chunk(2, -1)
    return (xf * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def attention_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """`flash_varlen` when flash-attn is importable and the inputs are CUDA fp16/bf16, else `sdpa`."""
    if (torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_varlen"
    return "sdpa"


def _flash_varlen(q, k, v, key_mask):
    """q [B, nh, L, d], k/v [B, nkv, L, d], key_mask [B, L] bool -> [B, nh, L, d] (padded rows zero)."""
    from flash_attn import flash_attn_varlen_func

    b, nh, length, d = q.shape
    lens = key_mask.sum(-1, dtype=torch.int32)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    idx = key_mask.flatten().nonzero().squeeze(-1)

    def pack(t):  # [B, n, L, d] -> [T, n, d] real tokens only, in order
        return t.transpose(1, 2).reshape(b * length, t.shape[1], d).index_select(0, idx)

    out = flash_attn_varlen_func(pack(q), pack(k), pack(v), cu, cu, int(lens.max()), int(lens.max()), causal=False)
    full = out.new_zeros(b * length, nh, d).index_copy_(0, idx, out)
    return full.view(b, length, nh, d).transpose(1, 2)


class DimooBlock(nn.Module):
    """One LLaDALlamaBlock: pre-norm bidirectional attention + pre-norm SwiGLU, residuals around both."""

    def __init__(self, cfg: DimooConfig):
        super().__init__()
        h, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.attn_out = nn.Linear(h, h, bias=False)
        self.ff_proj = nn.Linear(h, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, h, bias=False)

    def attention(self, x: torch.Tensor, key_mask: torch.Tensor, rope: tuple, backend: str) -> torch.Tensor:
        """x [B, L, H] (normed) -> [B, L, H] before attn_out; key j of row b attended iff key_mask[b, j]."""
        c = self.cfg
        b, length, _ = x.shape

        def heads(t, n):
            return t.view(b, length, n, c.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x), c.n_heads), *rope)
        k = apply_rope(heads(self.k_proj(x), c.kv_heads), *rope)
        v = heads(self.v_proj(x), c.kv_heads)
        if backend == "flash_varlen":
            out = _flash_varlen(q, k, v, key_mask)
        else:
            if c.kv_heads != c.n_heads:
                rep = c.n_heads // c.kv_heads
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], is_causal=False)
        return out.transpose(1, 2).reshape(b, length, c.d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, rope: tuple, backend: str) -> torch.Tensor:
        x = x + self.attn_out(self.attention(self.attn_norm(x), key_mask, rope, backend))
        n = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(n)) * self.up_proj(n))


class _Transformer(nn.Module):
    """`LLaDAModel`: holds `transformer = ModuleDict(wte, blocks, ln_f, ff_out)` so the names match."""

    def __init__(self, cfg: DimooConfig):
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(cfg.vocab_rows, cfg.d_model),
            "blocks": nn.ModuleList(DimooBlock(cfg) for _ in range(cfg.n_layers)),
            "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            "ff_out": nn.Linear(cfg.d_model, cfg.vocab_rows, bias=False),
        })


class DimooOutput(NamedTuple):
    """logits: [B, L, V] (or [B, L, len(vocab)] for a slice) or None; hidden: [B, L, H] after ln_f or None."""

    logits: torch.Tensor | None
    hidden: torch.Tensor | None


# ----------------------------------------------------------------------------- the model
class DimooModel(nn.Module):
    """`LLaDAModelLM` / `LLaDAForMultiModalGeneration` as a plain module: `self.model.transformer...` holds the
    released parameter names. `attn_backend`: "auto" (see `attention_backend`), "sdpa" or "flash_varlen"."""

    def __init__(self, cfg: DimooConfig, attn_backend: str = "auto"):
        super().__init__()
        if attn_backend not in ("auto", "sdpa", "flash_varlen"):
            raise ValueError(f"attn_backend: expected auto, sdpa or flash_varlen, got {attn_backend!r}")
        self.config = cfg
        self.ids = cfg.ids()
        self.attn_backend = attn_backend
        self.gradient_checkpointing = False
        self.model = _Transformer(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, std) matrices (ff_out of each block and attn_out scaled by 1/sqrt(2 n_layers)), unit norms."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            elif ".blocks." in name and name.endswith(("attn_out.weight", ".ff_out.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                p.normal_(0.0, std)

    # ------------------------------------------------------------------ forward
    def _checks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids: expected an integer [B, L] tensor, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_rows):
            raise ValueError(f"input_ids: expected ids in [0, {self.config.vocab_rows})")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        if not bool(mask.any(-1).all()):
            raise ValueError("attention_mask: every row needs at least one attended token")
        return mask

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] ids (+ [B, L] 0/1 mask, 1 = real token) -> [B, L, H] final hidden states (after ln_f).

        Padded keys are never attended; padded positions still get (meaningless, finite) outputs.
        position_ids: [B, L] (default 0..L-1 for every row, as the released model)."""
        mask = self._checks(input_ids, attention_mask)
        b, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(b, length)
        elif position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids: expected shape {tuple(input_ids.shape)}, got {tuple(position_ids.shape)}")
        t = self.model.transformer
        x = t.wte(input_ids)
        rope = rope_angles(position_ids, self.config.head_dim, self.config.rope_theta,
                           torch.promote_types(x.dtype, torch.float32))
        backend = attention_backend(x.device, x.dtype) if self.attn_backend == "auto" else self.attn_backend
        if backend == "flash_varlen" and (x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16)):
            raise ValueError(f"attn_backend: flash_varlen needs CUDA fp16/bf16 weights, got {x.device} {x.dtype}")
        for block in t.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, rope, backend, use_reentrant=False)
            else:
                x = block(x, mask, rope, backend)
        return t.ln_f(x)

    def head_weight(self, vocab: slice | None = None) -> torch.Tensor:
        """[V, H] output projection (ff_out.weight), or its rows `vocab` (e.g. `ids.image_slice`: [8192, H])."""
        w = self.model.transformer.ff_out.weight
        return w if vocab is None else w[vocab]

    def logits(self, hidden: torch.Tensor, vocab: slice | None = None) -> torch.Tensor:
        """[..., H] -> [..., V] (or [..., len(vocab)]) logits in the hidden states' dtype."""
        return F.linear(hidden, self.head_weight(vocab))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                vocab: slice | None = None, position_ids: torch.Tensor | None = None,
                return_logits: bool = True, return_hidden: bool = False) -> DimooOutput:
        """DimooOutput(logits [B, L, V] or [B, L, len(vocab)], hidden [B, L, H]); either may be skipped."""
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        return DimooOutput(self.logits(h, vocab) if return_logits else None, h if return_hidden else None)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "bfloat16",
                        device: str | torch.device = "cpu", attn_backend: str = "auto",
                        codebook_size: int | None = None) -> DimooModel:
        """Load a Lumina-DiMOO folder (config.json + model.safetensors or a sharded safetensors index) as is.

        Every tensor of the network must be in the files under its released name and nothing else may be
        there (one-line ValueError listing the first few); tensors are cast to `dtype`. codebook_size (how many
        of the last ids are image codes): None reads `num_vq_embeddings` of vqvae/config.json, else 8192."""
        from safetensors import safe_open

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"path: {str(folder)!r} is not a local directory (nothing is downloaded)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        if codebook_size is None:
            vq = folder / "vqvae" / "config.json"
            codebook_size = json.loads(vq.read_text())["num_vq_embeddings"] if vq.is_file() else 8192
        cfg = DimooConfig.from_json_dict(json.loads((folder / "config.json").read_text()),
                                         codebook_size=codebook_size)
        files = weight_files(folder)
        with torch.device("meta"):
            model = cls(cfg, attn_backend=attn_backend)
        expected = dict(model.state_dict())
        state, unexpected = {}, []
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    if name not in expected:
                        unexpected.append(name)
                        continue
                    t = st.get_tensor(name)
                    if t.shape != expected[name].shape:
                        raise ValueError(f"{f.name}: {name} has shape {tuple(t.shape)}, the config says "
                                         f"{tuple(expected[name].shape)}")
                    state[name] = t.to(device=device, dtype=DTYPES[dtype])
        missing = sorted(set(expected) - set(state))
        if missing or unexpected:
            raise ValueError(f"path: weights do not match the DiMOO network: missing {missing[:4]} "
                             f"({len(missing)}), unexpected {sorted(unexpected)[:4]} ({len(unexpected)})")
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, *, shards: int = 1) -> list[str]:
        """Write config.json and the weights under their released names: one model.safetensors, or `shards`
        files `model-0000i-of-0000n.safetensors` (split by cumulative bytes, state-dict order) plus
        model.safetensors.index.json, in the transformers naming. Returns the weight file names."""
        from safetensors.torch import save_file

        if shards < 1:
            raise ValueError(f"shards: expected >= 1, got {shards}")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_json_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if shards == 1:
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
            return ["model.safetensors"]
        if shards > len(state):
            raise ValueError(f"shards: at most {len(state)} (one tensor each), got {shards}")
        sizes = [t.numel() * t.element_size() for t in state.values()]
        total, before, parts = sum(sizes), 0, [{} for _ in range(shards)]
        for i, (name, t) in enumerate(state.items()):
            # shard of a tensor: where its first byte falls, but never fewer tensors left than shards to fill
            part = max(min(shards - 1, before * shards // total), shards - (len(state) - i))
            last = max((j for j, p in enumerate(parts) if p), default=0)
            part = min(max(part, last), last + 1)  # in order, none skipped (so none empty)
            parts[part][name] = t
            before += sizes[i]
        names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        weight_map = {}
        for name, shard in zip(names, parts):
            save_file(shard, folder / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        return names


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of `folder`: those of its index (each must exist), else model.safetensors."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            raise FileNotFoundError(f"path: {SAFETENSORS_INDEX} names missing shards {absent[:4]}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"path: no model.safetensors or {SAFETENSORS_INDEX} in {str(folder)!r}")
    return [single]


def released_parameter_names(n_layers: int) -> list[str]:
    """The state-dict names of DIMOO.md section 1.3 for `n_layers` blocks (modeling_llada.py:L1097-1131,
    L528-575, L856-893), written out from the fact sheet, independent of the module tree above."""
    per_block = ["attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
    names = ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"]
    names += [f"model.transformer.blocks.{i}.{p}.weight" for i in range(n_layers) for p in per_block]
    return sorted(names)
