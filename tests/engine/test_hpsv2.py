"""reward.generation=hpsv2: the scorer on a tiny random HPS-format checkpoint, and the package check
that runs when the config is validated.

open_clip needs a torchvision built for the installed torch, which the test environment lacks, so a
stand-in `open_clip` module with open_clip's interface (a CLIP whose forward returns a tuple unless
built with output_dict=True, features L2-normalised) runs the reward's code path end to end.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from engine import rewards
from engine.config import ConfigError, load_config
from engine.data.schema import Sample


class _TinyClip(torch.nn.Module):
    def __init__(self, output_dict: bool):
        super().__init__()
        self.visual = torch.nn.Linear(3 * 8 * 8, 16)
        self.token_embedding = torch.nn.Embedding(64, 16)
        self.output_dict = output_dict

    def forward(self, image, text):
        img = torch.nn.functional.normalize(self.visual(image.flatten(1)), dim=-1)
        txt = torch.nn.functional.normalize(self.token_embedding(text).mean(1), dim=-1)
        if self.output_dict:
            return {"image_features": img, "text_features": txt, "logit_scale": torch.tensor(100.0)}
        return img, txt, torch.tensor(100.0)


def _fake_open_clip(built: list):
    mod = types.ModuleType("open_clip")

    def create_model_and_transforms(name, pretrained=None, precision="fp32", device="cpu", jit=False,
                                    output_dict=False):
        built.append({"name": name, "output_dict": output_dict})
        torch.manual_seed(0)
        model = _TinyClip(output_dict)

        def preprocess(pil):
            x = torch.frombuffer(bytearray(pil.resize((8, 8)).tobytes()), dtype=torch.uint8)
            return x.view(8, 8, 3).permute(2, 0, 1).float() / 255.0

        return model, preprocess, preprocess

    mod.create_model_and_transforms = create_model_and_transforms
    def tokenize(texts):  # word lengths, 4 per prompt, zero-padded
        return torch.tensor([([len(w) % 64 for w in t.split()] + [0] * 4)[:4] for t in texts])

    mod.get_tokenizer = lambda name: tokenize
    return mod


def test_hpsv2_scores_with_a_local_hps_format_checkpoint(tmp_path, monkeypatch):
    from PIL import Image

    built = []
    monkeypatch.setitem(sys.modules, "open_clip", _fake_open_clip(built))
    torch.manual_seed(3)
    trained = _TinyClip(True)
    # HPSv2's released files hold {"state_dict": ...}
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "HPS_v2_compressed.pt")
    cfg = load_config(None, ["reward.generation=hpsv2", f"reward.hpsv2_path={tmp_path / 'HPS_v2_compressed.pt'}"])
    reward = rewards.build_reward("hpsv2", cfg.reward)
    assert built == [{"name": rewards.HPSV2_ARCH, "output_dict": True}]
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    samples = [Sample(image_path=f"{i}.png", prompt=p) for i, p in enumerate(["a red cat", "blue sky", "a green big square"])]
    got = reward(rewards.RewardInput(samples=samples, images=images))
    # the same score computed here from the checkpoint's weights, not the random init
    pix = torch.stack([reward.preprocess(Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()))
                       for im in images])
    out = trained(pix, reward.tokenizer([s.prompt for s in samples]))
    torch.testing.assert_close(got, (out["image_features"] * out["text_features"]).sum(-1))
    assert got.shape == (3,) and got.dtype == torch.float32


def test_missing_or_broken_open_clip_is_one_config_error_before_any_model(tmp_path, monkeypatch):
    ckpt = tmp_path / "hps.pt"
    ckpt.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import raises ImportError
    with pytest.raises(ConfigError) as info:
        load_config(None, ["reward.generation=hpsv2", f"reward.hpsv2_path={ckpt}"])
    msg = str(info.value)
    assert msg.startswith("reward.generation=hpsv2 needs the `open_clip` package") and "\n" not in msg
    assert rewards.HPSV2_INSTALL in msg

    monkeypatch.delitem(sys.modules, "open_clip")

    def explode(name):  # a package that imports but fails inside, as hpsv2 1.2.0 without its vocabulary
        if name == "open_clip":
            raise FileNotFoundError("bpe_simple_vocab_16e6.txt.gz\nsecond line")
        return real_import(name)

    import importlib
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", explode)
    expected = r"^reward\.generation=hpsv2 needs .*FileNotFoundError: bpe_simple_vocab_16e6\.txt\.gz\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["reward.generation=hpsv2", f"reward.hpsv2_path={ckpt}"])
