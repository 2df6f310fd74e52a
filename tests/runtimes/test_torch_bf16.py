"""The torch-bf16 backend: CLIP's image tower in bfloat16 behind the same Runtime protocol, everything else float32."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipcap.captioner import Captioner
from clipcap.cli import main
from clipcap.config import BundleError
from clipcap.runtimes import open_runtime
from conftest import random_images

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runtimes(tiny_bundle):
    return open_runtime(tiny_bundle, "torch"), open_runtime(tiny_bundle, "torch-bf16")


def test_only_the_image_tower_is_bfloat16(runtimes):
    _, bf16 = runtimes
    assert {p.dtype for p in bf16.model.clip.parameters()} == {torch.bfloat16}
    rest = [*bf16.model.clip_project.parameters(), *bf16.model.gpt.parameters()]
    assert {p.dtype for p in rest} == {torch.float32}


@pytest.mark.parametrize("batch", [1, 5])
def test_embeddings_and_prefix_float32_near_the_float32_tower(runtimes, batch):
    reference, bf16 = runtimes
    size = reference.config.clip.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    embeds, expected = bf16.encode_image(pixels), reference.encode_image(pixels)
    assert embeds.dtype == torch.float32 and embeds.shape == expected.shape
    # bfloat16 keeps 8 bits of mantissa; the tiny tower's embeddings stay within a cosine of 0.995
    assert torch.nn.functional.cosine_similarity(embeds, expected, dim=-1).min() > 0.995
    prefix = bf16.encode(pixels)
    assert prefix.dtype == torch.float32
    assert torch.equal(prefix, bf16.map_embeddings(embeds))  # encode = the mapper over the float32 embedding
    assert pixels.dtype == torch.float32  # the caller's tensor is not converted in place


def test_captions_through_the_library_and_the_cli(tiny_bundle, tmp_path, capsys):
    paths = []
    for i, image in enumerate(random_images(3, seed=4)):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    captions = Captioner.from_path(tiny_bundle, backend="torch-bf16").caption_images(random_images(3, seed=4)).captions
    assert len(captions) == 3 and all(c.token_ids for c in captions)
    assert main(["caption", str(tiny_bundle), *paths, "--json", "--backend", "torch-bf16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in printed] == paths
    assert [r["token_ids"] for r in printed] == [c.token_ids for c in captions]


def test_an_export_bundle_is_refused(tiny_export):
    with pytest.raises(BundleError, match="model.safetensors"):
        open_runtime(tiny_export, "torch-bf16")


def test_agreement_script_bf16_against_float32(tiny_bundle, tmp_path):
    images = []
    for i, image in enumerate(random_images(4, seed=11)):
        images.append(str(tmp_path / f"{i}.png"))
        image.save(images[-1])
    script = [sys.executable, str(ROOT / "export" / "agreement.py"), str(tiny_bundle)]
    out = tmp_path / "agreement.json"
    result = subprocess.run([*script, "--candidate-backend", "torch-bf16", "--images", *images, "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["backends"] == ["torch", "torch-bf16"] and report["images"] == 4
    assert 0.0 <= report["caption_agreement"] <= 1.0 and "greedy captions identical to fp32" in result.stdout
    same = subprocess.run([*script, "--images", *images], capture_output=True, text=True, cwd=ROOT)
    assert same.returncode == 2 and "the candidate is the reference" in same.stderr
    missing = subprocess.run([*script, "--candidate-backend", "torch-bf16", "--images", str(tmp_path / "gone.png")],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "not found" in missing.stderr
