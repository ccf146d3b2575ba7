"""cfg_sample: one CFG decode step of image tokens (V = 16384, Janus-Pro's codebook).

Implementations, all drawing one token per conditional row from [2B, V] logits:
  janus_torch  the official Janus-Pro loop: split interleaved rows, u + g * (c - u), softmax of
               z / T, torch.multinomial (a host sync per step on CUDA)
  hf_processors  transformers' ClassifierFreeGuidanceLogitsProcessor + TemperatureLogitsWarper on
               blocked rows, softmax, torch.multinomial (generation_config top_k = 0, as docs/ARCHITECTURE.md says)
  torch_race   the strongest plain-torch step we know: the same combine and softmax, then an
               exponential race (argmax probs / Exp(1)) instead of multinomial (gpt-fast style)
  reference    pairuni_kernels.reference.cfg_sample (the same Philox stream as the kernels, in torch)
  pairuni      pairuni_kernels.cfg_sample as users call it (on CPU including its default NaN/inf check
               of the logits): the C++ kernel on CPU, the CUDA kernel on GPU. Its `kernel` column
               says what ran: where the extension is not built (a failed build), or was built
               without a kernel for this device, cfg_sample runs the reference, and the row says so
  pairuni_graph  (CUDA) the op replayed from a captured CUDA graph with a device step counter
               (a row noting "skipped" without the CUDA kernel)
  flashinfer   (CUDA, when importable) sampling_from_logits on logits combined by torch first

The baselines (janus_torch, hf_processors, torch_race, flashinfer) are others' code: one that raises
is recorded as "baseline failed: ..." and the suite goes on; pairuni's own failures are "failed: ...".
Each row is written as soon as it is measured (run_all's RowLog).

Bytes of one step: the 2B * V logits read once (the outputs are negligible). On CUDA the
kernel's effective bandwidth is compared with a device copy of the same bytes
(`copy_ratio` = kernel time / copy time of those bytes; the goal is <= 2 at B = 64).

Run: python benchmarks/run_all.py --only sampling [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import contextlib
import os

import torch
from _timing import copy_ms, failure_note, time_ms

from pairuni_kernels import reference
from pairuni_kernels._backend import backend_name
from pairuni_kernels._ext import has_extension
from pairuni_kernels.sampling import cfg_sample

VOCAB = 16384
GUIDANCE, TEMPERATURE = 5.0, 1.0
BATCHES = [1, 8, 16, 64]
QUICK_BATCHES = [1, 4]  # --quick checks the suite runs (CI's dry run of the GPU session)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def janus_torch_step(logits: torch.Tensor) -> torch.Tensor:
    """The official Janus-Pro sampling step (interleaved rows)."""
    cond, uncond = logits[0::2, :], logits[1::2, :]
    guided = uncond + GUIDANCE * (cond - uncond)
    probs = torch.softmax(guided / TEMPERATURE, dim=-1)
    return torch.multinomial(probs, num_samples=1)


def torch_race_step(logits: torch.Tensor, batch: int) -> torch.Tensor:
    """Combine + softmax in torch, then a sync-free exponential race (gpt-fast's sampler)."""
    cond, uncond = logits[:batch], logits[batch:]
    probs = torch.softmax((uncond + GUIDANCE * (cond - uncond)) / TEMPERATURE, dim=-1)
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)


def hf_processors_step(logits: torch.Tensor, input_ids: torch.Tensor, processors) -> torch.Tensor:
    """transformers' logits-processor path (blocked rows), as `generate` runs it per step."""
    scores = processors(input_ids, logits.float())  # `generate` upcasts the step's logits to fp32 first
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def hf_processor_list():
    try:
        from transformers.generation.logits_process import (
            ClassifierFreeGuidanceLogitsProcessor,
            LogitsProcessorList,
            TemperatureLogitsWarper,
        )
    except ImportError:
        return None
    return LogitsProcessorList([ClassifierFreeGuidanceLogitsProcessor(GUIDANCE), TemperatureLogitsWarper(TEMPERATURE)])


def flashinfer_step_fn(logits: torch.Tensor, batch: int):
    try:
        import flashinfer.sampling as fs
    except ImportError:
        return None

    def step():
        cond, uncond = logits[:batch], logits[batch:]
        return fs.sampling_from_logits((uncond + GUIDANCE * (cond - uncond)) / TEMPERATURE)

    return step


def graph_step_fn(logits: torch.Tensor, seeds: torch.Tensor):
    """The op captured once in a CUDA graph; each replay advances a device step counter."""
    step = torch.zeros((), dtype=torch.int64, device=logits.device)

    def body():
        out = cfg_sample(logits, guidance_scale=GUIDANCE, temperature=TEMPERATURE, seeds=seeds, step=step)
        step.add_(1)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def pairuni_kernel(device: str) -> tuple[str, bool]:
    """What `cfg_sample` runs for tensors on `device`: (what to record, whether it is the compiled op)."""
    if backend_name() == "reference":
        return "reference (PAIRUNI_BACKEND=reference)", False
    if not has_extension():
        return "reference (pairuni_kernels._C is not built: no extension to import)", False
    key = "CUDA" if device == "cuda" else "CPU"
    try:
        registered = torch._C._dispatch_has_kernel_for_dispatch_key("pairuni::cfg_sample", key)
    except (AttributeError, RuntimeError):  # no such query in this torch: trust the build
        registered = True
    if not registered:
        return f"reference (this build of pairuni_kernels._C has no {key} kernel for pairuni::cfg_sample)", False
    return f"{key} kernel", True


@contextlib.contextmanager
def forced_reference():
    """cfg_sample through its reference path (where the op has no kernel for the device, the op would raise)."""
    old = os.environ.get("PAIRUNI_BACKEND")
    os.environ["PAIRUNI_BACKEND"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PAIRUNI_BACKEND", None)
        else:
            os.environ["PAIRUNI_BACKEND"] = old


BASELINES = ("janus_torch", "hf_processors", "torch_race", "flashinfer")


def implementations(blocked: torch.Tensor, batch: int, device: str, processors, kernel: tuple[str, bool]) -> dict:
    """name -> zero-argument step function over the same logits (blocked and interleaved copies),
    or a string: why that implementation did not run here."""
    interleaved = torch.stack([blocked[:batch], blocked[batch:]], 1).reshape(2 * batch, -1).contiguous()
    seeds = torch.arange(batch, dtype=torch.int64, device=device)
    input_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
    impls = {"janus_torch": lambda: janus_torch_step(interleaved)}
    if processors is not None:
        impls["hf_processors"] = lambda: hf_processors_step(blocked, input_ids, processors)
    impls["torch_race"] = lambda: torch_race_step(blocked, batch)
    impls["reference"] = lambda: reference.cfg_sample(blocked, guidance_scale=GUIDANCE, temperature=TEMPERATURE,
                                                      seeds=seeds, step=1)

    def pairuni():
        return cfg_sample(blocked, guidance_scale=GUIDANCE, temperature=TEMPERATURE, seeds=seeds, step=1)

    if kernel[1]:
        impls["pairuni"] = pairuni
    else:
        def pairuni_reference():
            with forced_reference():
                return pairuni()

        impls["pairuni"] = pairuni_reference
    if device == "cuda":
        impls["pairuni_graph"] = (lambda: graph_step_fn(blocked, seeds)) if kernel[1] else \
            f"skipped: needs the CUDA kernel; cfg_sample runs the {kernel[0]}"
        fi = flashinfer_step_fn(blocked, batch)
        if fi is not None:
            impls["flashinfer"] = fi
    return impls


def collect(device: str, quick: bool, rows: list | None = None) -> list[dict]:
    rows = [] if rows is None else rows
    processors = hf_processor_list()
    threads = torch.get_num_threads()
    warmup, reps = (1, 3) if quick else (3, 30)
    kernel = pairuni_kernel(device)
    print(f"cfg_sample on {device}: {kernel[0]}", flush=True)
    for dtype_name, dtype in DTYPES.items():
        for batch in (QUICK_BATCHES if quick else BATCHES):
            g = torch.Generator(device="cpu").manual_seed(batch)
            blocked = (torch.randn(2 * batch, VOCAB, generator=g) * 2).to(dtype).to(device)
            nbytes = blocked.numel() * blocked.element_size()
            copy = copy_ms(nbytes, device) if device == "cuda" else None
            base = None
            for name, fn in implementations(blocked, batch, device, processors, kernel).items():
                row = {"case": f"B={batch} V={VOCAB} {dtype_name}", "impl": name}
                if name in ("pairuni", "pairuni_graph"):
                    row["kernel"] = kernel[0]
                if isinstance(fn, str):
                    rows.append({**row, "note": fn})
                    continue
                try:
                    if name == "pairuni_graph":
                        fn = fn()  # captures the graph: its failure is this row's
                    t = time_ms(fn, device, warmup=warmup, reps=reps)
                except Exception as exc:  # noqa: BLE001 - recorded in the row; the next implementation runs
                    rows.append({**row, "note": failure_note(exc, baseline=name in BASELINES)})
                    continue
                if name == "janus_torch":
                    base = t["median_ms"]
                row.update({"ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"]})
                if base is not None:
                    row["speedup_vs_janus"] = base / t["median_ms"]
                row["eff_gbps"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
                if copy is not None:
                    row["copy_ratio"] = t["median_ms"] / copy
                if device == "cpu":
                    row["threads"] = threads
                rows.append(row)
    return rows
