# TRL's GRPOTrainer with pairuni's chunked LM-head log-probs and clipped loss: swap the class, keep the rest.
import tempfile

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig

from pairuni_kernels.integrations.trl import PairUniGRPOTrainer

# A tiny random model and word-level tokenizer so this runs anywhere in seconds; bring your own.
words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(30)}}
core = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1))

# One row per prompt; "pair_weight" (optional) multiplies that prompt's advantages, as PairGRPO does.
dataset = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5 w6"], "pair_weight": [1.0, 0.7]})


def reward(completions, **kwargs):  # any TRL reward function
    return [float(c.count("w7") - c.count("w3")) for c in completions]


args = GRPOConfig(output_dir=tempfile.mkdtemp(), loss_type="dr_grpo", scale_rewards="group", num_generations=4,
                  per_device_train_batch_size=8, max_completion_length=8, max_steps=1, use_cpu=True,
                  report_to="none")
trainer = PairUniGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                             processing_class=tokenizer, weight_column="pair_weight")
trainer.train()
print("train_loss", trainer.state.log_history[-1]["train_loss"])
