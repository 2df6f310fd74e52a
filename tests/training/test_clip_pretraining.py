"""Fast checks of clipcap.training.clip_pretraining (and its script) on a tiny CLIP config."""

import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clipcap.training import clip_pretraining, shapes
from training import pretrain_clip

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def pool():
    return clip_pretraining.build_pool(shapes.generate(16, seed=0), image_size=32)


def test_main_writes_loadable_outputs(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CFG))
    out = tmp_path / "clip"
    pretrain_clip.main(
        ["--out", str(out), "--config", str(config), "--steps", "4", "--batch-size", "8",
         "--n-images", "32", "--n-eval", "16", "--log-every", "2", "--threads", "1"]
    )
    for name in ("open_clip_config.json", "preprocess_cfg.json", "clip.safetensors",
                 "clip_visual.safetensors", "metrics.json", "loss.png"):
        assert (out / name).is_file(), name

    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg == TINY_CFG
    model = open_clip.model.CLIP(**cfg)
    model.visual.load_state_dict(load_file(out / "clip_visual.safetensors"), strict=True)
    model.load_state_dict(load_file(out / "clip.safetensors"), strict=True)

    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["loss"]] == [2, 4]
    assert all(math.isfinite(r["loss"]) for r in metrics["loss"])
    assert 0.0 <= metrics["eval"]["hard_negative_acc_two_object"] <= 1.0
    assert json.loads((out / "preprocess_cfg.json").read_text())["image_size"] == 32


def test_hard_negatives_add_text_candidates(pool):
    pre = clip_pretraining.PreprocessConfig(image_size=32)
    indices = np.arange(8)
    plain = clip_pretraining.build_batch(pool, indices, np.random.default_rng(0), False, pre)
    hard = clip_pretraining.build_batch(pool, indices, np.random.default_rng(0), True, pre)
    assert len(plain.texts) == 8 and plain.correct.shape == (8, 8)
    # 4 two-object images x 2 negatives + 4 one-object images x 1 (other size)
    assert len(hard.texts) == 8 + 4 * 2 + 4
    assert hard.texts[:8] == plain.texts
    assert hard.correct.shape == (8, len(hard.texts))
    assert not hard.correct[:, 8:].any()  # a hard negative is never a reference
    for i in indices:
        assert plain.texts[i] in pool.references[i]


def test_duplicate_captions_are_masked():
    # Images 0 and 1 share a caption: the copy must not count as a negative.
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    scale = torch.tensor(10.0)
    correct = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    masked = clip_pretraining.contrastive_loss(features, features, scale, correct)
    unmasked = clip_pretraining.contrastive_loss(features, features, scale, torch.eye(3, dtype=torch.bool))
    assert math.isfinite(masked.item()) and masked.item() < unmasked.item()
    # Masking exactly removes the duplicate from both softmax denominators.
    logits = scale * features @ features.T
    expected = (
        F.cross_entropy(logits[[0]][:, [0, 2]], torch.tensor([0])) + F.cross_entropy(logits[[1]][:, [1, 2]], torch.tensor([0]))
        + F.cross_entropy(logits[[2]], torch.tensor([2]))
    ) / 3
    assert torch.allclose(masked, expected, atol=1e-5)


def test_preprocess_matches_open_clip_transform():
    image = shapes.generate(1, seed=5)[0].image
    pre = clip_pretraining.PreprocessConfig(image_size=32)
    reference = open_clip.transform.image_transform(32, is_train=False, mean=pre.mean, std=pre.std)(image)
    assert torch.allclose(clip_pretraining.preprocess([image], pre)[0], reference, atol=1e-5)
