"""`pairuni parity` (engine/parity.py) on tiny random models in the exact on-disk format: a Llama-style and a
Qwen2-style (tied head, attention biases) `AutoModelForCausalLM` saved with `save_pretrained` beside a
tokenizer, and the tiny Janus-Pro folder (`janus_pro_dir`, both heads).

Healthy kernels: exit 0 with every delta under its tolerance (in-process through `engine.parity.main`, and once
through the real `pairuni` console script). Kernels broken on purpose by a small relative error (the chunked
head's log-sum-exp, its entropy, its entropy gradient, the policy loss's gradient): exit 1, naming the rows that
drifted and only those. Bad folders and options: exit 2 with one line on stderr.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import parity
from pairuni_kernels import chunked_head, fused_linear_loss, reference

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "PARITY.md"
TOKENIZER_WORDS = 200  # < the model's 256 embedding rows: the batch must draw from the tokenizer's ids


def _tokenizer(n_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(n_words - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def write_causal_lm(out: Path, family: str, seed: int = 0) -> Path:
    """A tiny random `{family}ForCausalLM` folder (config.json, generation_config.json, model.safetensors and a
    tokenizer), as `save_pretrained` writes it."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        config, cls = LlamaConfig(**sizes, tie_word_embeddings=False), LlamaForCausalLM
    else:
        config, cls = Qwen2Config(**sizes, tie_word_embeddings=True), Qwen2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.save_pretrained(out)
    _tokenizer(TOKENIZER_WORDS).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_causal_lm(tmp_path_factory.mktemp("parity") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return write_causal_lm(tmp_path_factory.mktemp("parity") / "tiny-qwen2", "qwen2")


def run(argv, tmp_path, capsys) -> tuple[int, dict | None, str, str]:
    """(exit code, the JSON report or None, stdout, stderr) of `pairuni parity ARGV --json ...` in-process."""
    out = tmp_path / "parity.json"
    out.unlink(missing_ok=True)
    capsys.readouterr()
    code = parity.main([*map(str, argv), "--json", str(out)])
    std = capsys.readouterr()
    return code, json.loads(out.read_text()) if out.exists() else None, std.out, std.err


def rows(report: dict, ok: bool | None = None) -> set[tuple[str, str, str]]:
    return {(c["head"], c["check"], c["quantity"]) for c in report["checks"] if ok is None or c["ok"] == ok}


# ----------------------------------------------------------------------------- healthy kernels
def test_llama_float32_every_loss_type_within_tolerance(llama_dir, tmp_path, capsys):
    code, report, out, _ = run(["--model", llama_dir], tmp_path, capsys)
    assert code == 0, out
    assert report["ok"] and not rows(report, ok=False)
    expected = [t for t in reference.LOSS_TYPES if t != "dro"]  # dro needs --dro-beta
    assert report["loss_types"] == expected
    assert {c for _, c, _ in rows(report)} == {"logprobs", *expected}
    for check in ("logprobs", *expected):
        assert {q for _, c, q in rows(report) if c == check} >= {
            f"grad {g}" for g in ("embeddings", "attention", "mlp", "norms", "head")}
    for c in report["checks"]:
        assert 0 <= c["delta"] <= c["tol"], c
        if c["quantity"].startswith("grad"):
            assert c["plain"] > 0, c  # the groups do receive a gradient
    assert "parity OK" in out and "DRIFT" not in out
    # the rule's inputs, float32: dz = eps Z + eps_acc sqrt(H) S
    head = report["heads"]["text"]
    assert head["hidden_dim"] == 64 and head["vocab"] == 256 and head["layers"] == 2
    eps = torch.finfo(torch.float32).eps
    assert head["dz"] == pytest.approx(eps * head["max_logit"] + eps * 8 * head["max_abs_dot"])


def test_dro_and_sequence_level(llama_dir, tmp_path, capsys):
    code, report, out, _ = run(["--model", llama_dir, "--loss", "dro", "ppo", "--dro-beta", "0.1"], tmp_path, capsys)
    assert code == 0, out
    assert {c for _, c, _ in rows(report)} == {"logprobs", "dro", "ppo"}
    code, report, out, _ = run(["--model", llama_dir, "--importance-sampling-level", "sequence",
                                "--loss-agg-mode", "seq-mean-token-mean"], tmp_path, capsys)
    assert code == 0, out
    assert report["loss_types"] == [t for t in reference.LOSS_TYPES
                                    if "sequence" in reference.LOSS_TYPE_LEVELS[t] and t != "dro"]


def test_qwen2_tied_head_bfloat16(qwen2_dir, tmp_path, capsys):
    code, report, out, _ = run(["--model", qwen2_dir, "--dtype", "bfloat16", "--loss", "ppo", "cispo",
                                "--tokens", "24", "--batch", "3"], tmp_path, capsys)
    assert code == 0, out
    assert report["dtype"] == "bfloat16" and report["kind"] == "Qwen2ForCausalLM"
    head = report["heads"]["text"]
    assert head["eps"] == torch.finfo(torch.bfloat16).eps
    # the tied embedding matrix is the head: one group, named head
    assert ("text", "ppo", "grad head") in rows(report) and ("text", "ppo", "grad embeddings") not in rows(report)


def test_janus_pro_both_heads(janus_pro_dir, tmp_path, capsys):
    code, report, out, _ = run(["--model", janus_pro_dir, "--loss", "ppo", "sapo", "--tokens", "12"], tmp_path,
                               capsys)
    assert code == 0, out
    assert report["kind"] == "JanusForConditionalGeneration" and set(report["heads"]) == {"text", "image"}
    assert report["heads"]["image"]["vocab"] == 64  # the tiny VQ codebook: gen_head's outputs
    for head in ("text", "image"):
        assert {(c, q) for h, c, q in rows(report) if h == head} >= {
            ("logprobs", "logp"), ("logprobs", "entropy"), ("ppo", "loss"), ("sapo", "loss"), ("ppo", "grad head"),
            ("ppo", "grad attention")}


def test_batch_draws_from_the_tokenizer_and_is_seeded(llama_dir):
    model, kind = parity.load_model(str(llama_dir), "float32", torch.device("cpu"))
    (a,) = parity.build_heads(model, kind, str(llama_dir), 4, 64, seed=5)
    (b,) = parity.build_heads(model, kind, str(llama_dir), 4, 64, seed=5)
    (c,) = parity.build_heads(model, kind, str(llama_dir), 4, 64, seed=6)
    assert int(a.targets.max()) < TOKENIZER_WORDS < model.config.vocab_size
    assert torch.equal(a.targets, b.targets) and torch.equal(a.mask, b.mask) and not torch.equal(a.targets, c.targets)
    assert not a.mask[:, :16].any() and a.mask.sum(1).min() > 0  # the prompt quarter never counts


@pytest.mark.slow
def test_console_script(llama_dir, tmp_path):
    script = Path(sys.executable).parent / "pairuni"
    assert script.exists(), "pip install -e . puts the console script beside the interpreter"
    proc = subprocess.run([str(script), "parity", "--model", str(llama_dir), "--loss", "ppo", "gpg",
                           "--json", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity OK" in proc.stdout
    assert json.loads((tmp_path / "p.json").read_text())["ok"] is True


# ----------------------------------------------------------------------------- broken kernels
def _after(monkeypatch, module, name, edit):
    """Wrap `module.name` so that `edit(args, result)` runs after each call (in-place edits of its outputs)."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        edited = edit(args, kwargs, result)
        return result if edited is None else edited

    monkeypatch.setattr(module, name, wrapped)


def _break_stats(monkeypatch, edit):
    """The chunked head's softmax statistics (max, sum, target logit, entropy) edited in place after each chunk,
    in both users of the torch chunk loop (linear_logprobs and the fused loss)."""
    for module in (chunked_head, fused_linear_loss):
        if hasattr(module, "_stats_torch"):
            _after(monkeypatch, module, "_stats_torch", edit)


def test_log_sum_exp_off_by_1e4_is_drift(llama_dir, tmp_path, capsys, monkeypatch):
    def sum_up(args, kwargs, _):
        args[2].mul_(1 + 1e-4)  # sm: sum of exp(z - max); log-sum-exp + 1e-4

    _break_stats(monkeypatch, sum_up)
    code, report, out, _ = run(["--model", llama_dir, "--loss", "ppo", "cispo"], tmp_path, capsys)
    assert code == 1 and not report["ok"]
    bad = rows(report, ok=False)
    assert ("text", "logprobs", "logp") in bad and ("text", "ppo", "loss") in bad
    assert "parity DRIFT" in out and "text logprobs logp" in out.splitlines()[-1]
    logp = next(c for c in report["checks"] if c["quantity"] == "logp")
    assert logp["delta"] == pytest.approx(1e-4, rel=0.02) and logp["tol"] < 1e-4 / 4


def test_entropy_off_by_1e4_is_drift(llama_dir, tmp_path, capsys, monkeypatch):
    def entropy_up(args, kwargs, _):
        with_entropy = args[5] if len(args) > 5 else kwargs.get("with_entropy")
        if with_entropy:
            args[4].mul_(1 + 1e-4)

    _break_stats(monkeypatch, entropy_up)
    code, report, out, _ = run(["--model", llama_dir, "--loss", "ppo", "--entropy-coef", "0"], tmp_path, capsys)
    assert code == 1
    bad = rows(report, ok=False)
    # the entropy, and the gradient that uses it (-p (g + g_H (log p + H))); the loss without a bonus is right
    assert ("text", "logprobs", "entropy") in bad and all(c == "logprobs" for _, c, _ in bad), bad


def test_entropy_gradient_off_by_1e3_is_drift(llama_dir, tmp_path, capsys, monkeypatch):
    original = chunked_head._dlogits_torch

    def scaled(c, lse, g, g_ent, ent):
        return original(c, lse, g, None if g_ent is None else g_ent * (1 + 1e-3), ent)

    monkeypatch.setattr(chunked_head, "_dlogits_torch", scaled)
    code, report, out, _ = run(["--model", llama_dir, "--loss", "ppo", "--entropy-coef", "0"], tmp_path, capsys)
    assert code == 1
    bad = rows(report, ok=False)
    assert bad and all(c == "logprobs" and q.startswith("grad") for _, c, q in bad), bad


def test_policy_loss_gradient_off_by_1e3_is_drift(llama_dir, tmp_path, capsys, monkeypatch):
    def grad_up(args, kwargs, result):
        out, dlp = result
        return out, None if dlp is None else dlp * (1 + 1e-3)

    _after(monkeypatch, fused_linear_loss, "clipped_policy_loss_and_grad", grad_up)
    code, report, out, _ = run(["--model", llama_dir, "--loss", "ppo", "sapo"], tmp_path, capsys)
    assert code == 1
    bad = rows(report, ok=False)
    # the values are right (logp, entropy, loss); every gradient of both losses is 1e-3 too large
    assert bad == {("text", t, f"grad {g}") for t in ("ppo", "sapo")
                   for g in ("embeddings", "attention", "mlp", "norms", "head")}
    for c in report["checks"]:
        if (c["head"], c["check"], c["quantity"]) in bad:
            assert c["delta"] == pytest.approx(1e-3, rel=0.05)


def test_triton_kernels_interpreted(llama_dir, tmp_path, capsys, triton_backend):
    code, report, out, _ = run(["--model", llama_dir, "--loss", "ppo", "--tokens", "16"], tmp_path, capsys)
    assert report["backend"] == "triton"
    assert code == 0, out


# ----------------------------------------------------------------------------- tolerance rule
def test_tolerance_rule_scales_with_the_dtype():
    def tol(dtype, hidden=64, layers=2):
        return parity.HeadTolerance(dtype=dtype, eps=torch.finfo(getattr(torch, dtype)).eps,
                                    eps_acc=torch.finfo(torch.float32).eps, hidden_dim=hidden, vocab=256,
                                    layers=layers, tokens=40, max_logit=2.0, max_abs_dot=3.0, spread=0.5)

    f32, bf16, f16 = tol("float32"), tol("bfloat16"), tol("float16")
    eps32 = torch.finfo(torch.float32).eps
    assert f32.dz == pytest.approx(eps32 * 2.0 + eps32 * 8 * 3.0)
    assert f32.logp == pytest.approx(parity.K_LOGP * (f32.dz + eps32 * 16))
    assert f32.grad == pytest.approx(parity.K_GRAD * (f32.dz + eps32 * math.sqrt(3)))
    assert f32.logp < f16.logp < bf16.logp and f32.grad < f16.grad < bf16.grad
    # 16-bit: the dtype's own rounding of the logit dominates, the float32 accumulation does not grow with it
    assert bf16.dz == pytest.approx(torch.finfo(torch.bfloat16).eps * 2.0 + eps32 * 8 * 3.0)
    assert tol("float32", hidden=256).dz > f32.dz and tol("float32", layers=32).grad > f32.grad
    assert f32.loss(1e-6, 1.0) == pytest.approx(parity.K_LOSS * 1e-6 + parity.K_LOSS * eps32 * math.sqrt(40))


def test_parameter_groups():
    names = {"model.embed_tokens.weight": "embeddings", "model.layers.0.self_attn.q_proj.weight": "attention",
             "model.layers.0.self_attn.o_proj.bias": "attention", "model.layers.1.mlp.down_proj.weight": "mlp",
             "model.layers.1.input_layernorm.weight": "norms", "model.norm.weight": "norms",
             "model.language_model.layers.0.post_attention_layernorm.weight": "norms",
             "model.generation_embeddings.weight": "embeddings", "model.generation_aligner.fc1.weight": "embeddings",
             "transformer.h.0.attn.c_attn.weight": "attention", "transformer.wte.weight": "embeddings",
             "transformer.h.0.ln_1.weight": "norms", "model.layers.0.mlp.experts.0.w1": "mlp",
             "model.layers.0.router.weight": "other"}
    assert {n: parity.parameter_group(n) for n in names} == names


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("case", ["missing", "no_config", "not_causal", "unknown_loss", "dro_needs_beta",
                                  "softcap", "bad_device", "level_mismatch"])
def test_user_errors_are_one_line(case, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    argv = ["--model", folder]
    if case != "missing":
        folder.mkdir()
    config = {"not_causal": {"model_type": "vit", "architectures": ["ViTModel"]},
              "softcap": {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
                          "final_logit_softcapping": 30.0}}
    if case in config:
        (folder / "config.json").write_text(json.dumps(config[case]))
    argv += {"unknown_loss": ["--loss", "ppo", "grpo_plus"], "dro_needs_beta": ["--loss", "dro"],
             "bad_device": ["--device", "tpu"],
             "level_mismatch": ["--loss", "gpg", "--importance-sampling-level", "sequence"]}.get(case, [])
    if case in ("unknown_loss", "dro_needs_beta", "level_mismatch"):  # refused before any model is read
        monkeypatch.setattr(parity, "load_model", lambda *a: pytest.fail("a model was loaded"))
    if case == "level_mismatch":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, report, out, err = run(argv, tmp_path, capsys)
    assert code == 2 and report is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pairuni parity: "), err
    expect = {"missing": "--model: ", "no_config": "--model: no config.json", "not_causal": "not a causal LM",
              "unknown_loss": "--loss: unknown loss type(s) ['grpo_plus']", "dro_needs_beta": "--dro-beta",
              "softcap": "final_logit_softcapping", "bad_device": "--device",
              "level_mismatch": "--importance-sampling-level: 'sequence' is not defined"}[case]
    assert expect in lines[0], lines[0]


# ----------------------------------------------------------------------------- the user's page
def doc_blocks() -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


@pytest.mark.slow
def test_docs_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/PARITY.md's ```python block (it writes the tiny model folder) and then its `pairuni parity` commands
    that need no GPU or weights, in one folder, in order; the page's example output is what the command prints
    (row for row: head, check, quantity and verdict; the digits depend on the CPU's vector width)."""
    monkeypatch.chdir(tmp_path)
    blocks = doc_blocks()
    python = [body for lang, body in blocks if lang == "python"]
    assert len(python) == 1
    (tmp_path / "make_tiny.py").write_text(python[0])
    subprocess.run([sys.executable, "make_tiny.py"], check=True, timeout=300)
    commands = []
    for lang, body in blocks:
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                command, _, comment = line.partition("#")
                if command.strip().startswith("pairuni parity") and not comment.strip().startswith("need"):
                    commands.append(shlex.split(command))
    assert commands
    outputs = []
    for argv in commands:
        capsys.readouterr()
        assert parity.main(argv[2:]) == 0, capsys.readouterr().err
        outputs.append(capsys.readouterr().out)
    shown = [body for lang, body in blocks if lang == "text" and body.startswith("pairuni parity:")]
    assert shown, "the page shows the first command's output"

    def labels(text):
        return [line.split()[:3] + line.split()[-1:] for line in text.splitlines()
                if re.match(r"(text|image) ", line)]

    assert labels(shown[0]) == labels(outputs[0])
    assert shown[0].splitlines()[-1].split(":")[0] == outputs[0].splitlines()[-1].split(":")[0]
    if any("--json" in a for a in commands[0]):
        out = commands[0][commands[0].index("--json") + 1]
        assert json.loads((tmp_path / out).read_text())["ok"] is True
