"""Rewards: answer extraction and accuracy, the toy-world pixel reward, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data import toyworld
from engine.data.schema import Sample
from engine.rewards import (
    RewardInput,
    answer_accuracy,
    build_reward,
    extract_choice,
    read_attributes,
)


@pytest.mark.parametrize("prediction, reference, expected", [
    ("B", "B", 1.0),
    ("B. red", "B", 1.0),
    ("(C)", "C", 1.0),
    ("The answer is D.", "D", 1.0),
    ("<think>maybe A</think><answer>C</answer>", "C", 1.0),
    ("<think>maybe C</think><answer>A</answer>", "C", 0.0),
    ("red A circle", "A", 1.0),
    ("a red circle", "A", 0.0),   # lowercase article is not an option letter
    ("", "A", 0.0),
    ("42", "42", 1.0),
    ("there are 3.0 objects", "3", 1.0),
    ("1,200", "1200", 1.0),
    ("4", "3", 0.0),
    ("The Red Circle!", "red circle", 1.0),
    ("blue circle", "red circle", 0.0),
])
def test_answer_accuracy(prediction, reference, expected):
    assert answer_accuracy(prediction, reference) == expected


def test_extract_choice_prefers_a_leading_letter():
    assert extract_choice("C. because A is wrong") == "C"
    assert extract_choice("no letter here") is None


def _render(color, shape, cells=(4,), size=64):
    img = toyworld.render(toyworld.Scene(color=color, shape=shape, cells=cells), size)
    arr = torch.tensor(np.asarray(img), dtype=torch.float32) / 255.0
    return arr.permute(2, 0, 1)


@pytest.mark.parametrize("shape", toyworld.SHAPES)
def test_read_attributes_recovers_rendered_scenes(shape):
    colors = list(toyworld.COLORS)
    images = torch.stack([_render(c, shape) for c in colors])
    p_color, p_shape = read_attributes(images)
    assert p_color.argmax(-1).tolist() == list(range(len(colors)))
    assert (p_shape.argmax(-1) == toyworld.SHAPES.index(shape)).all(), p_shape


def test_toyworld_reward_prefers_the_prompted_attributes():
    reward = build_reward("toyworld")
    img = _render("red", "circle")[None].repeat(3, 1, 1, 1)
    samples = [Sample("x.png", meta={"attributes": {"color": c, "shape": s}})
               for c, s in (("red", "circle"), ("blue", "circle"), ("blue", "square"))]
    r = reward(RewardInput(samples=samples, images=img))
    assert r[0] > 0.9 and r[0] > r[1] > r[2]
    blank = torch.ones(1, 3, 32, 32)  # no foreground: no colour credit
    assert float(reward(RewardInput(samples=samples[:1], images=blank))[0]) == pytest.approx(0.5 / len(toyworld.SHAPES))


def test_toyworld_reward_needs_attributes():
    with pytest.raises(ValueError, match="attributes"):
        build_reward("toyworld")(RewardInput(samples=[Sample("x.png")], images=torch.ones(1, 3, 8, 8)))


def test_registry_and_pair_qa():
    with pytest.raises(ValueError, match="unknown"):
        build_reward("nope")
    with pytest.raises(ValueError, match="answer_fn"):
        build_reward("pair_qa")
    qa = build_reward("pair_qa", answer_fn=lambda images, questions: ["A", "B"])
    samples = [Sample("x.png", prompt="p", question="q?", answer="A") for _ in range(2)]
    assert qa(RewardInput(samples=samples, images=torch.zeros(2, 3, 8, 8))).tolist() == [1.0, 0.0]
    acc = build_reward("accuracy")
    assert acc(RewardInput(samples=samples, texts=["A", "C"])).tolist() == [1.0, 0.0]
