"""A tiny randomly initialised causal LM and its word-level tokenizer, built locally (no hub access).

The model is saved once per session to a temporary directory so trainers load it by path, as TRL
loads its reference model.
"""

from __future__ import annotations

import pytest
import torch

VOCAB_WORDS = 30  # "w0" ... "w29", plus <pad> (0) and <eos> (1)


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(VOCAB_WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def build_tiny_lm(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB_WORDS + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # a visibly non-uniform head so clipping and entropies vary between tokens
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    build_tiny_lm().save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_tokenizer():
    """Passed as an object: loading it back with AutoTokenizer from a qwen2 checkpoint would rebuild a BPE one."""
    return build_tiny_tokenizer()


# ----------------------------------------------------------------------------- verl 0.9.1's own code
class VerlConfig:
    """Stands for verl's ActorConfig / PolicyLossConfig / RolloutCorrectionConfig / AlgoConfig: attributes plus
    `.get` (verl uses both). When verl's source is loaded below, its `ActorConfig` *is* this class, so verl's
    `isinstance(config, ActorConfig)` checks pass."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def get(self, name, default=None):
        return self.__dict__.get(name, default)


def _exec_source(path, module_name, namespace=None):
    import types

    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    module.__dict__.update(namespace or {})
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)  # noqa: S102 - verl's own source
    return module


_VERL_CACHE: dict = {}


def load_verl_from_source(root: str):
    """verl's own `core_algos` and `rollout_corr_helper` from an unpacked wheel (`pip install --no-deps --target
    DIR verl==0.9.1`), with verl's heavy imports (ray, tensordict, omegaconf, its config dataclasses) stubbed while
    the files run and verl's real `torch_functional` masked helpers and `groupwise` in place. sys.modules is
    restored afterwards; returns (core_algos, rollout_corr_helper)."""
    import ast
    import pathlib
    import sys
    import types

    if root in _VERL_CACHE:
        return _VERL_CACHE[root]
    pkg = pathlib.Path(root) / "verl"

    class DataProto:
        def __init__(self, tensors):
            self.batch = tensors

        @classmethod
        def from_dict(cls, tensors):
            return cls(tensors)

    stubs = {
        "omegaconf": {"DictConfig": dict},
        "verl": {"__path__": []}, "verl.trainer": {"__path__": []}, "verl.trainer.ppo": {"__path__": []},
        "verl.workers": {"__path__": []}, "verl.protocol": {"DataProto": DataProto},
        "verl.trainer.config": {"AlgoConfig": type("AlgoConfig", (), {}), "__path__": []},
        "verl.trainer.config.algorithm": {"RolloutCorrectionConfig": VerlConfig},
        "verl.workers.config": {"ActorConfig": VerlConfig, "__path__": []},
        "verl.workers.config.actor": {"PolicyLossConfig": VerlConfig},
        "verl.utils": {"__path__": []},
        "verl.utils.device": {"get_device_name": lambda: "cpu"},
        "verl.utils.import_utils": {"deprecated": lambda *a, **k: (lambda fn: fn)},
        "verl.utils.torch_functional": {"torch": torch},
    }
    saved = {name: sys.modules.get(name) for name in stubs}
    try:
        for name, attrs in stubs.items():
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__dict__.update(attrs)
        tf = sys.modules["verl.utils.torch_functional"]
        tree = ast.parse((pkg / "utils" / "torch_functional.py").read_text())
        wanted = ("masked_sum", "masked_mean", "masked_var", "masked_whiten")
        helpers = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
        code = compile(ast.Module(body=helpers, type_ignores=[]), "torch_functional.py", "exec")
        exec(code, tf.__dict__)  # noqa: S102 - verl's own source
        groupwise = _exec_source(pkg / "utils" / "groupwise.py", "verl.utils.groupwise")
        utils = sys.modules["verl.utils"]
        utils.torch_functional = tf
        utils.as_torch_index, utils.group_mean_std = groupwise.as_torch_index, groupwise.group_mean_std
        core = _exec_source(pkg / "trainer" / "ppo" / "core_algos.py", "verl_core_algos")
        helper = _exec_source(pkg / "trainer" / "ppo" / "rollout_corr_helper.py", "verl_rollout_corr_helper")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    _VERL_CACHE[root] = (core, helper)
    return core, helper


@pytest.fixture
def verl_real(monkeypatch):
    """verl 0.9.1's `core_algos` module: the installed verl, or its source under PAIRUNI_VERL_SOURCE; skipped
    otherwise. Its bypass mode's lazy `from verl.trainer.ppo.rollout_corr_helper import ...` is served for the
    test's duration."""
    import os
    import sys

    try:
        from verl.trainer.ppo import core_algos
        return core_algos
    except ImportError:
        pass
    root = os.environ.get("PAIRUNI_VERL_SOURCE")
    if not root:
        pytest.skip("verl is not importable; set PAIRUNI_VERL_SOURCE to a `pip install --no-deps --target DIR "
                    "verl==0.9.1` directory to compare with verl's own code")
    core, helper = load_verl_from_source(root)
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.rollout_corr_helper", helper)
    return core


@pytest.fixture
def verl_config():
    """The config class the verl tests build ActorConfig-like objects with (see `VerlConfig`)."""
    return VerlConfig


def _tiny_dims(**extra) -> dict:
    """The tiny shape every model below shares with `build_tiny_lm` (same vocabulary and special tokens)."""
    return dict(vocab_size=VOCAB_WORDS + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                eos_token_id=1, bos_token_id=1, tie_word_embeddings=False, **extra)


def _save_tiny(model, path) -> str:
    with torch.no_grad():  # as build_tiny_lm: a visibly non-uniform head
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_moe_lm_dir(tmp_path_factory):
    """A tiny Mixtral (4 experts, top-2): TRL adds its router load-balancing loss (config.output_router_logits)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(1)
    model = MixtralForCausalLM(MixtralConfig(**_tiny_dims(num_local_experts=4, num_experts_per_tok=2,
                                                          router_aux_loss_coef=0.02)))
    return _save_tiny(model, tmp_path_factory.mktemp("tiny_mixtral"))


@pytest.fixture(scope="session")
def tiny_scaled_lm_dir(tmp_path_factory):
    """A tiny Granite: its logits are divided by config.logits_scaling (2.5 here)."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(2)
    return _save_tiny(GraniteForCausalLM(GraniteConfig(**_tiny_dims(logits_scaling=2.5))),
                      tmp_path_factory.mktemp("tiny_granite"))


@pytest.fixture(scope="session")
def tiny_softcap_lm_dir(tmp_path_factory):
    """A tiny Gemma2: its logits are soft-capped, cap * tanh(logits / cap) (config.final_logit_softcapping)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(3)
    config = Gemma2Config(**_tiny_dims(head_dim=8, final_logit_softcapping=5.0))
    return _save_tiny(Gemma2ForCausalLM(config), tmp_path_factory.mktemp("tiny_gemma2"))
