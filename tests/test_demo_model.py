"""The committed demo bundle (models/shapes-demo) loads and captions freshly generated shapes above the bar.

The test images use a seed no training step used (training: 0, held-out evaluation: 2026,
samples/: 77, pretraining's held-out metrics: 1_000_003).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipcap.captioner import Captioner
from clipcap.training import shapes
from clipcap.training.metrics import exact_match

DEMO = Path(__file__).resolve().parent.parent / "models" / "shapes-demo"
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
TEST_SEED = 4242
N_TEST = 300


@pytest.fixture(scope="module")
def captioner():
    return Captioner.from_path(DEMO)


def test_bundle_is_small_and_documented():
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size < 50 * 2**20, f"demo bundle is {size / 2**20:.1f} MiB"
    card = (DEMO / "MODEL_CARD.md").read_text()
    assert "exact match" in card.lower() and "ablation" in card.lower()


def test_preprocessing_matches_clip_pretraining(captioner):
    from clipcap.training.clip_pretraining import PreprocessConfig

    clip = captioner.config.clip
    pretraining = PreprocessConfig(image_size=clip.image_size)
    assert clip.image_size == 64 and clip.embed_dim == 128
    assert np.allclose(clip.mean, pretraining.mean) and np.allclose(clip.std, pretraining.std)


@pytest.fixture(scope="module")
def accuracy(captioner):
    samples = shapes.generate(N_TEST, seed=TEST_SEED)
    predictions, references, groups = {}, {}, {}
    for start in range(0, N_TEST, 100):
        batch = samples[start: start + 100]
        captions = captioner.caption_images([s.image for s in batch]).captions
        for i, (sample, caption) in enumerate(zip(batch, captions), start=start):
            predictions[str(i)], references[str(i)] = caption.caption, sample.captions
            groups[str(i)] = shapes.group(sample)
    return exact_match(predictions, references, groups)


def test_one_object_captions_meet_the_bar(accuracy):
    assert accuracy["one-object"]["accuracy"] >= 0.95, accuracy


def test_two_object_captions_meet_the_bar(accuracy):
    assert accuracy["two-object"]["accuracy"] >= 0.80, accuracy


def test_samples_are_the_documented_held_out_images(captioner):
    references = json.loads((SAMPLES / "captions.json").read_text())
    regenerated = shapes.generate(len(references), seed=77)
    assert sorted(references) == [f"shapes-{i:02d}.png" for i in range(len(references))]
    for (name, captions), sample in zip(sorted(references.items()), regenerated):
        assert captions == sample.captions
        with open(SAMPLES / name, "rb") as handle:
            from clipcap.images import decode_image

            assert np.array_equal(np.asarray(decode_image(handle.read())), np.asarray(sample.image))


def test_captions_of_large_jpegs_are_those_of_their_full_decode(captioner):
    """Held-out renders saved as 12 MP-class JPEGs (upscaled 24x, 1536 px): shrink on load (decoded at
    1/8) gives the demo model the same captions as decoding every pixel."""
    import io

    from PIL import Image

    from clipcap.images import decode_image, preprocess

    samples = shapes.generate(40, seed=TEST_SEED + 1)
    jpegs = []
    for sample in samples:
        buffer = io.BytesIO()
        sample.image.resize((1536, 1536), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    clip = captioner.config.clip
    shrunk = np.stack([captioner.load_pixels(data) for data in jpegs])
    full = preprocess([decode_image(data) for data in jpegs], clip.image_size, clip.mean, clip.std)
    fast, slow = captioner.caption_pixels(shrunk).captions, captioner.caption_pixels(full).captions
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]
