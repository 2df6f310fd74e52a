"""The OpenVINO int8 encoder: the sibling bundle (an NNCF IR named with engine "openvino" beside the onnxruntime
decoder), its captions, the random-calibration fallback, the refusal without OpenVINO, and manifests before the field."""
import json
import shutil
import sys

import pytest
import numpy as np

from clipcap.captioner import Captioner
from clipcap.config import BundleError
from clipcap.export.quantize import QuantizeConfig, quantize_bundle
from clipcap.formats.export_bundle import MANIFEST_FILE, load_manifest
from clipcap.formats.model_bundle import load_config
from clipcap.runtimes.base import RuntimeUnavailable
from clipcap.runtimes.onnx_runtime import OnnxRuntime
from conftest import random_images

INSTALL_LINE = r"pip install 'clipcap-deploy\[openvino\]'"


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    for i, image in enumerate(random_images(8, seed=7)):
        image.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def openvino_export(tiny_export, calibration_dir, tmp_path_factory):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    config = QuantizeConfig(tiny_export, tmp_path_factory.mktemp("ov") / "tiny-ov", encoder=True,
                            encoder_method="openvino-int8", calibration_images=calibration_dir)
    return quantize_bundle(config)


def test_sibling_names_each_graphs_engine(tiny_export, openvino_export, calibration_dir):
    manifest = json.loads((openvino_export / MANIFEST_FILE).read_text())
    graphs = manifest["graphs"]
    assert {name: entry["engine"] for name, entry in graphs.items()} == \
        {"encoder": "openvino", "mapper": "onnxruntime", "decoder": "onnxruntime"}
    assert graphs["encoder"]["file"] == "encoder.openvino-int8.xml"
    assert (openvino_export / "encoder.openvino-int8.bin").is_file() and not (openvino_export / "encoder.onnx").exists()
    assert graphs["encoder"]["quantization"]["calibration"] == {"source": str(calibration_dir.resolve()), "images": 8}
    assert graphs["decoder"]["file"] == "decoder.int8.onnx"  # the decoder: --method, as before
    # The IR is int8: NNCF's FakeQuantize nodes sit in front of the encoder's linears.
    assert 'type="FakeQuantize"' in (openvino_export / "encoder.openvino-int8.xml").read_text()


def test_openvino_encoder_captions_like_the_onnxruntime_path(tiny_export, openvino_export):
    ov, fp32 = OnnxRuntime.from_path(openvino_export), OnnxRuntime.from_path(tiny_export)
    assert "encoder" not in ov.sessions and {"mapper", "decoder"} <= ov.sessions.keys()
    pixels = Captioner.from_path(tiny_export).preprocess(random_images(4, seed=3))
    for method in ("encode", "encode_image"):
        got, expected = getattr(ov, method)(pixels), getattr(fp32, method)(pixels)
        assert got.shape == expected.shape and got.dtype == expected.dtype == np.float32
        assert type(got) is type(expected) is np.ndarray  # onnxruntime's CPU arrays: numpy
    # Static int8: each row's scales were fixed at build time, so a row does not depend on its batch mates.
    rows = np.concatenate([ov.encode(pixels[i:i + 1]) for i in range(len(pixels))])
    np.testing.assert_allclose(ov.encode(pixels), rows, rtol=1e-4, atol=1e-4)
    captions = Captioner.from_path(openvino_export).caption_images(random_images(3)).captions
    assert len(captions) == 3 and all(c.caption and c.token_ids for c in captions)


def test_random_calibration_is_stated(tiny_export, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    with pytest.warns(UserWarning, match="random noise images"):
        out = quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "random", encoder=True,
                                             encoder_method="openvino-int8", calibration_size=4))
    calibration = json.loads((out / MANIFEST_FILE).read_text())["graphs"]["encoder"]["quantization"]["calibration"]
    assert calibration["source"] == "random" and calibration["images"] == 4
    assert "--calibration-images" in calibration["note"]


def test_calibration_inputs_are_checked_before_writing(tiny_export, tmp_path):
    with pytest.raises(BundleError, match="calibration images are for the encoder method openvino-int8"):
        quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "refused", encoder=True, calibration_images=tmp_path))
    with pytest.raises(BundleError, match="calibration size must be >= 1"):
        quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "refused", encoder=True,
                                       encoder_method="openvino-int8", calibration_size=0))
    with pytest.raises(BundleError, match="method must be one of int8-dynamic, int8-wo, int4-wo, fp16, got"):
        quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "refused", method="openvino-int8"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no calibration images there"):
        quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "refused", encoder=True,
                                       encoder_method="openvino-int8", calibration_images=tmp_path / "empty"))
    assert not (tmp_path / "refused").exists()


@pytest.fixture
def without_openvino(monkeypatch):
    """`import openvino` fails, as where the extra is not installed (None in sys.modules: ImportError)."""
    monkeypatch.setitem(sys.modules, "openvino", None)


def test_openvino_bundle_refused_without_openvino(tiny_export, tmp_path, without_openvino):
    """Needs no OpenVINO: a manifest naming the openvino engine for the encoder is enough to be refused."""
    bundle = tmp_path / "ov-named"
    shutil.copytree(tiny_export, bundle)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["graphs"]["encoder"]["engine"] = "openvino"
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(RuntimeUnavailable, match=f"needs OpenVINO.*install it with: {INSTALL_LINE}"):
        Captioner.from_path(bundle)
    with pytest.raises(RuntimeUnavailable, match=INSTALL_LINE):
        quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "refused", encoder=True, encoder_method="openvino-int8"))
    assert not (tmp_path / "refused").exists()


def test_manifest_before_the_engine_field_reads_as_onnxruntime(tiny_export, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_export, old)
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    for entry in manifest["graphs"].values():
        entry.pop("engine")
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert {entry.engine for entry in load_manifest(old, load_config(old)).graphs.values()} == {"onnxruntime"}
    images = random_images(2)
    assert Captioner.from_path(old).caption_images(images).captions == \
        Captioner.from_path(tiny_export).caption_images(images).captions
