"""Image rollouts: the engine's CFG loop against transformers' `generate(generation_mode="image")`.

Both run on the same random Janus, the same prompts (G rows per prompt, as in PairGRPO) and the
same CFG scale / temperature, side by side in one process. Reported per implementation: image
tokens per second (one per image, both CFG branches together), ms per decode step (a rollout's
time over its K image tokens), the ratio to transformers, and on CUDA the weight-streaming bound:
a decode step reads every language-model and generation-head weight once, so it takes at least
weight bytes / measured copy bandwidth.

Cases: CPU, a scaled-down Janus (hidden 256, 4 layers, the 16384-entry codebook, 256 image
tokens, B=4); CUDA, Janus-Pro-1B and -7B language-model shapes in bf16 (random weights, 576 image
tokens, B=16). The engine runs eager and with `compile=True` (torch.compile of its decode step;
CUDA graphs on CUDA). `quick`: on CUDA the 1B case with 64 image tokens and no torch.compile (the
GPU session's short case), on CPU the engine's tiny Janus (the session's dry run).

transformers' `generate` is the baseline: if it raises, its row records the error ("baseline
failed: TypeError: ...") and the engine's rows are still measured. It is handed its static KV cache
(see `generate_cache_kwargs`): transformers 5.17's Janus image `generate` builds its own through
`GenerationMixin._prepare_static_cache` without the `prefill_chunk_size` argument that release
requires, a TypeError on every call; 5.24 passes it. Given a cache, both skip that call.
Each row is written as soon as it is measured (run_all's RowLog).
Usage: python benchmarks/run_all.py --only rollout [--quick]
"""

from __future__ import annotations

import inspect

import torch
from _timing import copy_bandwidth_gbps, failure_note, sync, time_ms

CFG_SCALE = 5.0
TEMPERATURE = 1.0
PROMPT_LEN = 24
GROUP = 4  # rows per prompt


def cpu_model(quick: bool):
    from engine.model import tiny_janus

    if quick:
        return tiny_janus(96, seed=0), torch.float32
    # 128 px / 8 px patches: a 16 x 16 grid of image tokens
    return tiny_janus(1024, seed=0, hidden_size=256, num_layers=4, image_size=128, patch_size=8,
                      codebook_size=16384), torch.float32


def cuda_model(name: str, image_tokens: int):
    import train_one_gpu

    model, _ = train_one_gpu.build_model(name, torch.device("cuda"), torch.bfloat16, {}, "auto")
    side = int(image_tokens ** 0.5)
    # fewer decode steps (shapes per step unchanged), for the engine (VQ grid) and transformers (vision config)
    model.model.vqmodel.quantize.quant_state_dims = [side, side]
    model.model.vision_model.config.num_image_tokens = side * side
    return model, torch.bfloat16


def prompts(model, batch: int, device: str):
    from engine.model import TINY_SPECIAL

    g = torch.Generator().manual_seed(0)
    body = torch.randint(6, 96, (batch // GROUP, PROMPT_LEN), generator=g).repeat_interleave(GROUP, 0)
    ids = torch.cat([torch.full((batch, 1), TINY_SPECIAL.bos), body, torch.full((batch, 1), TINY_SPECIAL.boi)], 1)
    return ids.to(device), torch.ones_like(ids).to(device)


def weight_bytes(model) -> int:
    """Bytes a decode step must read: the language model and the generation head / embeddings."""
    lm = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    lm -= model.model.language_model.embed_tokens.weight.numel() * model.model.language_model.embed_tokens.weight.element_size()
    heads = [model.model.generation_head, model.model.generation_aligner]
    return lm + sum(p.numel() * p.element_size() for m in heads for p in m.parameters())


def generate_cache_kwargs(model, prompt_len: int, image_tokens: int) -> dict:
    """A fresh static KV cache for one image `generate` call, under the argument name the installed
    transformers reads (`cache` where the language model takes `cache`, from 5.2x on; `past_key_values`
    before), sized as `generate` sizes its own (2B rows, prompt + image tokens; rows come from the
    cache's lazy initialisation). transformers 5.17's Janus image `generate` otherwise calls
    `self._prepare_static_cache(...)` without the `prefill_chunk_size` argument that its
    `GenerationMixin._prepare_static_cache` requires: TypeError, whatever the model or arguments."""
    from transformers import StaticCache

    params = inspect.signature(type(model.model.language_model).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    length = max(model.generation_config.max_length or 0, image_tokens + prompt_len)
    return {name: StaticCache(config=model.config.text_config, max_cache_len=length)}


def run_case(name: str, batch: int, tokens: int, device: str, quick: bool, rows: list) -> list[dict]:
    from engine.model import image_token_count
    from engine.rollout import rollout_generation

    model, _ = cpu_model(quick) if device == "cpu" else cuda_model(name, tokens)
    k_img = image_token_count(model)
    ids, mask = prompts(model, batch, device)
    seeds = torch.arange(batch, dtype=torch.int64)
    engine_kw = {"cfg_scale": CFG_SCALE, "temperature": TEMPERATURE, "seeds": seeds, "decode": False}

    def transformers_generate():  # a new cache per call, as generate makes one per call itself
        return model.generate(ids, attention_mask=mask, generation_mode="image", do_sample=True,
                              guidance_scale=CFG_SCALE, temperature=TEMPERATURE, top_k=0,
                              **generate_cache_kwargs(model, ids.shape[1], k_img))

    impls = {
        "transformers": transformers_generate,
        "engine": lambda: rollout_generation(model, ids, mask, **engine_kw),
    }
    if not quick:  # warm-up compiles; the timed rollouts replay
        impls["engine+compile"] = lambda: rollout_generation(model, ids, mask, compile=True, **engine_kw)
    bound_ms = None
    if device == "cuda":
        bound_ms = weight_bytes(model) / (copy_bandwidth_gbps(1 << 30, device) * 1e9) * 1e3
    reps = 1 if quick else 2
    base = None
    for impl, fn in impls.items():
        row = {"case": f"{name} B={batch} K={k_img}", "impl": impl}
        try:
            t = time_ms(fn, device, warmup=1, reps=reps)["median_ms"]
            sync(device)
        except Exception as exc:  # noqa: BLE001 - recorded; the next implementation still runs
            rows.append({**row, "note": failure_note(exc, baseline=impl == "transformers")})
            continue
        if impl == "transformers":
            base = t
        row.update({"rollout_ms": t, "step_ms": t / k_img, "tokens_per_s": batch * k_img / (t * 1e-3)})
        if base is not None:
            row["speedup_vs_transformers"] = base / t
        if bound_ms is not None:
            row["bound_step_ms"] = bound_ms
            row["step_over_bound"] = t / k_img / bound_ms
        rows.append(row)
    return rows


def collect(device: str, quick: bool, rows: list | None = None) -> list[dict]:
    rows = [] if rows is None else rows
    if device == "cuda":
        cases = [("janus-pro-1b", 16, 64)] if quick else [("janus-pro-1b", 16, 576), ("janus-pro-7b", 16, 576)]
    else:
        cases = [("cpu-tiny", 4, 16)] if quick else [("cpu-h256-l4", 4, 256)]
    for case in cases:
        run_case(*case, device, quick, rows)
        if device == "cuda":
            torch.cuda.empty_cache()  # the next case's model gets the memory of this one
    return rows
