"""Where a policy comes from: a model folder, a checkpoint, or a run's newest verified checkpoint.

    policy = load_policy("runs/tiny")            # RUN_DIR | CHECKPOINT | Hugging Face model folder
    policy.model, policy.prompts                 # JanusForConditionalGeneration (eval mode), prompt builder

One loader for everything that reads a trained policy back (`pairuni eval`, `pairuni export`, the
trainer's `model.path`):

- a Hugging Face folder (config.json + safetensors): Janus-Pro with its processor files, or a folder
  `pairuni export` wrote from a tiny-model run, recognised by its toy tokenizer file
  (`TOY_TOKENIZER_FILE`), whose prompts are then the toy ones;
- a checkpoint `RUN/checkpoints/step_N` (verified against its manifest first): the base model the run
  started from (its `model.path`, or the tiny random Janus rebuilt from the saved seed, palette and
  tokenizer) with the checkpoint's trained weights (`trained_weights`) written over it; a LoRA run's
  (`model.lora.rank > 0`: its checkpoints hold the adapters only) gets the run's adapters first
  (`run_lora`; on a base quantized to NF4 again when the run's was), so the policy is the adapted model
  the run trained;
- a run folder: its newest verified checkpoint, chosen as a resumed run would choose it;
- an adapter folder `pairuni export --adapter-only` wrote: the base its `pairuni_export.json` names, rebuilt
  as for a checkpoint, with the folder's adapters.

Every problem is one line (`PolicySourceError`, a ValueError) naming the path, before a model loads
where it can be found by looking at files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import lora
from . import model as janus
from .checkpoint import DCP_METADATA, STATE, is_sharded, read_state
from .checkpoint_store import MANIFEST, CheckpointError, CheckpointStore, verify
from .preflight import PreflightError, check_model_dir
from .text import JanusPrompts, ToyPrompts, ToyTokenizer

log = logging.getLogger("pairuni.policy_io")

#: The toy tokenizer's vocabulary, written by `pairuni export` beside a tiny model's weights.
TOY_TOKENIZER_FILE = "toy_tokenizer.json"
#: Where an exported folder came from (source checkpoint, step, dtype, which weights, the run's config).
EXPORT_INFO_FILE = "pairuni_export.json"
#: The file that makes a folder a peft adapter folder (`pairuni export --adapter-only` writes one).
ADAPTER_CONFIG = "adapter_config.json"


class PolicySourceError(ValueError):
    """A model folder, checkpoint or run that cannot be loaded as a policy; the message is one line naming it."""


@dataclass
class PolicySource:
    """A resolved source. kind: "model" (a Hugging Face folder) | "checkpoint" | "adapter" (a LoRA run's adapters
    alone, as `pairuni export --adapter-only` writes them); skipped: checkpoints of a run passed over as damaged,
    one line each."""

    kind: str
    path: Path
    skipped: list[str] = field(default_factory=list)


@dataclass
class LoadedPolicy:
    """model: `JanusForConditionalGeneration` in eval mode; prompts: `ToyPrompts` | `JanusPrompts`.

    tokenizer_json: the toy tokenizer's vocabulary (tiny models only); base_path: the Hugging Face folder
    the frozen weights and processor files come from (None: the tiny random Janus); config: the run's
    config as a dict when known (a checkpoint's state.json, an export's info file); step: the training
    step of the weights when known; weights: where the trained weights came from, in words.
    """

    model: torch.nn.Module
    prompts: object
    source: PolicySource
    tokenizer_json: str | None = None
    base_path: Path | None = None
    config: dict | None = None
    step: int | None = None
    weights: str = "the model folder"
    lora: object | None = None


# ----------------------------------------------------------------------------- finding the source
def resolve_source(source: str | Path, *, key: str = "--model") -> PolicySource:
    """What `source` is, verified: a model folder, a checkpoint (checksums checked) or a run (its newest
    verified checkpoint). Raises PolicySourceError naming `key` and the path."""
    path = Path(source)
    if not path.exists():
        raise PolicySourceError(f"{key}: {source} does not exist")
    if not path.is_dir():
        raise PolicySourceError(f"{key}: {source} is not a folder (expected a run, a checkpoint or a model folder)")
    if (path / MANIFEST).is_file() or (path / STATE).is_file() or (path / DCP_METADATA).is_file():
        try:
            verify(path)
        except CheckpointError as err:
            raise PolicySourceError(f"{key}: {err}") from None
        return PolicySource("checkpoint", path)
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        try:
            point = CheckpointStore(path).resume_candidate(deep=True)
        except CheckpointError as err:
            raise PolicySourceError(f"{key}: {err}") from None
        if point.path is None:
            raise PolicySourceError(f"{key}: run {source} has no checkpoint yet")
        for skipped in point.skipped:
            log.warning("%s: skipped %s", key, skipped)
        return PolicySource("checkpoint", point.path, point.skipped)
    if (path / ADAPTER_CONFIG).is_file():
        if not (path / EXPORT_INFO_FILE).is_file():
            raise PolicySourceError(f"{key}: {source} is a peft adapter folder without {EXPORT_INFO_FILE}, so its base "
                                    "model is unknown (load it with peft.PeftModel.from_pretrained on its base)")
        return PolicySource("adapter", path)
    if (path / "config.json").is_file():
        try:
            check_model_dir(path, key=key)
        except PreflightError as err:
            raise PolicySourceError(str(err)) from None
        return PolicySource("model", path)
    raise PolicySourceError(f"{key}: {source} is not a run (no checkpoints/), a checkpoint (no {MANIFEST}) "
                            "or a Hugging Face model folder (no config.json)")


def folder_dtype(path: str | Path) -> str:
    """The dtype a model folder's config.json records (`dtype` / `torch_dtype`), float32 when it names none."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return name if name in janus.DTYPES else "float32"


# ----------------------------------------------------------------------------- building the model
def tiny_policy(tokenizer: ToyTokenizer, device: torch.device | str, *, dtype: str = "float32", seed: int = 0,
                palette: bool = True):
    """(tiny random Janus for `tokenizer`'s vocabulary, its toy prompts): `model.tiny_seed`, `model.tiny_palette`
    and `model.dtype` of a run rebuild exactly the model that run started from."""
    from .data import toyworld

    colours = None
    if palette:
        n_codes = janus.tiny_janus_config(len(tokenizer)).vq_config.num_embeddings
        colours = janus.codebook_palette([toyworld.BACKGROUND, *toyworld.COLORS.values()], n_codes, seed=seed)
    model = janus.tiny_janus(len(tokenizer), seed=seed, palette=colours)
    log.info("model: tiny random Janus (vocab %d), attention sdpa", len(tokenizer))
    model = model.to(device=device, dtype=janus.DTYPES[dtype])
    return model, toy_prompts(model, tokenizer)


def toy_prompts(model, tokenizer: ToyTokenizer) -> ToyPrompts:
    vis = model.config.vision_config
    return ToyPrompts(tokenizer, image_size=vis.image_size, num_image_tokens=vis.num_image_tokens)


def load_model_folder(path: str | Path, *, dtype: str, device: torch.device | str = "cpu",
                      attn_implementation: str = "auto"):
    """(model, prompts, toy tokenizer JSON or None) of a Hugging Face folder: Janus-Pro with `JanusPrompts`, or
    an exported tiny model (it holds `TOY_TOKENIZER_FILE`) with `ToyPrompts`."""
    model = janus.load_janus(str(path), dtype=dtype, device=device, attn_implementation=attn_implementation)
    toy = Path(path) / TOY_TOKENIZER_FILE
    if toy.is_file():
        tokenizer_json = toy.read_text()
        gc = model.generation_config
        if not (getattr(gc, "generation_kwargs", None) or {}).get("boi_token_id"):
            janus.set_tiny_generation_config(model)
        return model, toy_prompts(model, ToyTokenizer.from_json(tokenizer_json)), tokenizer_json
    prompts = JanusPrompts(str(path))
    janus.complete_generation_config(model, prompts.processor.tokenizer)
    return model, prompts, None


def load_policy(source: str | Path | PolicySource, *, dtype: str | None = None, device: torch.device | str = "cpu",
                attn_implementation: str = "auto", key: str = "--model") -> LoadedPolicy:
    """The policy of a run, a checkpoint or a model folder (see the module docstring), in eval mode.

    dtype: of every weight (None: the run's `model.dtype`, or the folder's config.json dtype). A checkpoint's
    frozen weights are built at the run's dtype first, so they are those the run trained with, then cast.
    """
    src = source if isinstance(source, PolicySource) else resolve_source(source, key=key)
    if src.kind == "model":  # a Hugging Face folder: every weight is in it
        dtype = dtype or folder_dtype(src.path)
        model, prompts, tok = load_model_folder(src.path, dtype=dtype, device=device,
                                                attn_implementation=attn_implementation)
        info = export_info(src.path)
        return LoadedPolicy(model.eval(), prompts, src, tok, src.path, info.get("config"), info.get("step"))
    if src.kind == "adapter":
        info = export_info(src.path)
        toy = src.path / TOY_TOKENIZER_FILE
        config, step = info.get("config") or {}, info.get("step")
        tokenizer_json = toy.read_text() if toy.is_file() else None
        write_weights = functools.partial(write_adapter_weights, folder=src.path, key=key)
    else:
        state = read_state(src.path)
        config, step, tokenizer_json = state.get("config") or {}, int(state["step"]), state.get("tokenizer")
        write_weights = functools.partial(write_trained_weights, checkpoint=src.path, key=key)
    where = f"{key}: {'adapter folder' if src.kind == 'adapter' else 'checkpoint'} {src.path}"
    run = config.get("model") or {}
    run_dtype = run.get("dtype", "float32")
    adapters = run_lora(config)
    if src.kind == "adapter" and adapters is None:
        raise PolicySourceError(f"{where}: its {EXPORT_INFO_FILE} holds no model.lora settings")
    nf4 = adapters is not None and adapters.quantize == "nf4"
    build_device = "cpu" if nf4 else device  # an NF4 base is quantized on its way to `device`
    base = run.get("path")
    if base is None:
        if tokenizer_json is None:
            raise PolicySourceError(f"{where} has no model.path and no toy tokenizer")
        tok = ToyTokenizer.from_json(tokenizer_json)
        model, prompts = tiny_policy(tok, build_device, dtype=run_dtype, seed=run.get("tiny_seed", 0),
                                     palette=run.get("tiny_palette", True))
        tok_json, base_path = tokenizer_json, None
    else:
        base_path = Path(base)
        if not (base_path / "config.json").is_file():
            raise PolicySourceError(f"{where} was trained from model.path={base}, which is not a model folder here")
        model, prompts, tok_json = load_model_folder(base_path, dtype=run_dtype, device=build_device,
                                                     attn_implementation=attn_implementation)
    if dtype is not None and dtype != run_dtype:
        model = model.to(janus.DTYPES[dtype])
    if adapters is not None:
        model = with_adapters(model, adapters, device, key=where)
    weights = write_weights(model)
    if adapters is not None:
        weights = f"the LoRA adapters ({weights}) on the frozen base"
    return LoadedPolicy(model.eval(), prompts, src, tok_json, base_path, config or None, step, weights, adapters)


def run_lora(config: dict | None):
    """The `model.lora` settings (a `config.LoraConfig`) of a run's saved config when it trained LoRA adapters
    (rank > 0), else None. Keys this engine does not know are ignored."""
    from .config import LoraConfig

    values = ((config or {}).get("model") or {}).get("lora") or {}
    if int(values.get("rank", 0) or 0) <= 0:
        return None
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in values.items() if k in known})


def with_adapters(model, settings, device: torch.device | str, *, key: str):
    """`model` with LoRA adapters of `settings` (their weights still B = 0), its language model's projections
    first quantized to NF4 on the way to `device` when `settings.quantize` is nf4, as the run's were
    (bitsandbytes: CUDA, or its CPU backend where the installed version has one). Raises PolicySourceError."""
    if settings.quantize == "nf4":
        try:
            model = lora.nf4_layers(model).to(device)
        except (ImportError, RuntimeError, NotImplementedError, AssertionError) as err:
            raise PolicySourceError(f"{key} trained LoRA on a 4-bit NF4 base, which bitsandbytes cannot build on "
                                    f"{device} here ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                    "load it on a CUDA device") from None
        unquantized = [n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"
                       and getattr(p, "quant_state", None) is None]
        if unquantized:
            raise PolicySourceError(f"{key} trained LoRA on a 4-bit NF4 base, which this bitsandbytes does not "
                                    f"quantize on {device} ({unquantized[0]}); load it on a CUDA device")
    lora.add_adapters(model, settings)
    return model


def export_info(path: Path) -> dict:
    """The `EXPORT_INFO_FILE` of a model folder `pairuni export` wrote ({} for any other folder)."""
    try:
        return json.loads((Path(path) / EXPORT_INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def saved_config(src: PolicySource) -> dict | None:
    """The config (as a dict) of the run a source comes from: a checkpoint's state.json, an exported folder's
    info file; None when unknown. Reads no weights."""
    try:
        if src.kind == "checkpoint":
            return read_state(src.path).get("config")
    except (OSError, ValueError):
        return None
    return export_info(src.path).get("config")


# ----------------------------------------------------------------------------- the trained weights
def trained_weights(checkpoint: str | Path) -> tuple[str, Iterator[tuple[str, torch.Tensor]]]:
    """(where they come from, in words; (parameter name, tensor) of every weight the run trained).

    The one place that decides which weights of a checkpoint a loaded or exported policy gets: the fp32
    master weights when the run kept them (`optim.master_weights`: the bf16 policy copy has lost every
    update below half a bf16 ulp), else the policy's own. A torchrun checkpoint's shards are read
    whole (its fp32 shards are the masters). Tensors come one at a time, at the dtype they were saved in.
    """
    path = Path(checkpoint)
    if is_sharded(path):
        return "the sharded (torchrun) parameters", _dcp_weights(path)
    masters = path / "master.safetensors"
    file = masters if masters.is_file() else path / "policy.safetensors"
    origin = "the fp32 master weights" if file is masters else "the policy weights"
    return f"{origin} ({file.name})", _safetensors_weights(file)


def _safetensors_weights(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            yield name, fh.get_tensor(name)


def _dcp_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    prefix = "model."
    params = {k[len(prefix):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
              for k, m in meta.items() if k.startswith(prefix) and hasattr(m, "size")}
    loaded = {"model": params}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
        dcp.load(loaded, storage_reader=reader, no_dist=True)
    yield from loaded["model"].items()


def write_trained_weights(model, checkpoint: str | Path, *, key: str = "--model") -> str:
    """Copy `trained_weights(checkpoint)` into `model` (cast to each parameter's dtype); returns their origin.
    Raises PolicySourceError when the names do not match the model's parameters."""
    origin, weights = trained_weights(checkpoint)
    _copy_weights(model, weights, f"{key}: checkpoint {checkpoint}")
    return origin


def write_adapter_weights(model, folder: str | Path, *, key: str = "--model") -> str:
    """Copy the adapters of a peft adapter folder (`lora.adapter_file_weights`) into `model`, which carries
    adapters of the same settings; returns their origin. Raises PolicySourceError on a name or shape mismatch."""
    file = Path(folder) / lora.ADAPTER_FILE
    if not file.is_file():
        raise PolicySourceError(f"{key}: adapter folder {folder} has no {lora.ADAPTER_FILE}")
    _copy_weights(model, lora.adapter_file_weights(file), f"{key}: adapter folder {folder}")
    return f"the adapter file ({lora.ADAPTER_FILE})"


@torch.no_grad()
def _copy_weights(model, weights, where: str) -> None:
    named = dict(model.named_parameters())
    seen = set()
    for name, tensor in weights:
        if name not in named:
            raise PolicySourceError(f"{where} holds {name!r}, which the model does not have "
                                    "(another model or engine version?)")
        if tuple(tensor.shape) != tuple(named[name].shape):
            raise PolicySourceError(f"{where}: {name!r} has shape {tuple(tensor.shape)}, "
                                    f"the model's is {tuple(named[name].shape)}")
        named[name].copy_(tensor)
        seen.add(name)
    if not seen:
        raise PolicySourceError(f"{where} holds no trained weights")
