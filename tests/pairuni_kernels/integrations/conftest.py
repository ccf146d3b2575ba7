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
