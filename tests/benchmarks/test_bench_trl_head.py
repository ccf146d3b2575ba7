"""benchmarks/bench_trl_head.py compares two implementations of the SAME step: our fused head + loss and
TRL 1.16's fused head + its torch loss. Here both sides give the float64 reference's loss and gradients on
a small shape (fp32, and bf16 within the tolerance the benchmark's `same_result` uses), the TRL side's loss
is TRL's own `GRPOTrainer._compute_loss`, the comparison notices a different loss, and the rows carry the
fields the results tables are read by.
"""

import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_trl_head as bench  # noqa: E402

from pairuni_kernels import reference as ref  # noqa: E402

pytest.importorskip("trl.kernels.chunked_logprob")

N, T, H, V = 3, 16, 32, 512  # 3 ragged rows of 8 to 16 tokens


def _inputs(gen, dtype):
    """make_inputs draws with its own seeded generator: a seed from the test's `gen` keeps them fresh."""
    return bench.make_inputs(N, T, H, V, "cpu", dtype=dtype, seed=int(torch.randint(0, 2**31, (), generator=gen)))


def _reference(inp, loss_type):
    """The float64 spec: the head's log-probs materialised, then our clipped loss with the mapped aggregation."""
    h64 = inp["hidden"].detach().double().requires_grad_()
    w64 = inp["weight"].detach().double().requires_grad_()
    out = ref.fused_linear_policy_loss(h64, w64, inp["targets"], inp["old_logp"].double(),
                                       inp["advantages"].double(), inp["mask"], epsilon_low=bench.EPSILON_LOW,
                                       epsilon_high=bench.EPSILON_HIGH, loss_agg_mode=bench.LOSS_TYPES[loss_type])
    gh, gw = torch.autograd.grad(out.loss, [h64, w64])
    return out.loss.detach(), gh, gw


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_both_sides_match_the_float64_reference_in_fp32(gen, loss_type):
    inp = _inputs(gen, torch.float32)
    assert not inp["mask"].all() and inp["mask"].any(1).all()  # ragged rows: padding is skipped, no empty row
    want = _reference(inp, loss_type)
    for impl in bench.IMPLS:
        got = bench.step(impl, inp, loss_type)
        for name, g, w in zip(("loss", "grad hidden", "grad weight"), got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{impl} {name}: {m}")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_bf16_rows_agree_within_the_benchmarks_tolerance(gen, loss_type):
    """What the benchmark runs (bf16 head, fp32 softmax): `add_ratios` calls the pair the same step, and both
    are within bf16's tolerance of the float64 reference."""
    inp = _inputs(gen, torch.bfloat16)
    want_loss, want_gh, want_gw = _reference(inp, loss_type)
    rows = []
    for impl in bench.IMPLS:
        loss, gh, gw = bench.step(impl, inp, loss_type)
        assert abs(float(loss) - float(want_loss)) <= bench.LOSS_ATOL, impl
        torch.testing.assert_close(gw.double(), want_gw, rtol=2e-2, atol=2e-3 * float(want_gw.abs().max()))
        torch.testing.assert_close(gh.double(), want_gh, rtol=2e-2, atol=2e-3 * float(want_gh.abs().max()))
        rows.append({"impl": impl, "peak_extra_mb": 1.0, "peak_extra_no_grads_mb": 1.0, "time_ms": 1.0,
                     "loss": float(loss), "grad_hidden_norm": float(gh.float().norm()),
                     "grad_weight_norm": float(gw.float().norm())})
    assert bench.add_ratios(rows)[0]["same_result"] is True


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_trl_side_is_trls_own_compute_loss(gen, loss_type):
    """`trl_policy_loss` against GRPOTrainer._compute_loss of the installed TRL, run on the same log-probs
    (its trainer state stubbed: one process, no accumulation, beta 0, token-level ratios)."""
    from trl import GRPOTrainer

    inp = _inputs(gen, torch.float32)
    logp, entropy = bench.trl_logprobs(inp["hidden"], inp["weight"], inp["targets"], inp["mask"])
    mine = bench.trl_policy_loss(logp, inp["old_logp"], inp["advantages"], inp["mask"], loss_type)

    one = lambda x, **_: x  # noqa: E731  (gather / reduce over one process)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy, None), top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.0, loss_type=loss_type,
        epsilon_low=bench.EPSILON_LOW, epsilon_high=bench.EPSILON_HIGH, use_vllm=False,
        args=SimpleNamespace(delta=None, steps_per_generation=1, use_bias_correction_kl=False),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(num_processes=1, gather=one, reduce=one, gather_for_metrics=one))
    completion_mask = inp["mask"].int()
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1, dtype=torch.long),
              "completion_ids": inp["targets"], "completion_mask": completion_mask, "advantages": inp["advantages"],
              "old_per_token_logps": inp["old_logp"], "num_items_in_batch": completion_mask.sum()}
    theirs = GRPOTrainer._compute_loss(trainer, None, inputs)
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
    g_mine = torch.autograd.grad(mine, [inp["hidden"], inp["weight"]], retain_graph=True)
    g_theirs = torch.autograd.grad(theirs, [inp["hidden"], inp["weight"]])
    for a, b in zip(g_mine, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_the_comparison_notices_a_different_loss(gen):
    """On ragged rows dapo (token mean) and grpo (mean of row means) differ: a pair of rows computed with
    different loss types is not `same_result`, and neither is one whose gradients differ."""
    inp = _inputs(gen, torch.float32)
    rows = {}
    for impl, loss_type in (("pairuni", "dapo"), ("trl", "grpo")):
        loss, gh, gw = bench.step(impl, inp, loss_type)
        rows[impl] = {"impl": impl, "peak_extra_mb": 2.0, "peak_extra_no_grads_mb": 1.0, "time_ms": 3.0,
                      "loss": float(loss), "grad_hidden_norm": float(gh.norm()), "grad_weight_norm": float(gw.norm())}
    assert abs(rows["pairuni"]["loss"] - rows["trl"]["loss"]) > bench.LOSS_ATOL
    ours = bench.add_ratios(list(rows.values()))[0]
    assert ours["same_result"] is False and ours["loss_diff"] > bench.LOSS_ATOL
    same = dict(rows["pairuni"], impl="trl", grad_weight_norm=rows["pairuni"]["grad_weight_norm"] * 1.05)
    assert bench.add_ratios([dict(rows["pairuni"]), same])[0]["same_result"] is False


def test_rows_carry_memory_time_and_their_ratios():
    """One quick case of each implementation measured in this process (CPU: peak RSS), then the ratios."""
    name, n, t, h, v, loss_type = bench.QUICK_SHAPES[0]
    rows = [dict(case=name, **bench.run_case(impl, n, t, h, v, loss_type, "cpu")) for impl in bench.IMPLS]
    for r in rows:
        assert r["time_ms"] > 0 and r["tokens"] == int(bench.make_inputs(n, t, h, v, "cpu")["mask"].sum())
        assert {"peak_extra_mb", "peak_extra_no_grads_mb", "loss", "grad_hidden_norm", "grad_weight_norm"} <= set(r)
        assert r["peak_extra_no_grads_mb"] < r["peak_extra_mb"]
    assert rows[1]["trl_source"].startswith("trl 1.16")
    ours = bench.add_ratios(rows)[0]
    assert ours["same_result"] is True, ours
    assert ours["time_vs_trl"] == ours["time_ms"] / rows[1]["time_ms"]
    assert ours["mem_vs_trl"] == ours["peak_extra_mb"] / rows[1]["peak_extra_mb"]


def test_suite_shapes_are_the_policy_heads_of_the_issue():
    vocab = {v for *_, v, _ in bench.CPU_SHAPES} | {v for *_, v, _ in bench.CUDA_SHAPES}
    assert vocab == {151936, 102400, 16384}
    for shapes in (bench.CPU_SHAPES, bench.CUDA_SHAPES):
        assert {(h, v) for _, _, _, h, v, _ in shapes} == {(896, 151936), (1536, 151936), (3584, 151936),
                                                           (2048, 102400), (4096, 102400), (2048, 16384),
                                                           (4096, 16384)}
        assert {lt for *_, lt in shapes} == set(bench.LOSS_TYPES)
    assert all(2048 <= n * t <= 8192 for _, n, t, *_ in bench.CUDA_SHAPES)  # a few thousand tokens on GPU
    with pytest.raises(ValueError, match="impl"):
        bench.step("liger", bench.make_inputs(1, 4, 8, 16, "cpu"), "dapo")
