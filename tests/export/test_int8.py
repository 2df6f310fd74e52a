"""Dynamic int8 quantisation: the sibling bundle, its int8 graph, and a floor on greedy agreement."""
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from clipcap.captioner import Captioner
from clipcap.config import BundleError
from clipcap.export.int8 import QuantizeConfig, quantize_bundle
from clipcap.formats.export_bundle import MANIFEST_FILE
from clipcap.training.agreement import AgreementConfig, compare_captions, measure_agreement, token_agreement
from conftest import CAPTIONS, random_images

ROOT = Path(__file__).resolve().parents[2]
# Measured on the tiny fixture model: 32/32 images (100%) identical. The floor leaves room for
# another CPU's int8 kernels to round a near-tie the other way.
AGREEMENT_FLOOR = 0.9


@pytest.fixture(scope="module")
def int8_export(tiny_export, tmp_path_factory):
    return quantize_bundle(QuantizeConfig(tiny_export, tmp_path_factory.mktemp("int8") / "tiny-int8"))


def test_sibling_bundle_layout(tiny_export, int8_export):
    manifest = json.loads((int8_export / MANIFEST_FILE).read_text())
    assert manifest["precision"] == "int8-dynamic"
    assert manifest["graphs"]["decoder"]["file"] == "decoder.int8.onnx"
    assert manifest["graphs"]["encoder"]["file"] == "encoder.onnx"  # not asked for
    ops = {node.op_type for node in onnx.load(str(int8_export / "decoder.int8.onnx")).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    # Unchanged files are shared, not copied; the fp32 source is untouched.
    assert (int8_export / "encoder.onnx").stat().st_ino == (tiny_export / "encoder.onnx").stat().st_ino
    assert json.loads((tiny_export / MANIFEST_FILE).read_text())["precision"] == "fp32"
    assert not (tiny_export / "decoder.int8.onnx").exists()


def test_agreement_floor_tiny(tiny_export, int8_export):
    fp32 = Captioner.from_path(tiny_export, "onnxruntime")
    int8 = Captioner.from_path(int8_export, "onnxruntime")
    batches = [fp32.preprocess(random_images(16, seed=seed)) for seed in (0, 1)]
    result = compare_captions(fp32, int8, batches)
    assert result.images == 32
    assert result.caption_agreement >= AGREEMENT_FLOOR, result.to_dict()
    assert result.token_agreement >= AGREEMENT_FLOOR, result.to_dict()


def test_encoder_quantisation_on_request(tiny_export, tmp_path):
    out = quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "both", encoder=True))
    graphs = json.loads((out / MANIFEST_FILE).read_text())["graphs"]
    assert graphs["encoder"]["file"] == "encoder.int8.onnx" and not (out / "encoder.onnx").exists()
    captions = Captioner.from_path(out, "onnxruntime").caption_images(random_images(2)).captions
    assert len(captions) == 2


def test_metric_delta_with_references(tiny_export, int8_export, tmp_path):
    """With a caption dataset, the training metrics module scores both bundles."""
    pytest.importorskip("clipcap.training.evaluation")
    rows = []
    for i, image in enumerate(random_images(6, seed=4)):
        image.save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": CAPTIONS[i]}))
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    result = measure_agreement(AgreementConfig(tiny_export, int8_export, data=tmp_path / "captions.jsonl"))
    assert result.images == 6
    assert {"BLEU-4", "CIDEr"} <= result.metrics_fp32.keys() and result.metric_delta.keys() == result.metrics_fp32.keys()
    if result.caption_agreement == 1.0:  # identical captions score identically
        assert all(delta == 0 for delta in result.metric_delta.values())


def test_token_agreement_counts():
    assert token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6, 7]]) == (0.5, 4 / 5)
    assert token_agreement([[1]], [[2]]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        token_agreement([[1]], [])


def test_refusals(tiny_export, tiny_bundle, int8_export):
    with pytest.raises(BundleError, match="not an export bundle"):
        quantize_bundle(QuantizeConfig(tiny_bundle))
    with pytest.raises(BundleError, match="must not overwrite"):
        quantize_bundle(QuantizeConfig(tiny_export, tiny_export))
    with pytest.raises(BundleError, match="quantise an fp32 export bundle"):
        quantize_bundle(QuantizeConfig(int8_export))
    with pytest.raises(BundleError, match="exactly one"):
        measure_agreement(AgreementConfig(tiny_export, int8_export))


def test_quantize_script(tiny_export, tmp_path):
    images = []
    for i, image in enumerate(random_images(4, seed=9)):
        images.append(str(tmp_path / f"{i}.png"))
        image.save(images[-1])
    out = tmp_path / "int8"
    result = subprocess.run([sys.executable, str(ROOT / "export" / "quantize.py"), str(tiny_export), "--out", str(out),
                             "--images", *images], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "greedy captions identical to fp32" in result.stdout
    assert json.loads((out / "quantization.json").read_text())["images"] == 4
