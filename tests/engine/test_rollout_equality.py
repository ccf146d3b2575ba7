"""The rollout loops against tokens and log-probs recorded from the plain eager loop.

`golden/rollout_eager.json` was written by the eager loops as they were before the decode step
got static shapes, shared prefill and the one-pass conditional log-prob (run this file as a
script to rewrite it). Every faster variant must draw the same tokens for the same seeds and
record the same log-probs to float32 rounding.

The cases cover left padding, G > 1 rows per prompt (shared prefill), sampled and greedy CFG,
both image log-prob modes, top-k, and answers that stop early on EOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import model as janus
from engine import rollout as rollout_module
from engine.rollout import distinct_rows, rollout_generation, rollout_understanding

GOLDEN = Path(__file__).parent / "golden" / "rollout_eager.json"
GROUP = 3  # rows per distinct prompt

GENERATION_CASES = {
    "sampled_cond": {"cfg_scale": 5.0, "temperature": 1.0},
    "sampled_cfg_top_k": {"cfg_scale": 3.0, "temperature": 0.8, "top_k": 20, "image_logprob": "cfg"},
    "greedy_cfg": {"cfg_scale": 5.0, "temperature": 0.0, "image_logprob": "cfg"},
}
UNDERSTANDING_CASES = {"sampled": {"temperature": 1.0, "max_new_tokens": 40},
                       "greedy": {"temperature": 0.0, "max_new_tokens": 6}}


def tiny_model():
    model = janus.tiny_janus(96, seed=3)
    eos = janus.special_ids(model)["eos"]
    ids, mask = prompts(2, 5, seed=1, boi=False)
    with torch.no_grad():  # EOS logit ~4 on typical hidden states: answers end early, at different steps
        hidden = janus.policy_hidden(model, janus.text_embeddings(model, ids), mask, janus.positions_from_mask(mask))
        direction = hidden.reshape(-1, hidden.shape[-1]).mean(0)
        model.get_output_embeddings().weight[eos] = 4.0 * direction / direction.norm() ** 2
    return model


def prompts(n_prompts: int, length: int, *, seed: int, boi: bool):
    """n_prompts distinct left-padded prompts, each repeated GROUP times: (ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    special = janus.TINY_SPECIAL
    body = torch.randint(6, 96, (n_prompts, length), generator=g)
    tail = [torch.full((n_prompts, 1), special.boi)] if boi else []
    ids = torch.cat([torch.full((n_prompts, 1), special.bos), body] + tail, 1)
    mask = torch.ones_like(ids)
    for p in range(n_prompts):  # prompt p has p pads on the left
        ids[p, :p], mask[p, :p] = special.pad, 0
    return ids.repeat_interleave(GROUP, 0), mask.repeat_interleave(GROUP, 0)


def run_cases(model, **rollout_kw) -> dict:
    out = {}
    ids, mask = prompts(3, 6, seed=0, boi=True)
    seeds = torch.arange(100, 100 + ids.shape[0])
    for name, kw in GENERATION_CASES.items():
        ro = rollout_generation(model, ids, mask, seeds=seeds, decode=False, **kw, **rollout_kw)
        out[f"generation/{name}"] = {"tokens": ro.image_tokens.tolist(), "logp": ro.old_logp.tolist()}
    ids, mask = prompts(2, 5, seed=1, boi=False)
    seeds = torch.arange(50, 50 + ids.shape[0])
    for name, kw in UNDERSTANDING_CASES.items():
        ro = rollout_understanding(model, ids, mask, None, seeds=seeds, **kw, **rollout_kw)
        out[f"understanding/{name}"] = {"tokens": ro.response_ids.tolist(), "logp": ro.old_logp.tolist(),
                                        "mask": ro.response_mask.tolist()}
    return out


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


def assert_matches(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name]["tokens"] == want[name]["tokens"], name
        assert got[name].get("mask") == want[name].get("mask"), name
        torch.testing.assert_close(torch.tensor(got[name]["logp"]), torch.tensor(want[name]["logp"]),
                                   rtol=1e-5, atol=1e-5, msg=name)


def test_golden_cases_are_not_vacuous(golden):
    und = golden["understanding/sampled"]
    assert len(und["tokens"][0]) < UNDERSTANDING_CASES["sampled"]["max_new_tokens"]  # stopped early on EOS
    assert not all(all(row) for row in und["mask"])  # and some answers ended before others
    rows = golden["generation/sampled_cond"]["tokens"]
    assert len({tuple(r) for r in rows}) == len(rows)  # G rows of one prompt draw different images


def test_eager_rollouts_match_the_recorded_loop(golden):
    assert_matches(run_cases(tiny_model()), golden)


def test_distinct_rows_maps_every_row_to_an_identical_first_row():
    ids = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2], [3, 4]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1], [1, 1]])  # row 3: same ids, other mask
    first, inverse = distinct_rows(ids, mask)
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]
    pixels = torch.randn(5, 3, dtype=torch.bfloat16)
    assert distinct_rows(ids, mask, pixels)[0].tolist() == [0, 1, 2, 3, 4]  # images tell rows apart too


def test_rollouts_prefill_each_distinct_prompt_once(monkeypatch):
    rows = []
    real = rollout_module.shared_prefill
    monkeypatch.setattr(rollout_module, "shared_prefill",
                        lambda model, embeds, *a: rows.append(embeds.shape[0]) or real(model, embeds, *a))
    model = tiny_model()
    ids, mask = prompts(3, 6, seed=0, boi=True)  # 9 rows: 3 prompts x 3, each with its own padding
    rollout_generation(model, ids, mask, cfg_scale=5.0, temperature=1.0, seeds=torch.arange(9), decode=False)
    ids, mask = prompts(2, 5, seed=1, boi=False)
    rollout_understanding(model, ids, mask, None, temperature=1.0, max_new_tokens=2, seeds=torch.arange(6))
    assert rows == [6, 2]  # 3 cond + 3 uncond of 18 CFG rows; 2 of 6 answer rows


@pytest.mark.slow
def test_compiled_decode_step_matches_the_recorded_loop(golden):
    assert_matches(run_cases(tiny_model(), compile=True), golden)


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(run_cases(tiny_model())) + "\n")
