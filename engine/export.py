"""`pairuni export RUN_DIR|CHECKPOINT --out DIR [--dtype bfloat16] [--overwrite] [--adapter-only]`: the trained
model as a Hugging Face folder.

    export_policy("runs/janus1b", "exported/janus1b", dtype="bfloat16")

What the folder holds:
- config.json (`tie_word_embeddings: false`, top level and text config: Janus's text head is its own weight),
  generation_config.json and every weight (model.safetensors, sharded when large), written
  by `save_pretrained` from the loaded policy: frozen weights from the base model, trained ones from the
  checkpoint (`policy_io.trained_weights`: the fp32 masters when the run kept them), all cast to `dtype`;
- every other file of the run's `model.path` (tokenizer, processor, chat template, README), copied as is,
  so `JanusProcessor.from_pretrained` loads it;
- for a run on the tiny random Janus: its toy tokenizer (`policy_io.TOY_TOKENIZER_FILE`), which makes the
  folder a valid `model.path` and `pairuni eval --model`;
- `pairuni_export.json`: the source checkpoint, step, dtype, which weights and the run's config.

A LoRA run (`model.lora.rank > 0`; its checkpoints hold the adapters only) is exported merged: the policy
is rebuilt as the run trained it (`policy_io.load_policy`: base at the run's `model.dtype`, NF4 again when
the run's base was, fp32 adapters), then every adapted layer becomes a plain linear layer with
`W + s B A` added in fp32 and cast once to `dtype` (`lora.merged_model`; an NF4 base is dequantized
by bitsandbytes first, so the folder computes what the 4-bit model computed). The folder is an ordinary
`JanusForConditionalGeneration`: no peft needed to load it. With `adapter_only`, the folder holds the
adapters alone as peft writes them (adapter_model.safetensors in fp32, adapter_config.json naming the base
folder; `peft.PeftModel.from_pretrained(base, DIR)` loads it), the toy tokenizer of a tiny-model run and
`pairuni_export.json`, whose `base` says which base model the adapters go on.

It loads with `JanusForConditionalGeneration.from_pretrained(DIR)` and `pairuni train model.path=DIR`
continues from it. The folder is built beside `--out` and renamed into place when complete: `--out` is
never half-written (a killed export leaves a hidden `.NAME.*` folder beside it, not inside). An existing
`--out` is replaced only with `--overwrite`, and only when it is an earlier export: every export holds the
marker file `.pairuni-export` (`EXPORT_MARKER`); a folder without it (a thesis, a home folder) is refused in
one line, nothing deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path

from . import lora
from .cli import user_error
from .files import check_replaceable, current_umask, staged_folder, write_json
from .model import DTYPES
from .policy_io import (
    EXPORT_INFO_FILE,
    TOY_TOKENIZER_FILE,
    PolicySourceError,
    load_policy,
    resolve_source,
    run_lora,
    saved_config,
)

log = logging.getLogger("pairuni.export")

#: Files of the base model folder that the export writes itself (weights, configs), so they are not copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_WRITTEN = ("config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
            TOY_TOKENIZER_FILE, EXPORT_INFO_FILE)


#: The file every export folder holds: `--overwrite` replaces only a folder that has it.
EXPORT_MARKER = ".pairuni-export"


class ExportError(ValueError):
    """The export cannot be written; the message is one line naming the argument."""


def carried_files(base: Path | None) -> list[Path]:
    """The files of the base model folder the export copies: everything at its top level but hidden files,
    weights and the configs `save_pretrained` writes (tokenizer, processor, chat template, README, ...)."""
    if base is None:
        return []
    return sorted(p for p in base.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _WRITTEN)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _seal_tree(folder: Path) -> None:
    """Give every file under `folder` the mode the umask asks for (safetensors writes 0600 whatever it says)
    and flush it to disk, before the folder is renamed into place."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def export_policy(source: str | Path, out: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False,
                  device: str = "cpu", adapter_only: bool = False) -> Path:
    """Write the policy of `source` (a run, a checkpoint or a model folder) as a Hugging Face folder `out`
    (a LoRA run's adapters merged; with `adapter_only`, a LoRA run's adapters alone: see the module docstring).

    Raises ExportError / PolicySourceError (ValueErrors, one line) before any model loads when `out` exists
    without `overwrite` or (with it) is not an earlier export, would hold the source, `dtype` is unknown, or
    `adapter_only` is asked of a run that trained no adapters; returns `out`.
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"--out: {out} exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} exists and is not a folder")
    src = resolve_source(source, key="export")
    if _inside(src.path, out):
        raise ExportError(f"--out: {out} holds the source {src.path}; export to another folder")
    try:
        check_replaceable(out, EXPORT_MARKER, overwrite=True)
    except ValueError as exc:  # not an earlier export: --overwrite deletes nothing it did not write
        raise ExportError(f"--out: {exc}") from None
    adapters = run_lora(saved_config(src)) if src.kind in ("checkpoint", "adapter") else None
    if adapter_only and adapters is None:
        raise ExportError(f"--adapter-only: {src.path} is not a LoRA run's checkpoint (its model.lora.rank is 0); "
                          "export it without --adapter-only")
    # a LoRA run's base is loaded at the run's dtype: the merge adds in fp32 and rounds once, to `dtype`
    policy = load_policy(src, dtype=None if adapters is not None else dtype, device=device, key="export")
    if policy.base_path is not None and _inside(policy.base_path, out):
        raise ExportError(f"--out: {out} holds the base model folder {policy.base_path}; export to another folder")
    base = str(policy.base_path) if policy.base_path is not None else None
    info = {"source": str(src.path), "step": policy.step, "dtype": dtype, "weights": policy.weights, "base_model": base,
            "config": policy.config}
    if adapters is not None:
        info["lora"] = {**dataclasses.asdict(adapters), "merged": not adapter_only}
    with staged_folder(out, overwrite=True, marker=EXPORT_MARKER) as stage:
        if adapter_only:
            lora.write_adapter(policy.model, stage, base_model=base)
            info["dtype"] = "float32"  # adapters are trained and saved in fp32
            info["base"] = base or ("the tiny random Janus of the config's model.tiny_seed, model.tiny_palette and "
                                    f"model.dtype, for the vocabulary of {TOY_TOKENIZER_FILE}")
        else:
            _write_model(policy, stage, dtype if adapters is not None else None)
        if policy.tokenizer_json is not None:
            (stage / TOY_TOKENIZER_FILE).write_text(policy.tokenizer_json)
        write_json(stage / EXPORT_INFO_FILE, info)
        _seal_tree(stage)
    log.info("exported %s (step %s, %s%s) to %s", src.path, policy.step, policy.weights,
             ", adapters only" if adapter_only else ", merged" if adapters is not None else "", out)
    return out


def _write_model(policy, stage: Path, merge_dtype: str | None) -> None:
    """The Hugging Face folder of `policy` into `stage`: the base folder's other files, config and weights.
    merge_dtype: a LoRA policy's adapters are merged into the weights (in place) and all cast to it."""
    model = policy.model
    if merge_dtype is not None:
        model = lora.merged_model(model, DTYPES[merge_dtype], inplace=True).to(DTYPES[merge_dtype])
    # Saved with `_from_model_config` set, transformers drops `generation_kwargs` (begin-of-image id) on load.
    model.generation_config._from_model_config = False
    # Janus's text head (lm_head) is its own weight, trained apart from the input embeddings: a loader that
    # honoured a `true` here (the default of a config that omits the key) would drop the trained head
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.tie_word_embeddings = False
    for path in carried_files(policy.base_path):
        shutil.copyfile(path, stage / path.name)
    model.save_pretrained(stage)


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's trained model as a Hugging Face folder",
        description="Write the policy of a run (its newest verified checkpoint), of one checkpoint or of a model "
                    "folder as a Hugging Face folder: config, generation config, tokenizer and processor files of "
                    "the run's model.path, every weight (trained ones from the fp32 master weights when the run "
                    "kept them; a LoRA run's adapters merged in, or alone with --adapter-only). It loads with "
                    "JanusForConditionalGeneration.from_pretrained and as model.path of "
                    "`pairuni train` / `pairuni eval --model`. Written beside --out and renamed into place.",
    )
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT",
                   help="a run folder (its newest verified checkpoint), a checkpoint folder (RUN/checkpoints/step_N) "
                        "or a model folder")
    p.add_argument("--out", required=True, help="folder to write (refused when it exists, unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES),
                   help="dtype of the written weights (default bfloat16, as Janus-Pro ships)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that an earlier export wrote "
                   "(it holds .pairuni-export; any other folder is refused), only once the new one is complete")
    p.add_argument("--device", default="cpu", help="where the model is assembled (default cpu)")
    p.add_argument("--adapter-only", action="store_true",
                   help="LoRA runs only: write the adapters alone as a peft adapter folder (fp32; --dtype does not "
                        "apply) with pairuni_export.json naming the base model, instead of the merged model "
                        "(the default for LoRA runs: adapters merged in fp32, then cast to --dtype)")
    p.set_defaults(func=run)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .family import family_of_source

    if family_of_source(args.source) == "dimoo":  # a Lumina-DiMOO run (engine/dimoo/commands.py)
        return _run_dimoo(args)
    try:
        out = export_policy(args.source, args.out, dtype=args.dtype, overwrite=args.overwrite, device=args.device,
                            adapter_only=args.adapter_only)
    except (ExportError, PolicySourceError) as exc:
        return user_error("export", args, exc)
    print(f"exported {args.source} -> {out}")
    return 0


def _run_dimoo(args) -> int:
    from .checkpoint_store import CheckpointError
    from .dimoo.commands import export_run

    try:
        if args.adapter_only:
            raise ExportError("--adapter-only: a DiMOO LoRA run is exported merged (W + s B A); adapter-only "
                              "folders are Janus-Pro's (peft)")
        out = export_run(args.source, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (ExportError, CheckpointError, ValueError) as exc:
        return user_error("export", args, exc)
    print(f"exported {args.source} -> {out}")
    return 0


def main(argv=None) -> int:  # `python -m engine.export`
    from .cli import run_command

    return run_command(register, "export", argv)


if __name__ == "__main__":
    sys.exit(main())
