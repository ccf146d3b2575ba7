"""Full PairGRPO steps of random-weight Janus-Pro-7B (and -1B) shapes on ONE GPU: peak memory and step time.

    python benchmarks/train_one_gpu.py                       # 7B with G=4, then 1B with G=8 (CUDA)
    python benchmarks/train_one_gpu.py --only janus-pro-7b --steps 3
    python benchmarks/train_one_gpu.py --smoke               # tiny shapes on CPU: checks the script only
    python benchmarks/train_one_gpu.py --only janus-pro-7b --lora-rank 64 --lora-quantize nf4   # the 24 GB setting
    python benchmarks/train_one_gpu.py --only janus-pro-7b --update stochastic_rounding         # the 1-GPU config's

Weights do not change memory or speed, so a randomly initialised `JanusForConditionalGeneration`
with exactly the released shapes (engine.janus_shapes) measures what a real run costs without any
download. Each step is the engine's own `PairGRPOTrainer.train_step`: understanding rollouts
(G answers of up to `--answer-tokens` tokens to a question about a 384 px image = 576 vision
tokens), CFG image rollouts (G images x 576 tokens, [cond; uncond]), rewards, advantages, then the
update (teacher-forced forward/backward with gradient checkpointing, fused linear losses, AdamW8bit,
or torch AdamW with --optimizer adamw). One pair per step, bf16 weights, the settings of configs/janus_pro_7b_1gpu.yaml.

Departures from a real run, all on the cheap side of the rollouts only: prompts come from the toy
tokenizer (a question is ~10-20 tokens plus 576 image tokens; Janus' chat template adds ~30),
and the generation reward is the toy-world colour reward on the decoded images (CLIP/HPSv2 cost
a forward pass of their own model on top). The random policy rarely emits EOS, so every answer
runs to `--answer-tokens` (the worst case).

Writes benchmarks/results/train_one_gpu_<device>.{json,md} (and copies to $OUT when set):
per step the rollout / update / total seconds and `torch.cuda.max_memory_allocated`, plus the
`pairuni plan` estimate for the same run. A step that runs out of memory is recorded with the
allocator summary, not hidden. The JSON and markdown are rewritten (atomically) after the model is
built and after every step, with `"complete": false` until the end, so a run that is killed keeps
the steps it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).resolve().parent))
from _isolate import atomic_write  # noqa: E402  (benchmarks/ is on the path only from here on)

# (model, group size): 7B with the paper's G=4, 1B with G=8
RUNS = {"janus-pro-7b": 4, "janus-pro-1b": 8}
# --smoke: the released vocabularies (text 102400, image codebook 16384) on a tiny language model, and the
# engine's tiny vision encoder and VQ model (32 px images, 4x4 = 16 image tokens instead of 576)
SMOKE_SHAPES = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=4)
SMOKE_ANSWER_TOKENS = 8


def build_model(name: str, device: torch.device, dtype: torch.dtype, text_overrides: dict, attn: str,
                tiny_image: bool = False):
    """Random-weight Janus-Pro with the exact (or, for --smoke, overridden) shapes, wired to the toy prompts.

    tiny_image: the engine's tiny vision encoder and VQ model instead of SigLIP-L at 384 px (--smoke).
    """
    from transformers import JanusForConditionalGeneration

    from engine.janus_shapes import IMAGE_CODEBOOK, janus_pro_config
    from engine.model import TINY_SPECIAL, attention_backend, tiny_janus_config

    config = janus_pro_config(name, **text_overrides)
    if tiny_image:
        tiny = tiny_janus_config(hidden_size=config.text_config.hidden_size, codebook_size=IMAGE_CODEBOOK)
        config.vision_config, config.vq_config = tiny.vision_config, tiny.vq_config
    config.image_token_id = TINY_SPECIAL.image  # the toy prompts' image placeholder
    if attn == "auto":
        attn = attention_backend() if device.type == "cuda" else "sdpa"
    config._attn_implementation = attn
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = JanusForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = TINY_SPECIAL.bos, TINY_SPECIAL.eos, TINY_SPECIAL.pad
    gc.generation_kwargs = {"boi_token_id": TINY_SPECIAL.boi}
    return model.eval(), attn


class DeviceMemoryPeak:
    """Highest device memory in use (total - free, from cudaMemGetInfo) while the block runs, sampled by
    a thread: unlike max_memory_allocated it sees memory outside torch's caching allocator."""

    def __init__(self, device: torch.device, period_s: float = 0.005):
        self.device, self.period_s, self.peak_gib = device, period_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _used_gib(self) -> float:
        free, total = torch.cuda.mem_get_info(self.device)
        return (total - free) / 2**30

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_gib = max(self.peak_gib, self._used_gib())
            self._stop.wait(self.period_s)

    def __enter__(self):
        if self.device.type == "cuda":
            self.peak_gib = self._used_gib()
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self._stop.set()
            self._thread.join()
            self.peak_gib = max(self.peak_gib, self._used_gib())
        return False


def run_one(name: str, group_size: int, args, device: torch.device, progress=None) -> dict:
    """One model's run; `progress(result)` is called with the result so far once the model is built and
    after every step."""
    from engine import plan
    from engine.build import assemble
    from engine.config import load_config
    from engine.data import default_pairs_path, read_pairs
    from engine.janus_shapes import parameter_counts
    from engine.model import image_token_count
    from engine.run_start import validated_pairs
    from engine.text import ToyPrompts, ToyTokenizer
    from engine.trainer import PairGRPOTrainer

    overrides = [f"rollout.group_size={group_size}", "data.pairs_per_step=1", "data.max_pairs=null",
                 f"rollout.max_new_tokens={args.answer_tokens}", "model.dtype=bfloat16",
                 "model.gradient_checkpointing=true", f"optim.optimizer={args.optimizer}", "optim.lr=1e-6",
                 f"optim.micro_batch_size={args.micro_batch}", "algo.mu=1",
                 f"optim.master_weights={str(args.master_weights).lower()}", "reward.generation=toyworld",
                 f"optim.update={args.update}", f"model.lora.rank={args.lora_rank}",
                 f"model.lora.alpha={2 * max(args.lora_rank, 1)}", f"model.lora.quantize={args.lora_quantize}",
                 f"train.device={device.type}", "train.progress=false", f"train.run_dir={args.run_dir}/{name}"]
    cfg = load_config(None, overrides)
    pairs, root = validated_pairs(cfg)
    texts = [t for p in read_pairs(default_pairs_path()) for t in (p.understand.question, p.understand.answer,
                                                                   p.generate.prompt)]
    tok = ToyTokenizer.from_texts(texts)
    shapes = SMOKE_SHAPES if args.smoke else {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model, attn = build_model(name, device, torch.bfloat16, shapes, args.attn, tiny_image=args.smoke)
    if args.lora_quantize == "nf4":  # as engine.build does for a loaded checkpoint
        from engine.lora import quantize_nf4

        model = quantize_nf4(model, device)
    build_s = time.perf_counter() - t0
    vis = model.config.vision_config
    prompts = ToyPrompts(tok, image_size=vis.image_size, num_image_tokens=vis.num_image_tokens)
    trainer = PairGRPOTrainer(cfg, assemble(cfg, model, prompts, pairs, root, tokenizer_json=tok.to_json()))
    counts = parameter_counts(model.config)
    result = {"model": name, "shapes": "exact" if not shapes else f"smoke: text {shapes}, tiny vision and VQ",
              "group_size": group_size,
              "pairs_per_step": 1, "image_tokens": image_token_count(model), "answer_tokens": args.answer_tokens,
              "micro_batch": args.micro_batch, "attention": attn, "dtype": "bfloat16",
              "optimizer": type(trainer.optimizer.inner).__name__, "gradient_checkpointing": True,
              "master_weights": args.master_weights, "update": args.update,
              "lora": f"r={args.lora_rank}, base {args.lora_quantize}" if args.lora_rank else "none",
              "parameters": sum(counts.values()), "build_s": build_s, "steps": []}
    if device.type == "cuda":
        result["mem_after_build_gib"] = torch.cuda.memory_allocated(device) / 2**30
    if progress:
        progress(result)
    for _ in range(args.steps):
        try:
            with DeviceMemoryPeak(device) as device_peak:
                row = trainer.train_step()
        except torch.OutOfMemoryError as exc:
            result["oom"] = str(exc).splitlines()[0]
            result["memory_summary"] = torch.cuda.memory_summary(device) if device.type == "cuda" else ""
            break
        step = {"rollout_s": row["time.rollout_s"], "update_s": row["time.update_s"],
                "step_s": row["time.rollout_s"] + row["time.update_s"]}
        if "mem.peak_gib" in row:
            step["peak_allocated_gib"] = row["mem.peak_gib"]
            step["reserved_gib"] = torch.cuda.memory_reserved(device) / 2**30
            step["device_used_peak_gib"] = device_peak.peak_gib
        result["steps"].append(step)
        print(f"{name} step {len(result['steps'])}: " + ", ".join(f"{k} {v:.2f}" for k, v in step.items()), flush=True)
        if progress:
            progress(result)
    # the planner's estimate for this very run (prompt width: the longest understanding prompt seen); a
    # failure of the planner is recorded, never allowed to lose the steps measured above
    question = max(len(tok.encode(p.understand.question)) for p in pairs) + 1
    try:
        est = plan.estimate(plan.plan_of_run(cfg, gpus=1, model=name, prompt_tokens=question))
    except Exception as exc:  # noqa: BLE001 - recorded in the result
        result["plan_error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        print(f"plan estimate failed: {result['plan_error']}", flush=True)
    else:
        if not shapes:
            result["plan_gib"] = {k: est[k] / 2**30 for k in ("weights", "grads", "optimizer", "activations", "loss",
                                                              "kv_cache", "rollout_peak", "update_peak", "peak")
                                  if k in est}
    later = result["steps"][1:] or result["steps"]  # step 1 includes allocator and optimizer-state warm-up
    if later:
        result["mean_after_first"] = {k: sum(s[k] for s in later) / len(later) for k in later[0]}
        if "peak_allocated_gib" in later[0]:
            result["max_peak_allocated_gib"] = max(s["peak_allocated_gib"] for s in result["steps"])
            result["max_device_used_gib"] = max(s["device_used_peak_gib"] for s in result["steps"])
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(results: list[dict], env: dict) -> str:
    lines = [f"# PairGRPO on one device: {env['device_name']}", "",
             f"torch {env['torch']}, {env['when']}; random weights, one pair per step, bf16, gradient "
             "checkpointing, optimizer as in the table, mu=1, fp32 master weights "
             f"{'on' if results and results[0].get('master_weights') else 'off'}, update "
             f"{results[0].get('update', 'round') if results else 'round'}, LoRA "
             f"{results[0].get('lora', 'none') if results else 'none'}.", "",
             "| model | G | optimizer | params (B) | peak allocated (GiB) | peak device used (GiB) | planned peak (GiB) "
             "| rollout (s) | update (s) | step (s) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.get("mean_after_first", {})
        lines.append("| {} | {} | {} | {:.2f} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["model"], r["group_size"], r["optimizer"], r["parameters"] / 1e9,
            f"{r['max_peak_allocated_gib']:.1f}" if "max_peak_allocated_gib" in r else "-",
            f"{r['max_device_used_gib']:.1f}" if "max_device_used_gib" in r else "-",
            f"{r['plan_gib']['peak']:.1f}" if "plan_gib" in r else "-",
            *(f"{m[k]:.2f}" if k in m else "-" for k in ("rollout_s", "update_s", "step_s")),
            ("OOM: " + r["oom"][:60]) if "oom" in r else r["shapes"] if r["shapes"] != "exact" else ""))
    lines += ["", "Times are means over the steps after the first; peaks are maxima over all steps. Peak allocated "
              "is torch.cuda.max_memory_allocated (the caching allocator's tensors); peak device used is "
              "total - free from torch.cuda.mem_get_info, sampled every 5 ms during each step (everything on "
              "the device: the allocator's cache, CUDA context, library workspaces, managed memory)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=tuple(RUNS), default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--answer-tokens", type=int, default=None,
                    help=f"answer length of the understanding rollouts (64; {SMOKE_ANSWER_TOKENS} with --smoke)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--master-weights", action="store_true",
                    help="fp32 master weights (optim.master_weights): what lr 1e-6 on bf16 weights needs; +4 B/param")
    ap.add_argument("--update", default="round", choices=("round", "kahan", "stochastic_rounding"),
                    help="optim.update: compensated bf16 updates instead of master weights")
    ap.add_argument("--lora-rank", type=int, default=0, help="model.lora.rank (0: full fine-tuning)")
    ap.add_argument("--lora-quantize", default="none", choices=("none", "nf4"),
                    help="model.lora.quantize: nf4 (CUDA) keeps the language model's projections in 4 bits")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "auto", "flash_attention_2", "eager"),
                    help="attention of the language model (auto: flash-attention-2 when importable, as the engine)")
    ap.add_argument("--optimizer", default="adamw8bit", choices=("adamw8bit", "adamw"),
                    help="adamw when bitsandbytes is not installed (the GPU session records which ran)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes (see SMOKE_SHAPES), CPU allowed: checks the script only")
    ap.add_argument("--run-dir", default="/tmp/pairuni_bench_7b")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.answer_tokens is None:
        args.answer_tokens = SMOKE_ANSWER_TOKENS if args.smoke else 64
    import logging

    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("train_one_gpu: no CUDA device; use --smoke to check the script on CPU", file=sys.stderr)
        return 2
    if device.type != "cuda" and args.lora_quantize == "nf4":
        print("train_one_gpu: 4-bit NF4 skipped (bitsandbytes NF4 needs CUDA): LoRA on a bf16 base instead", flush=True)
        args.lora_quantize = "none"
    env = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "total_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda"
           else None}
    tag = ("smoke" if args.smoke else device.type) + ("_master" if args.master_weights else "")
    tag += f"_{args.update}" if args.update != "round" else ""
    tag += f"_lora{args.lora_rank}" + ("_nf4" if args.lora_quantize == "nf4" else "") if args.lora_rank else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []

    def write(current: dict | None = None, complete: bool = False) -> None:
        shown = results + ([current] if current is not None else [])
        atomic_write(out / f"train_one_gpu_{tag}.json",
                     json.dumps({"env": env, "complete": complete, "results": shown}, indent=1, default=str))
        atomic_write(out / f"train_one_gpu_{tag}.md", markdown(shown, env))

    for name, g in RUNS.items():
        if args.only and name != args.only:
            continue
        results.append(run_one(name, g, args, device, progress=write))
    write(complete=True)
    print(markdown(results, env))
    if os.environ.get("OUT"):
        for ext in ("json", "md"):
            shutil.copy(out / f"train_one_gpu_{tag}.{ext}", Path(os.environ["OUT"]) / f"train_one_gpu_{tag}.{ext}")
    return 0 if all("oom" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
