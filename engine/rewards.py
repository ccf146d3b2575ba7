"""Reward functions, one registry. Each returns a [B] float32 tensor, one reward per rollout.

    reward = build_reward("accuracy", cfg.reward)
    r = reward(RewardInput(samples=..., texts=answers))

Understanding:
  accuracy    answer accuracy against `Sample.answer`: option letter for multiple choice,
              numeric match for numbers, normalised exact match otherwise; the answer is taken
              from `<answer>...</answer>` when present.
Generation:
  toyworld    colour and shape read back from the decoded pixels, compared with the generation
              half's `meta["attributes"]` (toy world vocabulary from engine.data.toyworld). Soft
              scores, so a barely-trained model still ranks its G images: colour = the target's
              share of the foreground pixels' nearest-colour votes; shape = softmax over the
              shapes of -distance between blob features (fill ratio, widest row).
  clip        cosine similarity of CLIP image and prompt embeddings (transformers CLIP, local dir).
  hpsv2       HPSv2 score (needs open_clip, see HPSV2_INSTALL, and a local checkpoint file).
  pair_qa     the policy itself answers the generation half's question about its own image;
              reward = accuracy of that answer (needs `answer_fn`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from .config import Config, require
from .data import toyworld
from .policy import TASKS
from .preflight import require_importable

#: The data fields a reward may read on its half of a pair, as the PairUG file names that half.
HALF_NAMES = {"understanding": "understand_ann", "generation": "generate_ann"}


@dataclass(frozen=True)
class RewardNeeds:
    """What a reward reads, declared once: config validation and pair loading ask this, not the name.

    task:       the half it scores (understanding answers or generated images).
    images:     decoded images (`rollout.decode_images=true`).
    qa:         a question and an answer on its half of every pair.
    attributes: keys that must be set in its half's `attributes` (e.g. the toy world's color, shape).
    path:       (config key under `reward.`, "dir" | "file") of a local model it loads.
    policy:     it asks the policy itself (gets `answer_fn` at construction).
    module:     (import name, install command) of an optional package it needs; imported when the
                config is validated, so a missing one fails before any model loads.
    """

    task: str
    images: bool = False
    qa: bool = False
    attributes: tuple[str, ...] = ()
    path: tuple[str, str] | None = None
    policy: bool = False
    module: tuple[str, str] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")


REWARDS: dict[str, type] = {}


def register_reward(name: str):
    """Class decorator: `name` in the registry (`reward.understanding` / `reward.generation` values).
    The class carries `needs: RewardNeeds` and is built as `cls(reward_cfg, **context)`."""
    def deco(cls):
        if not isinstance(getattr(cls, "needs", None), RewardNeeds):
            raise TypeError(f"register_reward({name!r}): {cls.__name__}.needs must be a RewardNeeds")
        REWARDS[name] = cls
        return cls
    return deco


def reward_names(task: str) -> tuple[str, ...]:
    """Registered rewards of one task, sorted."""
    return tuple(sorted(n for n, cls in REWARDS.items() if cls.needs.task == task))


def reward_needs(name: str) -> RewardNeeds:
    if name not in REWARDS:
        raise ValueError(f"reward: unknown {name!r}; registered: {sorted(REWARDS)}")
    return REWARDS[name].needs


def check_config(cfg: Config, world: int | None) -> None:
    """`reward.*`: each task's reward is registered for it; a reward that reads images needs them decoded."""
    r, w = cfg.rollout, cfg.reward
    for task in TASKS:
        name = getattr(w, task)
        names = reward_names(task)
        require(name in names, f"reward.{task}", f"one of {names}", name)
        if reward_needs(name).images:
            require(r.decode_images, "rollout.decode_images", f"true (reward.{task}={name} reads decoded images)",
                    r.decode_images)


def check_environment(cfg: Config) -> None:
    """A reward that loads a local model needs its path (an existing folder or file); one that needs a package
    gets it imported now."""
    w = cfg.reward
    for task in TASKS:
        name = getattr(w, task)
        needs = reward_needs(name)
        if needs.path is not None:
            key, kind = needs.path
            value = getattr(w, key)
            exists = os.path.isdir if kind == "dir" else os.path.isfile
            what = "a local CLIP model directory" if kind == "dir" else "a local checkpoint file"
            require(value is not None and exists(value), f"reward.{key}", f"{what} (reward.{task}={name})", value)
        if needs.module is not None:
            require_importable(f"reward.{task}", name, *needs.module)


def check_sample(name: str, sample) -> str | None:
    """Why reward `name` cannot score `sample` (its half of a pair), or None when it can."""
    needs = reward_needs(name)
    key = f"reward.{needs.task}={name}"
    half = HALF_NAMES[needs.task]
    if needs.qa and not sample.has_qa:
        return f"{key} needs a question and an answer in {half}"
    attrs = sample.meta.get("attributes") or {}
    missing = [a for a in needs.attributes if not attrs.get(a)]
    if missing:
        others = [n for n in reward_names(needs.task) if not REWARDS[n].needs.attributes]
        return (f"{key} needs {half}.attributes with {' and '.join(needs.attributes)} (missing {missing}); "
                f"use {'/'.join(others)} for other data")
    return None


@dataclass
class RewardInput:
    """What a reward may read. samples: the B `engine.data.schema.Sample`s (one per rollout row)."""

    samples: list
    texts: list[str] | None = None
    images: torch.Tensor | None = None  # [B, 3, S, S] in [0, 1]


def build_reward(name: str, reward_cfg=None, **context):
    """Instantiate registry entry `name`; `context` passes e.g. `answer_fn`, `device`."""
    reward_needs(name)  # raises for an unknown name
    return REWARDS[name](reward_cfg, **context)


# ----------------------------------------------------------------------------- accuracy
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_LETTER_FIRST = re.compile(r"^\s*[\(\[]?([A-J])(?:[\)\].:,]|\s|$)")
_LETTER_PHRASE = re.compile(r"answer\s*(?:is|:)?\s*[\(\[]?([A-J])\b", re.IGNORECASE)
_LETTER_ANY = re.compile(r"\b([A-J])\b")


def extract_answer(text: str) -> str:
    """The text inside the last `<answer>...</answer>`, else the whole text; stripped."""
    found = _ANSWER_TAG.findall(text)
    return (found[-1] if found else text).strip()


def extract_choice(text: str) -> str | None:
    """Option letter A-J: a leading letter ("B", "(B)", "B. red"), "the answer is B", or the first standalone capital."""
    for pat in (_LETTER_FIRST, _LETTER_PHRASE, _LETTER_ANY):
        m = pat.search(text)
        if m:
            return m.group(1).upper() if pat is _LETTER_PHRASE else m.group(1)
    return None


def _to_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def _normalise(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def answer_accuracy(prediction: str, reference: str) -> float:
    """1.0 when `prediction` answers like `reference`, else 0.0 (see module docstring)."""
    pred = extract_answer(prediction)
    ref = reference.strip()
    if re.fullmatch(r"[A-J]", ref):
        return float(extract_choice(pred) == ref)
    ref_num = _to_number(ref) if re.fullmatch(r"\s*" + _NUMBER.pattern + r"\s*", ref) else None
    if ref_num is not None:
        got = _to_number(pred)
        return float(got is not None and math.isclose(got, ref_num, rel_tol=1e-6, abs_tol=1e-9))
    return float(_normalise(pred) == _normalise(ref))


@register_reward("accuracy")
class AccuracyReward:
    needs = RewardNeeds("understanding", qa=True)

    def __init__(self, reward_cfg=None, **_):
        pass

    def __call__(self, inp: RewardInput) -> torch.Tensor:
        if inp.texts is None:
            raise ValueError("accuracy: needs texts")
        return torch.tensor([answer_accuracy(t, s.answer) for t, s in zip(inp.texts, inp.samples)],
                            dtype=torch.float32)


# ----------------------------------------------------------------------------- toy world
#: Blob features (fill = area / bounding-box area, widest = relative height of the widest row)
#: of each toy-world shape drawn upright, as `engine.data.toyworld.render` draws them.
SHAPE_FEATURES = {"square": (1.0, 0.5), "circle": (math.pi / 4, 0.5), "triangle": (0.5, 1.0), "diamond": (0.5, 0.5)}


def _largest_blob_features(fg: np.ndarray) -> tuple[float, float] | None:
    from scipy import ndimage

    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    blob = labels == (int(sizes.argmax()) + 1)
    rows, cols = np.nonzero(blob)
    crop = blob[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    widths = crop.sum(1)
    widest = float(np.nonzero(widths == widths.max())[0].mean()) / max(crop.shape[0] - 1, 1)
    return float(crop.mean()), widest


def read_attributes(images: torch.Tensor, *, shape_temp: float = 0.02):
    """Soft read-out of colour and shape from [B, 3, S, S] images in [0, 1], toy-world vocabulary.

    Returns (p_color [B, len(COLORS)], p_shape [B, len(SHAPES)]). Foreground = pixels with chroma
    >= CHROMA_MIN, as in `engine.data.toyworld.describe_image`. p_color is each colour's share
    of the foreground votes (a pixel votes for its nearest palette colour; all zero without
    foreground), so its argmax is toyworld's `dominant_color`. p_shape is a softmax over shapes
    of -distance between the largest blob's (fill ratio, widest row) and each shape's
    (uniform without a blob).
    """
    palette = torch.tensor(list(toyworld.COLORS.values()), dtype=torch.float32) / 255.0
    ref = torch.tensor([SHAPE_FEATURES.get(s, (0.6, 0.5)) for s in toyworld.SHAPES], dtype=torch.float32)
    x = images.detach().float().cpu().clamp(0, 1)
    chroma = x.max(1).values - x.min(1).values  # [B, S, S]
    fg = chroma >= toyworld.CHROMA_MIN / 255.0
    pix = x.permute(0, 2, 3, 1)  # [B, S, S, 3]
    nearest = ((pix[..., None, :] - palette) ** 2).sum(-1).argmin(-1)  # [B, S, S]
    votes = torch.nn.functional.one_hot(nearest, len(palette)).float() * fg[..., None]
    p_color = votes.sum((1, 2)) / fg.sum((1, 2)).clamp(min=1)[:, None].float()
    p_shape = []
    for i in range(x.shape[0]):
        feats = _largest_blob_features(fg[i].numpy())
        if feats is None:
            p_shape.append(torch.full((len(toyworld.SHAPES),), 1.0 / len(toyworld.SHAPES)))
        else:
            d = ((torch.tensor(feats)[None] - ref) ** 2).sum(-1)
            p_shape.append(torch.softmax(-d / shape_temp, -1))
    return p_color, torch.stack(p_shape)


@register_reward("toyworld")
class ToyWorldReward:
    """(p_color[target] + p_shape[target]) / 2 for the prompt's `meta["attributes"]` (toy world)."""

    needs = RewardNeeds("generation", images=True, attributes=("color", "shape"))

    def __init__(self, reward_cfg=None, **_):
        self.colors, self.shapes = list(toyworld.COLORS), list(toyworld.SHAPES)

    def __call__(self, inp: RewardInput) -> torch.Tensor:
        if inp.images is None:
            raise ValueError("toyworld: needs decoded images (rollout.decode_images=true)")
        p_color, p_shape = read_attributes(inp.images)
        out = []
        for i, s in enumerate(inp.samples):
            attrs = s.meta.get("attributes") or {}
            color, shape = attrs.get("color"), attrs.get("shape")
            if color not in self.colors or shape not in self.shapes:
                raise ValueError(f"toyworld: generation half {s.source_id or s.image_path!r} lacks toy-world "
                                 f"attributes color/shape (got {color!r}, {shape!r})")
            out.append(0.5 * float(p_color[i, self.colors.index(color)]) + 0.5 * float(p_shape[i, self.shapes.index(shape)]))
        return torch.tensor(out, dtype=torch.float32)


# ----------------------------------------------------------------------------- CLIP / HPSv2
@register_reward("clip")
class ClipReward:
    """Cosine similarity between CLIP embeddings of the image and of the generation prompt."""

    needs = RewardNeeds("generation", images=True, path=("clip_path", "dir"))

    def __init__(self, reward_cfg, *, device="cpu", **_):
        from transformers import CLIPModel, CLIPProcessor

        path = reward_cfg.clip_path
        self.model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.device = device

    @torch.no_grad()
    def __call__(self, inp: RewardInput) -> torch.Tensor:
        images = [img for img in inp.images.float().cpu()]
        batch = self.processor(text=[s.prompt for s in inp.samples], images=images, return_tensors="pt",
                               padding=True, truncation=True, do_rescale=False)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(**batch)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (img * txt).sum(-1).cpu()


#: How to install what `reward.generation=hpsv2` imports without replacing the project's torch: the
#: `hpsv2` wheel pins its own torch stack and ships without its BPE vocabulary, so the reward runs
#: HPSv2's checkpoint on upstream open_clip (the library HPSv2 vendors), with a torchvision built
#: for the installed torch (same index and version pairing as torch itself).
#: torchvision pins one torch release: torch 2.N pairs with torchvision 0.(N+15) (docs/TRAINING.md "Rewards");
#: named here for the torch this process runs (torch 2.13 -> torchvision 0.28)
HPSV2_INSTALL = (f'pip install "torchvision==0.{int(torch.__version__.split(".")[1]) + 15}.*" && '
                 'pip install --no-build-isolation -e ".[hpsv2]"')
#: open_clip architecture of HPSv2 / HPSv2.1.
HPSV2_ARCH = "ViT-H-14"


@register_reward("hpsv2")
class HPSv2Reward:
    """HPSv2 (open_clip ViT-H-14 fine-tuned on human preferences): image-prompt score, as HPSv2's own
    scorer computes it (cosine of the normalised features)."""

    needs = RewardNeeds("generation", images=True, path=("hpsv2_path", "file"), module=("open_clip", HPSV2_INSTALL))

    def __init__(self, reward_cfg, *, device="cpu", **_):
        import open_clip

        # output_dict: the forward returns {"image_features", "text_features", ...}; without it, a tuple
        model, _, preprocess = open_clip.create_model_and_transforms(
            HPSV2_ARCH, pretrained=None, precision="amp", device=device, jit=False, output_dict=True)
        state = torch.load(reward_cfg.hpsv2_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.model, self.preprocess = model.eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(HPSV2_ARCH)
        self.device = device

    @torch.no_grad()
    def __call__(self, inp: RewardInput) -> torch.Tensor:
        from PIL import Image

        pil = [Image.fromarray((im.float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
               for im in inp.images]
        imgs = torch.stack([self.preprocess(im) for im in pil]).to(self.device)
        text = self.tokenizer([s.prompt for s in inp.samples]).to(self.device)
        out = self.model(imgs, text)
        img, txt = out["image_features"], out["text_features"]
        return (img * txt).sum(-1).float().cpu()


# ----------------------------------------------------------------------------- pair QA
@register_reward("pair_qa")
class PairQAReward:
    """The policy answers the generation half's question about its own image (greedy); reward = accuracy.

    `answer_fn(images [B, 3, S, S], questions list[str]) -> list[str]` is given at construction
    (`engine.rollout.answer_questions` on the policy being trained).
    """

    needs = RewardNeeds("generation", images=True, qa=True, policy=True)

    def __init__(self, reward_cfg=None, *, answer_fn=None, **_):
        if answer_fn is None:
            raise ValueError("pair_qa: needs answer_fn (engine.build passes the policy's answerer)")
        self.answer_fn = answer_fn

    def __call__(self, inp: RewardInput) -> torch.Tensor:
        for s in inp.samples:
            if not s.has_qa:
                raise ValueError(f"pair_qa: generation half {s.source_id or s.image_path!r} has no question/answer")
        texts = self.answer_fn(inp.images, [s.question for s in inp.samples])
        return torch.tensor([answer_accuracy(t, s.answer) for t, s in zip(texts, inp.samples)], dtype=torch.float32)
