# Cosine between the understanding-loss and generation-loss gradients on the shared language-model layers,
# for PairUG pairs and for the same samples randomly re-paired. Tiny random Janus + bundled toy world: seconds
# on CPU. Real model: load_config("configs/janus_pro_1b.yaml") (model.path = a local Janus-Pro directory).
from engine.config import load_config
from engine.probe import probe_gradients

cfg = load_config(None, ["rollout.group_size=4", "rollout.max_new_tokens=3", "train.progress=false"])
result = probe_gradients(cfg, num_batches=6, pairs_per_batch=4, seed=0)  # out_dir="probe/": JSON + box plot
print(result.format_table())
s = result.summary
print("median_paired", s["paired"]["median"], "median_random", s["random"]["median"])
