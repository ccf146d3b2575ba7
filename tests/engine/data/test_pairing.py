"""Pair construction: chunked top-n search, greedy matching and medoids against brute force; build-pairs end to end."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from engine.data import default_data_root
from engine.data.io import iter_samples, read_pairs, write_samples
from engine.data.pairing import (
    HISTOGRAM_EDGES,
    build_pairs,
    cluster_medoids,
    default_n_clusters,
    greedy_match,
    match_pairs,
    normalize_rows,
    side_paths,
    topk_cosine,
)
from engine.data.schema import Sample
from engine.data.validate import validate_pairs


def unit(rng, n, d=24):
    return normalize_rows(rng.standard_normal((n, d)), "x")


def brute_greedy(sim: np.ndarray, delta: float, exclude_q=(), exclude_k=()):
    """Reference: greedy over the full [N_q, N_k] matrix, ties by (query, key)."""
    cand = [(-sim[q, k], q, k) for q in range(sim.shape[0]) for k in range(sim.shape[1])
            if sim[q, k] >= delta and q not in exclude_q and k not in exclude_k]
    used_q, used_k, out = set(), set(), []
    for s, q, k in sorted(cand):
        if q not in used_q and k not in used_k:
            used_q.add(q)
            used_k.add(k)
            out.append((q, k))
    return sorted(out)


@pytest.mark.parametrize("n_q, n_k, k, chunk", [(37, 53, 5, 8), (10, 4, 8, 3), (64, 64, 1, 64), (5, 100, 100, 2)])
def test_topk_cosine_matches_brute_force(n_q, n_k, k, chunk):
    rng = np.random.default_rng(n_q * 1000 + n_k)
    q, keys = unit(rng, n_q), unit(rng, n_k)
    exclude = rng.random(n_k) < 0.2
    sims, idx = topk_cosine(q, keys, k, chunk_size=chunk, exclude_keys=exclude, progress=False)
    full = q @ keys.T
    full[:, exclude] = -np.inf
    ref_idx = np.argsort(-full, axis=1, kind="stable")[:, :min(k, n_k)]
    ref = np.take_along_axis(full, ref_idx, axis=1)
    assert sims.shape == (n_q, min(k, n_k))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(sims[finite], ref[finite], rtol=0, atol=1e-5)
    assert (idx[~finite] == -1).all() and not np.isin(idx[finite], np.nonzero(exclude)[0]).any()
    # indices may differ only between (near-)tied keys: their similarities must agree
    np.testing.assert_allclose(np.take_along_axis(q @ keys.T, np.where(idx < 0, 0, idx), 1)[finite], ref[finite], atol=1e-5)


def test_topk_cosine_rejects_bad_shapes():
    with pytest.raises(ValueError, match="queries/keys"):
        topk_cosine(np.zeros((3, 4), np.float32), np.zeros((3, 5), np.float32), 2)
    with pytest.raises(ValueError, match="exclude_keys"):
        topk_cosine(np.ones((3, 4), np.float32), np.ones((3, 4), np.float32), 2, exclude_keys=np.zeros(2, bool))
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        normalize_rows(np.array([[1.0, 0], [0, 0]]), "understand embeddings")
    with pytest.raises(ValueError, match="NaN"):
        normalize_rows(np.array([[np.nan, 1.0]]), "x")


@pytest.mark.parametrize("seed", range(4))
def test_greedy_match_with_full_candidates_equals_reference(seed):
    rng = np.random.default_rng(seed)
    q, keys = unit(rng, 30, 6), unit(rng, 25, 6)  # low dimension: many similarities above delta
    sims, idx = topk_cosine(q, keys, 25, chunk_size=7, progress=False)
    matches = greedy_match(sims, idx, 0.3)
    assert sorted((a, b) for a, b, _ in matches) == brute_greedy(q @ keys.T, 0.3)
    assert len({a for a, _, _ in matches}) == len(matches) == len({b for _, b, _ in matches})  # one to one
    assert all(s >= 0.3 for _, _, s in matches)
    assert [s for _, _, s in matches] == sorted((s for _, _, s in matches), reverse=True)


def test_greedy_match_prefers_the_strongest_pair():
    sims = np.array([[0.9, 0.8], [0.95, 0.5]], np.float32)
    idx = np.array([[0, 1], [0, 1]])
    # query 1 takes key 0 (0.95); query 0 falls back to key 1 (0.8); query 1's 0.5 is below delta
    assert greedy_match(sims, idx, 0.6) == [(1, 0, pytest.approx(0.95)), (0, 1, pytest.approx(0.8))]
    assert greedy_match(sims, idx, 0.85) == [(1, 0, pytest.approx(0.95))]
    assert greedy_match(sims, idx, 0.6, exclude_queries=np.array([False, True])) == [(0, 0, pytest.approx(0.9))]


def test_cluster_medoids_finds_the_sample_nearest_each_blob_centre():
    rng = np.random.default_rng(0)
    centres = np.eye(8, 16) * 10
    points = np.concatenate([c + rng.standard_normal((40, 16)) for c in centres]).astype(np.float32)
    eligible = rng.random(len(points)) < 0.7
    medoids = cluster_medoids(points, 8, eligible=eligible, seed=1)
    assert len(medoids) == 8 and eligible[medoids].all()
    assert sorted(int(m) // 40 for m in medoids) == list(range(8))  # one per blob
    for m in medoids:
        blob = np.arange(m // 40 * 40, m // 40 * 40 + 40)
        blob = blob[eligible[blob]]
        centre = points[m // 40 * 40:(m // 40 + 1) * 40].mean(0)
        nearest = blob[np.argsort(((points[blob] - centre) ** 2).sum(1))[:3]]
        assert m in nearest  # k-means centroid ~ blob mean; the medoid is among the closest eligible members
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_medoids(points, 0)


def test_match_pairs_uses_each_sample_once_and_respects_delta():
    rng = np.random.default_rng(7)
    u, g = unit(rng, 120, 8), unit(rng, 90, 8)
    complete_u, complete_g = rng.random(120) < 0.5, rng.random(90) < 0.5
    result = match_pairs(u, g, understand_complete=complete_u, generate_complete=complete_g, delta=0.5,
                         top_n=4, n_clusters=10, chunk_size=16, progress=False)
    aligned_u = {i for s, i in result.aligned if s == "understand"}
    aligned_g = {i for s, i in result.aligned if s == "generate"}
    assert 1 <= len(result.aligned) <= 10
    assert all(complete_u[i] for i in aligned_u) and all(complete_g[i] for i in aligned_g)
    used_g = [gi for gi, _, _ in result.retrieved]
    used_u = [ui for _, ui, _ in result.retrieved]
    assert len(set(used_g)) == len(used_g) and len(set(used_u)) == len(used_u)
    assert not set(used_g) & aligned_g and not set(used_u) & aligned_u
    for gi, ui, s in result.retrieved:
        assert s >= 0.5 and s == pytest.approx(float(g[gi] @ u[ui]), abs=1e-5)
    st = result.stats
    assert st["n_aligned"] + st["clusters_without_complete_sample"] == 10
    assert st["generate_with_candidate_above_delta"] - st["generate_unmatched_despite_candidate"] == st["n_retrieved"]
    none = match_pairs(u, g, n_clusters=0, delta=0.99, progress=False)
    assert none.aligned == [] and none.retrieved == []


def test_default_n_clusters():
    assert default_n_clusters(0) == 0 and default_n_clusters(3) == 1 and default_n_clusters(1000) == 50
    assert default_n_clusters(10**7) == 5000


def _split_toy(tmp_path, limit=None):
    """The bundled toy world's source sets (first `limit` samples), copied with images left in place (absolute paths)."""
    root = default_data_root()
    sets = {}
    for name in ("understand", "generate"):
        samples = list(iter_samples(root / f"{name}.jsonl"))[:limit]
        for s in samples:
            s.image_path = str(root / s.image_path)
        sets[name] = tmp_path / "src" / f"{name}.jsonl"
        write_samples(sets[name], samples)
    return sets


def test_build_pairs_with_precomputed_embeddings(tmp_path):
    sets = _split_toy(tmp_path)
    n_u = len(sets["understand"].read_text().splitlines())
    n_g = len(sets["generate"].read_text().splitlines())
    rng = np.random.default_rng(0)
    u = rng.standard_normal((n_u, 16)).astype(np.float32)
    g = (u[:n_g] + 0.3 * rng.standard_normal((n_g, 16))).astype(np.float32)
    np.save(tmp_path / "u.npy", u)
    np.save(tmp_path / "g.npy", g)
    out = tmp_path / "out" / "pairs.jsonl"
    stats = build_pairs(sets["understand"], sets["generate"], out, understand_embeddings=tmp_path / "u.npy",
                        generate_embeddings=tmp_path / "g.npy", n_clusters=7, delta=0.6, progress=False)
    pairs = read_pairs(out)
    assert stats["n_pairs"] == len(pairs) == stats["n_aligned"] + stats["n_retrieved"]
    assert stats["n_aligned"] == 7 and stats["n_retrieved"] > 0.8 * (n_g - 7)  # g rows are noisy copies of u rows
    assert [p.kind for p in pairs] == ["aligned"] * 7 + ["retrieved"] * stats["n_retrieved"]
    assert validate_pairs(out).ok  # image paths were rewritten so they resolve from the output folder
    stats_path, plot_path = side_paths(out)
    on_disk = json.loads(stats_path.read_text())
    assert on_disk["n_retrieved"] == stats["n_retrieved"] and on_disk["modality"] == "precomputed"
    assert sum(on_disk["histogram"]["retrieved"]) == stats["n_retrieved"]
    assert len(on_disk["histogram"]["edges"]) == len(HISTOGRAM_EDGES)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="expected \\[3, D\\]"):
        from engine.data.pairing import load_embeddings

        load_embeddings(tmp_path / "u.npy", 3, "understand_embeddings")


def test_build_pairs_refuses_incomplete_sources(tmp_path):
    u = tmp_path / "u.jsonl"
    g = tmp_path / "g.jsonl"
    write_samples(u, [Sample("a.png", question="q", answer="A"), Sample("b.png", prompt="only a caption")])
    write_samples(g, [Sample("c.png", prompt="p")])
    with pytest.raises(ValueError, match=r"1 sample\(s\) without a question and an answer \(lines 2\)"):
        build_pairs(u, g, tmp_path / "p.jsonl", understand_embeddings="x", generate_embeddings="y")
    with pytest.raises(ValueError, match="give both or neither"):
        build_pairs(u, g, tmp_path / "p.jsonl", understand_embeddings="x")
    assert not (tmp_path / "p.jsonl").exists()


def test_cli_build_pairs_with_the_default_text_model(tmp_path, capsys):
    """End to end on the bundled toy world's captions, with the offline all-MiniLM-L6-v2."""
    from engine.data.cli import register

    sets = _split_toy(tmp_path, limit=120)
    parser = argparse.ArgumentParser(prog="pairuni")
    register(parser.add_subparsers())
    out = tmp_path / "pairs.jsonl"
    args = parser.parse_args(["build-pairs", "--understand", str(sets["understand"]), "--generate", str(sets["generate"]),
                              "--out", str(out), "--n-clusters", "10", "--quiet"])
    assert args.func(args) == 0
    assert "pairs =" in capsys.readouterr().out
    stats = json.loads((tmp_path / "pairs.stats.json").read_text())
    assert stats["embedding_dim"] == 384 and stats["n_aligned"] == 10 and stats["model"].startswith("all-MiniLM")
    pairs = read_pairs(out)
    assert validate_pairs(out).ok
    retrieved = [p for p in pairs if not p.aligned]
    assert len(retrieved) == stats["n_retrieved"] > 40
    # the toy captions name colour and shape: text similarity >= 0.6 should mostly agree on one of them
    agree = [p.understand.meta["attributes"]["color"] == p.generate.meta["attributes"]["color"]
             or p.understand.meta["attributes"]["shape"] == p.generate.meta["attributes"]["shape"] for p in retrieved]
    assert np.mean(agree) > 0.9
    assert (tmp_path / "pairs.similarity.png").stat().st_size > 1000


class MeanColourEmbedder:
    """Stands in for an image model (e.g. CLIP): the embedding of an image is its mean RGB
    over non-white pixels, so images of one colour point the same way."""

    def encode(self, images, **kwargs):
        assert all(hasattr(im, "size") for im in images)  # PIL images, not paths or captions
        assert kwargs["normalize_embeddings"] is True
        out = []
        for im in images:
            a = np.asarray(im, dtype=np.float32).reshape(-1, 3)
            fg = a[(a.max(1) - a.min(1)) > 60]
            v = fg.mean(0) - 128.0
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


def test_build_pairs_image_modality_feeds_images_to_the_embedder(tmp_path):
    sets = _split_toy(tmp_path, limit=80)
    out = tmp_path / "img" / "pairs.jsonl"
    stats = build_pairs(sets["understand"], sets["generate"], out, modality="image", embedder=MeanColourEmbedder(),
                        n_clusters=0, delta=0.98, batch_size=16, progress=False)
    assert stats["modality"] == "image" and stats["n_aligned"] == 0 and stats["n_retrieved"] > 20
    for pair in read_pairs(out):  # identical mean colour <=> same palette colour
        assert pair.understand.meta["attributes"]["color"] == pair.generate.meta["attributes"]["color"]
    with pytest.raises(ValueError, match="modality"):
        build_pairs(sets["understand"], sets["generate"], out, modality="audio")


def test_nearest_centres_and_kmeans_plusplus_init():
    from engine.data.pairing import kmeans_plusplus_init, nearest_centres

    rng = np.random.default_rng(4)
    x = rng.standard_normal((301, 12)).astype(np.float32)
    centres = rng.standard_normal((17, 12)).astype(np.float32)
    labels, dist = nearest_centres(x, centres, chunk_size=50)
    full = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    assert (labels == full.argmin(1)).all()
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-4, atol=1e-4)

    blobs = np.concatenate([c + 0.01 * rng.standard_normal((30, 12)) for c in 10 * np.eye(6, 12)]).astype(np.float32)
    init = kmeans_plusplus_init(blobs, 6, seed=3)
    rows = [int(np.nonzero((blobs == c).all(1))[0][0]) for c in init]  # seeds are rows of the input
    assert sorted(r // 30 for r in rows) == list(range(6))  # D^2 sampling puts one seed in each far-apart blob
    np.testing.assert_array_equal(init, kmeans_plusplus_init(blobs, 6, seed=3))  # deterministic per seed
    same = np.ones((5, 3), np.float32)
    assert len({tuple(r) for r in kmeans_plusplus_init(same, 5)}) == 1  # coincident rows: still k seeds, no error
    assert kmeans_plusplus_init(same, 5).shape == (5, 3)
