"""`pairuni parity`: does our fused head + loss give what plain PyTorch gives, on YOUR model?

    pairuni parity --model checkpoints/Qwen2.5-0.5B                       # every loss type, float32, CPU
    pairuni parity --model checkpoints/Janus-Pro-1B --dtype bfloat16 --device cuda --loss ppo cispo --json p.json

    report = run_parity("tiny-qwen2", loss_types=["ppo"])
    print(report.format_table()); assert report.ok

One teacher-forced step of a Hugging Face causal LM folder (any `AutoModelForCausalLM`; its text head) or of a
Janus-Pro folder (both heads: the text `lm_head` and the image `gen_head`) on a seeded random batch (token ids
drawn from the tokenizer's vocabulary; a prompt part and a random tail of each row masked out), two ways:

- fused: the model's final hidden states into `pairuni_kernels.linear_logprobs(..., return_entropy=True)` and
  `pairuni_kernels.fused_linear_policy_loss` (chunked, the [tokens, V] logits never built);
- plain: the model's own head forward, i.e. the materialised logits, `log_softmax`, `gather`, the entropy
  `-sum p log p`, and the loss of the float64 specification `pairuni_kernels.reference.clipped_policy_loss`.

The loss inputs are built from the plain log-probs so that every token's log-ratio sits well inside or well
outside the clip range (0.02 <= |log ratio| <= 0.08, or 0.35 to 0.6 on one side; one band for a whole row, so
row means do too): a clip decision cannot flip between the paths. clip_cov / kl_cov tokens are chosen once
(`reference.cov_token_selection` on the plain log-probs, seeded) and given to both paths.

Compared, per head (max over the counted tokens, or one number):
  logp, entropy       max |fused - plain| over tokens                           <= tol_logp, tol_entropy
  <check> loss        |fused - plain|                                           <= tol_loss
  <check> grad GROUP  |g_fused - g_plain| / |g_plain| over the group's weights  <= tol_grad
where <check> is `logprobs` (gradient of sum(a * logp + b * entropy) / M with random a, b: linear_logprobs'
backward, entropy included) and each loss type; groups are embeddings / attention / mlp / norms / head / other
(by parameter name; the head's weights by identity).

Tolerance rule (per head; eps = torch.finfo(dtype).eps; eps_acc = eps of float32, the accumulator of float32
and 16-bit matmuls and of the softmax sums, on CPU and on CUDA with TF32 and reduced-precision reductions off,
which this command sets while it runs):
  dz   = eps * Z + eps_acc * sqrt(H) * S      how far one logit can differ between two implementations: each
         rounds it to the dtype (eps/2 * |z|, Z = max |logit|) and sums an H-long dot product in float32
         (Higham & Mary's probabilistic bound, lambda * sqrt(H) * u * sum_i |h_i w_i| with u = eps_acc / 2;
         S = max over tokens and vocabulary of sum_i |h_i w_i| / temperature, computed exactly).
  dsum = eps_acc * sqrt(V)                    the relative rounding of a V-term float32 softmax sum, i.e. the
         absolute error of its log (summed in a different order or chunking by each path).
  tol_logp    = K_LOGP * (dz + dsum)          logp = z_t - logsumexp(z) moves by <= 2 dz + dsum; K_LOGP = 4.
  tol_entropy = K_LOGP * (dz * max(1, D) + dsum * (1 + 2 Z))   d entropy / d z_v = -p_v (z_v - E_p z), so a
         logit error moves the entropy by <= D dz, D = max over tokens of E_p |z - E_p z| (plain logits); its
         two V-term sums (log-sum-exp, E_p z) round by dsum and dsum * Z.
  tol_loss    = K_LOSS * max_s |L(logp + s) - L(logp)| + K_LOSS * eps_acc * sqrt(M) * (|L| + mean|A| (1 + max|logp|))
         the reference loss's own response to log-prob errors of tol_logp (and entropy errors of tol_entropy
         where the bonus is on), measured on the perturbations s = +-tol_logp and +-tol_logp * sign(A_row) (every
         row pushed one way: the worst case of a sum of -A f(ratio) terms; this also covers the stop-gradient
         types, whose value moves with logp where their gradient does not say so), plus a float32 sum of M
         terms of size <= |A| (1 + |logp|) in another order. K_LOSS = 2.
  tol_grad    = K_GRAD * (dz + eps * sqrt(L + 1)) + K_LOSS * r   relative, per parameter group.
         d loss / d logits = g (onehot - p): the softmax moves by <= 2 dz relative, and g = d loss / d logp moves
         by r, measured like the loss's sensitivity: max_s |g(logp + s) - g(logp)| / |g(logp)| (capped at 1; 0 for
         the `logprobs` check, whose g is constant; large for vespo, whose weight reads the row's log-ratio SUM).
         On its way back through the head and the L decoder layers each path rounds every op's output to the
         dtype (relative RMS error eps / (2 sqrt 3) per rounding, ~6 roundings a layer, independent between the
         paths: ~0.7 eps sqrt(L + 1) in all). K_GRAD = 4 covers these with a margin.
How tight: on the tiny float32 models of tests/engine/test_parity.py the healthy deltas sit at 1/10 to 1/100
of their tolerance, and a log-sum-exp off by 1e-4, an entropy off by 1e-4 relative, or a gradient off by 1e-3
relative fails. In bfloat16 eps is 65536x float32's: dz grows to ~1e-2 and tol_grad to a few %, so run the
default float32 to look for kernel bugs and the model's dtype to see the error it lives with.

Exit status: 0 every check within tolerance, 1 drift (the failing rows are listed), 2 a user error.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import pairuni_kernels
from pairuni_kernels import reference

from .cli import run_command, user_error

K_LOGP = 4.0
K_LOSS = 2.0
K_GRAD = 4.0
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: Order of the parameter groups in the report.
GROUPS = ("embeddings", "attention", "mlp", "norms", "head", "other")
#: Loss types that need `selected` from `reference.cov_token_selection`.
COV_TYPES = ("clip_cov", "kl_cov")
#: Log-ratio bands of the synthetic old log-probs: inside the clip range, and outside it (either side).
#: (|log ratio| >= 0.02 also keeps kl_cov's |log ratio| away from its kink at 0.)
INSIDE, OUTSIDE = (0.02, 0.08), (0.35, 0.6)
#: (band, sign of A) of row i: ROW_PATTERN[i % 6]. Rows 1 and 2 are clipped by ppo (ratio above 1 + eps with
#: A > 0, below 1 - eps with A < 0), rows 3 and 4 are outside the range on the side ppo leaves alone.
ROW_PATTERN = (("inside", 1.0), ("above", 1.0), ("below", -1.0), ("above", -1.0), ("below", 1.0), ("inside", -1.0))


# ----------------------------------------------------------------------------- what is compared
@dataclass
class HeadTolerance:
    """The tolerance rule's inputs and results for one head (see the module docstring)."""

    dtype: str
    eps: float
    eps_acc: float
    hidden_dim: int  # H: input features of the head's last linear layer
    vocab: int  # V: the head's outputs
    layers: int  # L: decoder layers the gradient flows back through
    tokens: int  # M: counted tokens
    max_logit: float  # Z
    max_abs_dot: float  # S
    spread: float  # D
    dz: float = 0.0
    dsum: float = 0.0
    logp: float = 0.0
    entropy: float = 0.0
    grad: float = 0.0

    def __post_init__(self):
        self.dz = self.eps * self.max_logit + self.eps_acc * math.sqrt(self.hidden_dim) * self.max_abs_dot
        self.dsum = self.eps_acc * math.sqrt(self.vocab)
        self.logp = K_LOGP * (self.dz + self.dsum)
        self.entropy = K_LOGP * (self.dz * max(1.0, self.spread) + self.dsum * (1.0 + 2.0 * self.max_logit))
        self.grad = K_GRAD * (self.dz + self.eps * math.sqrt(self.layers + 1))

    def grad_for(self, response: float) -> float:
        """tol_grad of a loss whose d loss / d logp moves by `response` (relative) under the allowed logp error."""
        return self.grad + K_LOSS * response

    def loss(self, sensitivity: float, term_scale: float) -> float:
        return K_LOSS * sensitivity + K_LOSS * self.eps_acc * math.sqrt(self.tokens) * term_scale


@dataclass
class Check:
    """One compared quantity: `delta` (absolute, or relative for gradients) against `tol`."""

    head: str
    check: str
    quantity: str
    fused: float
    plain: float
    delta: float
    tol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.delta) and self.delta <= self.tol


@dataclass
class ParityReport:
    model: str
    kind: str  # the model's class
    dtype: str
    device: str
    backend: str
    batch: int
    tokens: int
    seed: int
    loss_types: list[str]
    entropy_coef: float
    heads: dict[str, HeadTolerance] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def format_table(self) -> str:
        lines = [f"pairuni parity: {self.model} ({self.kind}), {self.dtype} on {self.device} "
                 f"(kernels: {self.backend}), {self.batch} x {self.tokens} tokens, seed {self.seed}"]
        for name, t in self.heads.items():
            lines.append(f"head {name}: H={t.hidden_dim} V={t.vocab} L={t.layers} M={t.tokens} Z={t.max_logit:.3g} "
                         f"S={t.max_abs_dot:.3g} D={t.spread:.3g} -> dz={t.dz:.2e} dsum={t.dsum:.2e}; "
                         f"tol logp={t.logp:.2e} entropy={t.entropy:.2e} grad(rel)={t.grad:.2e} + the loss's response")
        header = ("head", "check", "quantity", "fused", "plain", "|delta|", "tol", "")
        rows = [(c.head, c.check, c.quantity, f"{c.fused:.6g}", f"{c.plain:.6g}", f"{c.delta:.2e}", f"{c.tol:.2e}",
                 "ok" if c.ok else "DRIFT") for c in self.checks]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                         .rstrip())
        if self.ok:
            worst = max(self.checks, key=lambda c: c.delta / c.tol if c.tol > 0 else 0.0)
            lines.append(f"parity OK: {len(self.checks)} checks within tolerance (closest: {worst.head} "
                         f"{worst.check} {worst.quantity} at {worst.delta / worst.tol:.2g} of its tolerance)")
        else:
            bad = self.failures
            lines.append(f"parity DRIFT: {len(bad)} of {len(self.checks)} checks over tolerance: "
                         + ", ".join(f"{c.head} {c.check} {c.quantity}" for c in bad[:8])
                         + (" ..." if len(bad) > 8 else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("heads", "checks")}
        out["ok"] = self.ok
        out["rule"] = {"K_LOGP": K_LOGP, "K_LOSS": K_LOSS, "K_GRAD": K_GRAD,
                       "dz": "eps * Z + eps_acc * sqrt(H) * S", "dsum": "eps_acc * sqrt(V)",
                       "logp": "K_LOGP * (dz + dsum)", "entropy": "K_LOGP * (dz * max(1, D) + dsum * (1 + 2 Z))",
                       "loss": "K_LOSS * max_s |L(logp + s) - L(logp)| "
                                "+ K_LOSS * eps_acc * sqrt(M) * (|L| + mean|A| (1 + max|logp|))",
                       "grad": "K_GRAD * (dz + eps * sqrt(L + 1)) + K_LOSS * r, relative; r = max_s "
                               "|dL/dlogp(logp + s) - dL/dlogp(logp)| / |dL/dlogp(logp)|"}
        out["heads"] = {k: asdict(v) for k, v in self.heads.items()}
        out["checks"] = [{**asdict(c), "ok": c.ok} for c in self.checks]
        return _finite(out)


def _finite(x):
    """JSON-safe: non-finite floats become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


# ----------------------------------------------------------------------------- loss types
def available_loss_types() -> tuple[str, ...]:
    """`reference.LOSS_TYPES` (("ppo",) before the loss types exist)."""
    return tuple(getattr(reference, "LOSS_TYPES", ("ppo",)))


def check_loss_types(loss_types, importance_sampling_level: str = "token", dro_beta: float | None = None) -> list[str]:
    """The loss types to check: `loss_types` (validated), or every type that takes `importance_sampling_level`
    and needs no knob left unset (dro needs dro_beta)."""
    known = available_loss_types()
    levels = getattr(reference, "LOSS_TYPE_LEVELS", {})
    if not loss_types:
        return [t for t in known if importance_sampling_level in levels.get(t, ("token",))
                and (t != "dro" or dro_beta is not None)]
    unknown = [t for t in loss_types if t not in known]
    if unknown:
        raise ValueError(f"--loss: unknown loss type(s) {unknown}; expected names from {list(known)}")
    if "dro" in loss_types and dro_beta is None:
        raise ValueError("--dro-beta: required (a float > 0) for --loss dro")
    wrong = [t for t in loss_types if importance_sampling_level not in levels.get(t, ("token",))]
    if wrong:
        raise ValueError(f"--importance-sampling-level: {importance_sampling_level!r} is not defined for loss "
                         f"type(s) {wrong} (reference.LOSS_TYPE_LEVELS)")
    return list(dict.fromkeys(loss_types))


def _accepted(fn, kwargs: dict) -> dict:
    """The keyword arguments `fn` takes; a knob it lacks must be at its neutral value."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):  # **loss_type_knobs: it validates
        return {k: v for k, v in kwargs.items() if not (k == "entropy" and v is None)}
    out = {}
    for k, v in kwargs.items():
        if k in params:
            out[k] = v
        elif not (v is None or (k == "loss_type" and v == "ppo") or (k == "entropy_coef" and v == 0.0)
                  or k == "entropy"):
            raise ValueError(f"--loss: {fn.__module__}.{fn.__name__} does not take {k} (loss type needs it)")
    return out


def entropy_bonus_supported() -> bool:
    """Whether the fused loss takes entropy_coef (the entropy bonus computed in the head)."""
    params = inspect.signature(pairuni_kernels.fused_linear_policy_loss).parameters
    return "entropy_coef" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


# ----------------------------------------------------------------------------- the model
def _config_dict(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"--model: {str(path)!r} is not a directory (a Hugging Face model folder)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"--model: no config.json in {str(path)!r} (a Hugging Face model folder)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model: {cfg} is not JSON ({exc})") from None


def load_model(path: str, dtype: str, device: torch.device):
    """(model, kind) with kind "janus" or "causal_lm"; raises ValueError / OSError with one line."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder = Path(path)
    cfg = _config_dict(folder)
    model_type = cfg.get("model_type")
    if model_type == "janus":
        from .model import load_janus

        return load_janus(str(folder), dtype=dtype, device=device, attn_implementation="sdpa"), "janus"
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = cfg.get("architectures") or []
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not set(archs) & causal_classes):
        what = ", ".join(archs) or f"model_type {model_type!r}"
        raise ValueError(f"--model: {str(folder)!r} holds {what}, not a causal LM (AutoModelForCausalLM) "
                         "nor a Janus-Pro folder")
    softcap = cfg.get("final_logit_softcapping") or (cfg.get("text_config") or {}).get("final_logit_softcapping")
    if softcap:
        raise ValueError(f"--model: final_logit_softcapping={softcap}: its logits are not a linear head's output, "
                         "which is what the fused head computes")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype), local_files_only=True,
                                                 trust_remote_code=False)
    return model.to(device).eval(), "causal_lm"


def token_vocab(path: str, model_vocab: int) -> int:
    """How many token ids the synthetic batch draws from: the tokenizer's (capped at the embedding rows), or
    the model's vocabulary when the folder has no tokenizer."""
    try:
        from transformers import AutoTokenizer

        n = len(AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False))
    except (OSError, ValueError, TypeError, KeyError):
        n = model_vocab
    return max(2, min(n, model_vocab))


def parameter_group(name: str) -> str:
    """embeddings / attention / mlp / norms / other, from a parameter's name (the head is found by identity)."""
    n = name.lower()
    if "norm" in n or ".ln" in n or n.startswith("ln"):
        return "norms"
    if "embed" in n or "wte" in n or "wpe" in n or "aligner" in n:
        return "embeddings"
    if "attn" in n or "attention" in n or any(f"{p}_proj" in n for p in "qkvo"):
        return "attention"
    if "mlp" in n or "feed_forward" in n or any(p in n for p in ("gate_proj", "up_proj", "down_proj", "fc")):
        return "mlp"
    return "other"


@dataclass
class Head:
    """One output head of the model, teacher-forced on a batch.

    fused():  (x [B, T, H'], weight [V, H'], bias [V] or None): the head's last linear layer's operands.
    plain():  [B, T, V] logits through the model's own modules (materialised).
    targets [B, T] long, mask [B, T] bool; params: {name: parameter} the gradient is compared on;
    head_params: ids of the head's parameters (group "head"); layers: decoder layers.
    """

    name: str
    fused: object
    plain: object
    targets: torch.Tensor
    mask: torch.Tensor
    params: dict
    head_params: set
    layers: int


def _loss_mask(batch: int, tokens: int, prompt: int, g: torch.Generator, device) -> torch.Tensor:
    """[B, T] bool: the first `prompt` tokens and a random tail (shorter than T/4) of each row left out."""
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[:, :prompt] = False
    tail = torch.randint(0, max(1, (tokens - prompt) // 4), (batch,), generator=g)
    for i, k in enumerate(tail.tolist()):
        if k:
            mask[i, tokens - k:] = False
    return mask.to(device)


def build_heads(model, kind: str, path: str, batch: int, tokens: int, seed: int) -> list[Head]:
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    if kind == "causal_lm":
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"--model: the output embeddings are a {type(head).__name__}, not a linear head")
        vocab = token_vocab(path, head.weight.shape[0])
        ids = torch.randint(0, vocab, (batch, tokens + 1), generator=g).to(dev)
        attn = torch.ones_like(ids)
        params = {n: p for n, p in model.named_parameters()}
        for p in params.values():
            p.requires_grad_(True)

        def fused():
            h = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
            return h, head.weight, head.bias

        def plain():
            return model(input_ids=ids, attention_mask=attn).logits[:, :-1]

        layers = getattr(model.config, "num_hidden_layers", 1)
        mask = _loss_mask(batch, tokens, tokens // 4, g, dev)
        return [Head("text", fused, plain, ids[:, 1:], mask, params, {id(p) for p in head.parameters()}, layers)]

    from . import model as janus

    trained = ("language_model", "generation_head", "generation_embeddings", "generation_aligner")
    model.requires_grad_(False)
    params = {}
    for n, p in model.named_parameters():
        if n.startswith("lm_head.") or any(n.startswith(f"model.{m}.") for m in trained):
            p.requires_grad_(True)
            params[n] = p
    layers = model.config.text_config.num_hidden_layers
    text_vocab = token_vocab(path, model.lm_head.weight.shape[0])
    ids = torch.randint(0, text_vocab, (batch, tokens + 1), generator=g).to(dev)
    attn = torch.ones_like(ids)

    def text_hidden():
        embeds = janus.text_embeddings(model, ids)
        return janus.policy_hidden(model, embeds, attn, janus.positions_from_mask(attn))[:, :-1]

    text = Head("text", lambda: janus.text_head_operands(model, text_hidden()),
                lambda: janus.text_logits(model, text_hidden()), ids[:, 1:],
                _loss_mask(batch, tokens, tokens // 4, g, dev), params,
                {id(p) for p in model.lm_head.parameters()}, layers)

    k = min(tokens, janus.image_token_count(model))
    codebook = model.model.generation_head.vision_head.weight.shape[0]
    prompt_len = 4
    prompt = torch.randint(0, text_vocab, (batch, prompt_len), generator=g).to(dev)
    image = torch.randint(0, codebook, (batch, k), generator=g).to(dev)
    attn_img = torch.ones(batch, prompt_len + k - 1, dtype=torch.long, device=dev)

    def image_hidden():
        embeds = torch.cat([model.get_input_embeddings()(prompt),
                            janus.image_token_embeddings(model, image[:, :-1])], 1)
        h = janus.policy_hidden(model, embeds, attn_img, janus.positions_from_mask(attn_img))
        return h[:, prompt_len - 1: prompt_len - 1 + k]

    gen_head = model.model.generation_head
    image_head = Head("image", lambda: janus.image_head_operands(model, janus.image_head_input(model, image_hidden())),
                      lambda: gen_head(image_hidden()), image, _loss_mask(batch, k, 0, g, dev), params,
                      {id(p) for p in gen_head.parameters()}, layers)
    return [text, image_head]


# ----------------------------------------------------------------------------- one head
def _group_of(head: Head) -> dict[str, str]:
    return {n: "head" if id(p) in head.head_params else parameter_group(n) for n, p in head.params.items()}


def _grads(loss: torch.Tensor, head: Head) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, list(head.params.values()), retain_graph=True, allow_unused=True))


def _grad_checks(head: Head, check: str, g_fused, g_plain, tol: float) -> list[Check]:
    groups = _group_of(head)
    sums: dict[str, list[float]] = {}
    for (name, _), a, b in zip(head.params.items(), g_fused, g_plain):
        if a is None and b is None:
            continue
        s = sums.setdefault(groups[name], [0.0, 0.0, 0.0])
        a64 = a.double() if a is not None else torch.zeros_like(b, dtype=torch.float64)
        b64 = b.double() if b is not None else torch.zeros_like(a, dtype=torch.float64)
        s[0] += float(a64.pow(2).sum())
        s[1] += float(b64.pow(2).sum())
        s[2] += float((a64 - b64).pow(2).sum())
    out = []
    for group in GROUPS:
        if group not in sums:
            continue
        fa, fb, fd = (math.sqrt(v) for v in sums[group])
        rel = 0.0 if fd == 0 else (fd / fb if fb > 0 else math.inf)
        out.append(Check(head.name, check, f"grad {group}", fa, fb, rel, tol))
    return out


def _tolerance(head: Head, x, weight, bias, logits, temperature: float, dtype: str) -> HeadTolerance:
    """Z, S, D of the rule from the plain logits and the head's operands (float64, over the counted tokens)."""
    valid = head.mask.reshape(-1)
    xv = x.detach().reshape(-1, x.shape[-1])[valid].double()
    zv = logits.detach().reshape(-1, logits.shape[-1])[valid].double() / temperature
    w_abs = weight.detach().double().abs()
    max_dot, spread = 0.0, 0.0
    for r0 in range(0, xv.shape[0], 256):
        dots = xv[r0:r0 + 256].abs() @ w_abs.t()
        if bias is not None:
            dots = dots + bias.detach().double().abs()
        max_dot = max(max_dot, float(dots.max()) / temperature)
        z = zv[r0:r0 + 256]
        p = torch.softmax(z, -1)
        mean = (p * z).sum(-1, keepdim=True)
        spread = max(spread, float((p * (z - mean).abs()).sum(-1).max()))
    eps = torch.finfo(getattr(torch, dtype)).eps
    return HeadTolerance(dtype=dtype, eps=eps, eps_acc=torch.finfo(torch.float32).eps, hidden_dim=x.shape[-1],
                         vocab=weight.shape[0], layers=head.layers, tokens=int(valid.sum()),
                         max_logit=float(zv.abs().max()), max_abs_dot=max_dot, spread=spread)


def _loss_inputs(lp: torch.Tensor, mask: torch.Tensor, g: torch.Generator):
    """(old_logp, ref_logp, advantages) [N, T], [N, T], [N] from the plain log-probs (detached): each row's
    log-ratios in one band (inside the clip range: 0.02 <= |lr| <= 0.08 of either sign; above it: 0.35 to 0.6;
    below it: -0.6 to -0.35) and its advantage's sign by ROW_PATTERN, |A| in [0.5, 1.5]; reference log-probs
    within 0.3."""
    n, t = lp.shape
    pattern = [ROW_PATTERN[i % len(ROW_PATTERN)] for i in range(n)]
    mode = torch.tensor([("inside", "above", "below").index(band) for band, _ in pattern])[:, None]
    u = torch.rand(n, t, generator=g, dtype=torch.float64)
    sign_t = torch.where(torch.rand(n, t, generator=g) < 0.5, -1.0, 1.0).double()
    inside = sign_t * (INSIDE[0] + u * (INSIDE[1] - INSIDE[0]))
    outside = OUTSIDE[0] + u * (OUTSIDE[1] - OUTSIDE[0])
    log_ratio = torch.where(mode == 0, inside, torch.where(mode == 1, outside, -outside))
    ref_shift = (torch.rand(n, t, generator=g, dtype=torch.float64) * 2 - 1) * 0.3
    sign = torch.tensor([a for _, a in pattern], dtype=torch.float64)
    adv = sign * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))
    base = lp.detach().double()
    dev, dt = lp.device, lp.dtype
    old = torch.where(mask, base - log_ratio.to(dev), torch.zeros((), dtype=torch.float64, device=dev))
    ref = torch.where(mask, base - ref_shift.to(dev), torch.zeros((), dtype=torch.float64, device=dev))
    return old.to(dt), ref.to(dt), adv.to(dev, dt)


def _loss_kwargs(loss_type: str, knobs: dict, selected, entropy_coef: float) -> dict:
    kw = dict(knobs)
    kw["loss_type"] = loss_type
    if selected is not None:
        kw["selected"] = selected
    kw["entropy_coef"] = entropy_coef
    return kw


def _selection(loss_type, lp, old, adv, mask, knobs, seed):
    if loss_type not in COV_TYPES:
        return None
    select = getattr(reference, "cov_token_selection")
    g = torch.Generator().manual_seed(seed)  # verl's torch.randperm draw: a CPU generator
    params = inspect.signature(select).parameters
    extra = {k: knobs[k] for k in ("epsilon_low", "epsilon_high") if k in params}
    if "generator" in params:
        extra["generator"] = g
    return select(lp.detach(), old, adv, mask, mode=loss_type, **extra)


def _loss_response(plain_loss, lp, ent, adv, tol: HeadTolerance, with_entropy: bool) -> tuple[float, float]:
    """How the reference loss answers log-prob (and entropy) errors of the allowed size: (max |L(lp + s) - L(lp)|,
    max |grad L(lp + s) - grad L(lp)| / |grad L(lp)|) over s = +-tol_logp and +-tol_logp * sign(A_row) (and
    entropy shifts of +-tol_entropy with the bonus on); the gradient is d L / d (logp, entropy), capped at 1."""
    n, t = lp.shape

    def value_and_grad(dl, de):
        x = (lp.detach() + dl).requires_grad_(True)
        e = (ent.detach() + de).requires_grad_(True)
        with torch.enable_grad():
            loss = plain_loss(x, e)
            gx, ge = torch.autograd.grad(loss, [x, e], allow_unused=True)
        parts = [gx.flatten()] + ([ge.flatten()] if ge is not None else [])
        return float(loss.detach()), torch.cat(parts).double()

    l0, g0 = value_and_grad(0.0, 0.0)
    row_sign = torch.sign(adv)[:, None].expand(n, t).to(lp.dtype)
    ones = torch.ones_like(lp)
    sens, response = 0.0, 0.0
    for s in (ones, -ones, row_sign, -row_sign):
        for e in ((tol.entropy, -tol.entropy) if with_entropy else (0.0,)):
            l1, g1 = value_and_grad(tol.logp * s, e)
            sens = max(sens, abs(l1 - l0))
            diff, base = float((g1 - g0).norm()), float(g0.norm())
            response = max(response, 0.0 if diff == 0 else min(1.0, diff / base) if base > 0 else 1.0)
    return sens, response


def check_head(head: Head, loss_types: list[str], *, dtype: str, temperature: float, knobs: dict,
               entropy_coef: float, seed: int) -> tuple[HeadTolerance, list[Check]]:
    """Every comparison of one head (module docstring)."""
    g = torch.Generator().manual_seed(seed + 1)
    x, weight, bias = head.fused()
    logits = head.plain()
    cdt = reference.compute_dtype(logits.dtype)
    logprobs = torch.log_softmax(logits.to(cdt) / temperature, -1)
    lp_plain = logprobs.gather(-1, head.targets.long()[..., None])[..., 0]
    ent_plain = -(logprobs.exp() * logprobs).sum(-1)
    tol = _tolerance(head, x, weight, bias, logits, temperature, dtype)
    del logits

    valid = head.mask
    n, t = valid.shape
    flat = valid.reshape(-1)
    lp_f, ent_f = pairuni_kernels.linear_logprobs(x.reshape(n * t, -1)[flat], weight, head.targets.reshape(-1)[flat],
                                                  bias=bias, temperature=temperature, return_entropy=True)
    lp_p, ent_p = lp_plain[valid], ent_plain[valid]
    checks = [
        Check(head.name, "logprobs", "logp", float(lp_f.detach().abs().max()), float(lp_p.detach().abs().max()),
              float((lp_f.detach().double() - lp_p.detach().double()).abs().max()), tol.logp),
        Check(head.name, "logprobs", "entropy", float(ent_f.detach().max()), float(ent_p.detach().max()),
              float((ent_f.detach().double() - ent_p.detach().double()).abs().max()), tol.entropy),
    ]
    a = torch.randn(lp_p.shape, generator=g).to(lp_p)
    b = torch.randn(lp_p.shape, generator=g).to(lp_p)
    m = lp_p.numel()
    gf = _grads(((a * lp_f) + (b * ent_f)).sum() / m, head)
    gp = _grads(((a * lp_p) + (b * ent_p)).sum() / m, head)
    checks += _grad_checks(head, "logprobs", gf, gp, tol.grad)
    del gf, gp, lp_f, ent_f

    old, ref, adv = _loss_inputs(lp_plain, valid, g)
    knobs = {**knobs, "ref_logp": ref}
    for loss_type in loss_types:
        selected = _selection(loss_type, lp_plain, old, adv, valid, knobs, seed)
        kw = _loss_kwargs(loss_type, knobs, selected, entropy_coef)
        fused_out = pairuni_kernels.fused_linear_policy_loss(
            x, weight, head.targets, old, adv, valid, bias=bias, temperature=temperature,
            **_accepted(pairuni_kernels.fused_linear_policy_loss, kw))
        ref_kw = _accepted(reference.clipped_policy_loss, {**kw, "entropy": ent_plain if entropy_coef else None})

        def plain_loss(lp, ent):
            if "entropy" in ref_kw:
                return reference.clipped_policy_loss(lp, old, adv, valid, **{**ref_kw, "entropy": ent}).loss
            return reference.clipped_policy_loss(lp, old, adv, valid, **ref_kw).loss

        loss_p = plain_loss(lp_plain, ent_plain)
        sens, response = _loss_response(plain_loss, lp_plain, ent_plain, adv, tol, bool(entropy_coef))
        loss_f = fused_out.loss
        lf, lp_ = float(loss_f.detach()), float(loss_p.detach())
        scale = abs(lp_) + float(adv.abs().mean()) * (1.0 + float(lp_p.detach().abs().max()))
        checks.append(Check(head.name, loss_type, "loss", lf, lp_, abs(lf - lp_), tol.loss(sens, scale)))
        gf = _grads(loss_f, head)
        gp = _grads(loss_p, head)
        checks += _grad_checks(head, loss_type, gf, gp, tol.grad_for(response))
        del gf, gp
    return tol, checks


# ----------------------------------------------------------------------------- the command
@contextlib.contextmanager
def _full_precision_matmuls(device: torch.device):
    """CUDA: float32 accumulation for 16-bit matmuls and no TF32 while the check runs (the rule's eps_acc)."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32 = m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} asked for, but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    return dev


def run_parity(model_path: str, *, loss_types: list[str] | None = None, dtype: str = "float32",
               device: str = "cpu", batch: int = 4, tokens: int = 32, seed: int = 0, temperature: float = 1.0,
               beta: float = 0.04, entropy_coef: float | None = None, loss_agg_mode: str = "token-mean",
               importance_sampling_level: str = "token", epsilon_low: float = 0.2,
               epsilon_high: float = 0.2, dro_beta: float | None = None) -> ParityReport:
    """One step of the model at `model_path` through both paths (module docstring). Raises ValueError / OSError
    (one line naming the option) for a bad folder or option, before anything heavy runs where it can."""
    if importance_sampling_level not in reference.IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"--importance-sampling-level: expected one of {reference.IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    types = check_loss_types(loss_types, importance_sampling_level, dro_beta)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype: expected one of {DTYPE_NAMES}, got {dtype!r}")
    for name, v, low in (("--batch", batch, 1), ("--tokens", tokens, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature: expected a finite float > 0, got {temperature!r}")
    if entropy_coef is None:
        entropy_coef = 0.01 if entropy_bonus_supported() else 0.0
    if entropy_coef and not entropy_bonus_supported():
        raise ValueError("--entropy-coef: this pairuni_kernels has no entropy bonus in fused_linear_policy_loss")
    if loss_agg_mode not in reference.LOSS_AGG_MODES:
        raise ValueError(f"--loss-agg-mode: expected one of {reference.LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    dev = _device(device)
    model, kind = load_model(model_path, dtype, dev)
    knobs = {"beta": beta, "kl_estimator": "k3", "loss_agg_mode": loss_agg_mode, "epsilon_low": epsilon_low,
             "epsilon_high": epsilon_high, "importance_sampling_level": importance_sampling_level}
    if dro_beta is not None:
        knobs["dro_beta"] = dro_beta
    backend = "triton" if pairuni_kernels._backend.use_triton(torch.empty(0, device=dev)) else "torch"
    report = ParityReport(model=str(model_path), kind=type(model).__name__, dtype=dtype, device=str(dev),
                          backend=backend, batch=batch, tokens=tokens, seed=seed, loss_types=types,
                          entropy_coef=float(entropy_coef))
    with _full_precision_matmuls(dev):
        for head in build_heads(model, kind, model_path, batch, tokens, seed):
            tol, checks = check_head(head, types, dtype=dtype, temperature=temperature, knobs=knobs,
                                     entropy_coef=float(entropy_coef), seed=seed)
            report.heads[head.name] = tol
            report.checks += checks
    return report


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "parity", help="check the fused head + loss against plain PyTorch on your model",
        description="One step of a Hugging Face causal LM folder (its text head) or a Janus-Pro folder (text and "
                    "image heads) on a seeded random batch, through pairuni's fused head + loss and through a plain "
                    "PyTorch path that materialises the logits (log_softmax, gather, the float64 reference loss). "
                    "Prints max |delta| of per-token log-probs, entropy, each loss and the gradient per parameter "
                    "group, against tolerances derived from the dtype (docs/PARITY.md), and exits 1 on drift.",
    )
    p.add_argument("--model", required=True, help="a local Hugging Face model folder (nothing is downloaded)")
    p.add_argument("--loss", nargs="+", metavar="TYPE",
                   help=f"loss types to check (default: all of {list(available_loss_types())})")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="dtype the model is loaded in (default float32: the tightest tolerances)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--batch", type=int, default=4, help="rows of the synthetic batch (default 4: rows clipped "
                   "above and below, and rows outside the range on the side the clip leaves alone)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per row (default 32; Janus's image head: at most "
                   "its image tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch and the loss inputs (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="scoring temperature (default 1)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient, k3 estimator (default 0.04)")
    p.add_argument("--entropy-coef", type=float, default=None,
                   help="entropy bonus coefficient (default 0.01 where the kernels have the bonus)")
    p.add_argument("--loss-agg-mode", default="token-mean", choices=reference.LOSS_AGG_MODES)
    p.add_argument("--importance-sampling-level", default="token", choices=reference.IMPORTANCE_SAMPLING_LEVELS)
    p.add_argument("--dro-beta", type=float, default=None,
                   help="dro's coefficient (verl policy_loss.dro_beta); dro is checked only with it")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise FileNotFoundError(f"--json: the folder of {args.json!r} does not exist")
        report = run_parity(args.model, loss_types=args.loss, dtype=args.dtype, device=args.device,
                            batch=args.batch, tokens=args.tokens, seed=args.seed, temperature=args.temperature,
                            beta=args.beta, entropy_coef=args.entropy_coef, loss_agg_mode=args.loss_agg_mode,
                            importance_sampling_level=args.importance_sampling_level,
                            dro_beta=args.dro_beta)
        print(report.format_table())
        if args.json:
            tmp = Path(f"{args.json}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n")
            tmp.replace(args.json)
    except (ValueError, OSError) as exc:
        return user_error("parity", args, exc)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.parity --model DIR ...` (the same as `pairuni parity`)."""
    return run_command(register, "parity", argv)


if __name__ == "__main__":
    sys.exit(main())
