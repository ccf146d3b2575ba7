"""`pairuni validate | build-pairs | complete | toy-world`: the data subcommands.

Registered through `engine.cli.COMMAND_MODULES`; every parser sets `func(args) -> exit code`.
Heavy imports (torch, sentence-transformers, scikit-learn, matplotlib, httpx) happen inside
the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def register(subparsers) -> None:
    from . import pairing, toyworld

    p = subparsers.add_parser(
        "validate", help="check a PairUG pairs JSONL file and report every problem with its line number",
        description="Check a PairUG JSONL file: UTF-8 and line length, JSON syntax, required fields, similarity in "
                    "[0, 1], empty questions/prompts, answer letters, image files under the data root that decode "
                    "(truncated, not an image, over the pixel budget PAIRUNI_MAX_IMAGE_PIXELS, unsupported mode), "
                    "duplicate pairs; one line per problem with its line number. "
                    "Exit code 0 when the file is clean, 1 otherwise.")
    p.add_argument("pairs", help="PairUG JSONL file")
    p.add_argument("--data-root", default=None, help="folder that image paths are relative to (default: the file's folder)")
    p.add_argument("--no-images", action="store_true", help="skip the image-file existence checks")
    p.add_argument("--max-report", type=int, default=50, help="print at most this many problems (all are counted)")
    p.add_argument("--keep-valid", default=None, metavar="OUT", help="also write the problem-free lines to OUT")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_validate)

    p = subparsers.add_parser(
        "build-pairs", help="pair an understanding set with a generation set (aligned medoids + retrieved matches)",
        description="Embed both source sets, keep MiniBatchKMeans medoids as aligned pairs and match the rest one to "
                    "one by cosine similarity >= delta. Writes OUT (PairUG JSONL), OUT.stats.json and "
                    "OUT.similarity.png (stem without .jsonl).")
    p.add_argument("--understand", required=True, help="JSONL of understanding samples (image_path, question, answer[, prompt])")
    p.add_argument("--generate", required=True, help="JSONL of generation samples (image_path, prompt[, question, answer])")
    p.add_argument("--out", required=True, help="pairs JSONL to write")
    p.add_argument("--model", default=None, help="local sentence-transformers folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--modality", choices=("text", "image"), default="text",
                   help="embed captions (text) or images (needs an image model such as CLIP)")
    p.add_argument("--understand-embeddings", default=None, help="precomputed [N_u, D] .npy, one row per sample")
    p.add_argument("--generate-embeddings", default=None, help="precomputed [N_g, D] .npy, one row per sample")
    p.add_argument("--understand-root", default=None, help="data root of --understand image paths (default: its folder)")
    p.add_argument("--generate-root", default=None, help="data root of --generate image paths (default: its folder)")
    p.add_argument("--delta", type=float, default=pairing.DEFAULT_DELTA, help="similarity threshold of retrieved pairs")
    p.add_argument("--top-n", type=int, default=pairing.DEFAULT_TOP_N, help="candidates per generation sample")
    p.add_argument("--n-clusters", type=int, default=None,
                   help=f"aligned medoids K (default {pairing.DEFAULT_CLUSTER_FRACTION * 100:.0f}%% of all samples, "
                        f"at most {pairing.DEFAULT_MAX_CLUSTERS}; 0 = no aligned pairs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=pairing.DEFAULT_CHUNK_SIZE, help="generation rows per similarity block")
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    p.add_argument("--device", default="cpu", help="torch device for embedding and similarity (cpu, cuda)")
    p.add_argument("--stats", default=None, help="stats JSON path (default: next to --out)")
    p.add_argument("--plot", default=None, help="histogram PNG path (default: next to --out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_build_pairs)

    p = subparsers.add_parser(
        "complete", help="write missing captions / questions through an OpenAI-compatible chat endpoint",
        description="Understanding samples get a caption, generation samples a 4-option question with a letter "
                    "answer; each candidate is verified by a text-only answering call. Replies are cached in "
                    "OUT.cache.jsonl, so an interrupted run resumes for free. Settings: flags > --config > environment "
                    "(PAIRUNI_COMPLETE_BASE_URL / _MODEL / _API_KEY, or OPENAI_BASE_URL / OPENAI_MODEL / OPENAI_API_KEY).")
    p.add_argument("--input", required=True, help="JSONL of samples (image_path, prompt, question, answer, ...)")
    p.add_argument("--out", required=True, help="completed samples JSONL (rejected ones go to OUT.rejected.jsonl)")
    p.add_argument("--config", default=None, help="YAML or JSON file with CompletionConfig settings")
    p.add_argument("--base-url", default=None, help="API root, e.g. http://localhost:8000/v1")
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default=None, help="prefer the environment variable")
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--max-retries", type=int, default=None)
    p.add_argument("--max-attempts", type=int, default=None, help="generate-then-verify rounds per sample")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per HTTP request in all (connect, send, the whole reply)")
    p.add_argument("--cache", default=None, help="reply cache JSONL (default: OUT.cache.jsonl)")
    p.add_argument("--data-root", default=None, help="folder image paths are relative to (default: the input's folder)")
    p.add_argument("--allow-images-outside", action="store_true",
                   help="also send images whose real path lies outside the data root (default: refused)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_complete)

    p = subparsers.add_parser(
        "toy-world", help="write a synthetic PairUG dataset of coloured shapes with known attributes",
        description="Images of shapes with known colour, shape, count and position, exact captions, 4-option "
                    "questions with letter answers, aligned and retrieved pairs. Deterministic from --seed.")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=toyworld.DEFAULT_IMAGE_SIZE, help="image side in pixels")
    p.add_argument("--aligned-fraction", type=float, default=toyworld.DEFAULT_ALIGNED_FRACTION)
    p.add_argument("--delta", type=float, default=pairing.DEFAULT_DELTA, help="minimum retrieved-pair similarity")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output folder an earlier toy-world wrote (it holds .pairuni-toy-world); any other "
                        "non-empty folder is refused and left as it is")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_toy_world)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the temporary output files are removed on the way out."""


def _terminate_as_interrupt():
    """Make SIGTERM raise `_Terminated` in the main thread; returns the handler it replaced (None when
    not in the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame):
        raise _Terminated()

    return signal.signal(signal.SIGTERM, on_term)


def _fail(message: str) -> int:
    print(f"pairuni: error: {message}", file=sys.stderr)
    return 2


def _validate(args: argparse.Namespace) -> int:
    from .validate import validate_pairs

    try:
        report = validate_pairs(args.pairs, data_root=args.data_root, check_images=not args.no_images,
                                keep_valid=args.keep_valid)
    except (ValueError, OSError) as err:
        return _fail(str(err))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for problem in report.problems[:max(args.max_report, 0)]:
            print(problem.format(args.pairs))
        hidden = report.n_problems - min(len(report.problems), max(args.max_report, 0))
        if hidden > 0:
            print(f"... and {hidden} more problem(s)")
        print(report.summary())
    return 0 if report.ok else 1


def _build_pairs(args: argparse.Namespace) -> int:
    from .pairing import build_pairs, side_paths

    try:
        stats = build_pairs(args.understand, args.generate, args.out, model=args.model, modality=args.modality,
                            understand_embeddings=args.understand_embeddings, generate_embeddings=args.generate_embeddings,
                            understand_root=args.understand_root, generate_root=args.generate_root, delta=args.delta,
                            top_n=args.top_n, n_clusters=args.n_clusters, seed=args.seed, chunk_size=args.chunk_size,
                            batch_size=args.batch_size, device=args.device, stats_path=args.stats, plot_path=args.plot,
                            progress=not args.quiet)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    stats_path, plot_path = side_paths(args.out)
    retrieved = stats["retrieved_similarity"]
    print(f"{args.out}: {stats['n_pairs']} pairs = {stats['n_aligned']} aligned + {stats['n_retrieved']} retrieved "
          f"(similarity median {retrieved['median']}, delta {args.delta}) in {stats['seconds_total']:.1f} s")
    print(f"stats: {args.stats or stats_path}  histogram: {args.plot or plot_path}")
    return 0


def _complete(args: argparse.Namespace) -> int:
    from .completion import CompletionConfig, complete_file, rejected_path

    overrides = {"base_url": args.base_url, "model": args.model, "api_key": args.api_key,
                 "concurrency": args.concurrency, "max_retries": args.max_retries, "max_attempts": args.max_attempts,
                 "temperature": args.temperature, "timeout": args.timeout}
    try:
        config = CompletionConfig.resolve(overrides, args.config)
    except (ValueError, OSError) as err:
        return _fail(str(err))
    previous = _terminate_as_interrupt()
    try:
        report = complete_file(args.input, args.out, config, cache_path=args.cache, data_root=args.data_root,
                               progress=not args.quiet, allow_images_outside=args.allow_images_outside)
    except KeyboardInterrupt as interrupt:
        print("\ninterrupted: finished replies are in the cache; rerun the same command to resume", file=sys.stderr)
        return 143 if isinstance(interrupt, _Terminated) else 130
    except (ValueError, OSError) as err:
        return _fail(str(err))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(report.counts.items())) or "no samples"
    print(f"{args.out}: {counts}; {report.n_requests} HTTP requests, {report.n_cache_hits} cached replies reused, "
          f"{report.n_retries} retries")
    if any(report.counts.get(k) for k in ("rejected", "skipped", "error")):
        print(f"not completed: see {rejected_path(args.out)}")
    if report.counts.get("error"):
        print(f"{report.counts['error']} sample(s) failed; the first: {report.first_error}", file=sys.stderr)
        if not report.counts.get("completed") and not report.counts.get("rejected"):
            print(f"no call succeeded: is the endpoint {config.base_url} up, and are the model and key right?",
                  file=sys.stderr)
        print("rerun the same command to retry them (cached replies are not paid again)")
        return 1
    return 0


def _toy_world(args: argparse.Namespace) -> int:
    from .toyworld import generate_toy_world

    try:
        stats = generate_toy_world(args.n, args.out, seed=args.seed, size=args.size,
                                   aligned_fraction=args.aligned_fraction, delta=args.delta,
                                   overwrite=args.overwrite, progress=not args.quiet)
    except ValueError as err:
        return _fail(str(err))
    print(f"{args.out}: {stats['n_pairs']} pairs ({stats['n_aligned']} aligned, {stats['n_retrieved']} retrieved), "
          f"{stats['n_images']} images of {args.size}x{args.size}")
    return 0
