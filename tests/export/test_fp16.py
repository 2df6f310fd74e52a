"""The fp16 sibling (export/quantize.py --method fp16): its manifest and kind, fp16 weights with fp32 LayerNorm
and fp32 inputs/outputs, and its outputs within fp16's rounding of the fp32 graphs (onnxruntime CPU runs them)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from clipcap.config import BundleError
from clipcap.export.fp16 import FP16_KEPT_FP32
from clipcap.export.quantize import QuantizeConfig, quantize_bundle
from clipcap.export.tensorrt import concat_graphs
from clipcap.formats.detect import detect
from clipcap.formats.export_bundle import MANIFEST_FILE
from clipcap.runtimes.onnx_runtime import OnnxRuntime
from conftest import random_images

ROOT = Path(__file__).resolve().parents[2]
# fp16 keeps 11 significant bits: each rounding moves a value by at most 2^-11 of it. Through the tiny model's
# few layers (tens of roundings in a row, partly cancelling) 1e-2 of the output's scale is a loose bound; the
# in-place tiny export measured at most 3.1e-4 (encoder) and 2.9e-4 (decoder logits, six steps) of it here.
RELATIVE_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def fp16_export(tiny_export, tmp_path_factory):
    return quantize_bundle(QuantizeConfig(tiny_export, tmp_path_factory.mktemp("fp16") / "tiny-fp16", method="fp16",
                                          encoder=True))


def test_sibling_manifest_and_kind(tiny_export, fp16_export):
    manifest = json.loads((fp16_export / MANIFEST_FILE).read_text())
    assert manifest["precision"] == "fp16" and manifest["quantized_from"] == str(tiny_export)
    assert {name: entry["file"] for name, entry in manifest["graphs"].items()} == \
        {"encoder": "encoder.fp16.onnx", "mapper": "mapper.onnx", "decoder": "decoder.fp16.onnx"}
    for name in ("encoder", "decoder"):
        recorded = manifest["graphs"][name]["quantization"]
        assert recorded["weights"] == "fp16" and recorded["io"] == "fp32" and recorded["fp16_initializers"] > 0
        assert manifest["graphs"][name]["parity"] is None  # fp32 bounds do not apply
    assert detect(fp16_export).name == "onnx-fp16" and detect(fp16_export).backend == "onnxruntime"
    assert json.loads((tiny_export / MANIFEST_FILE).read_text())["precision"] == "fp32"  # the source untouched


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_weights_fp16_layernorm_fp32_io_fp32(tiny_export, fp16_export, name):
    fp32, fp16 = (onnx.load(str(d / f)) for d, f in ((tiny_export, f"{name}.onnx"), (fp16_export, f"{name}.fp16.onnx")))
    io = lambda graph: [(v.name, v.type.tensor_type.elem_type) for v in (*graph.input, *graph.output)]  # noqa: E731
    assert io(fp16.graph) == io(fp32.graph)
    users = {}
    for node in fp16.graph.node:
        for tensor in node.input:
            users.setdefault(tensor, []).append(node)

    def consumers(tensor: str) -> set[str]:
        """The operators reading `tensor`, looking through Casts (the converter casts kept weights to fp32 anew)."""
        found = set()
        for node in users.get(tensor, []):
            found |= consumers(node.output[0]) if node.op_type == "Cast" else {node.op_type}
        return found

    floats = {w.name: w.data_type for w in fp16.graph.initializer
              if w.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    assert onnx.TensorProto.FLOAT16 in floats.values()
    # What stays fp32 feeds only the operators kept fp32 (LayerNorm's scale and bias).
    kept = {n: consumers(n) for n, t in floats.items() if t == onnx.TensorProto.FLOAT}
    assert all(ops and ops <= set(FP16_KEPT_FP32) for ops in kept.values()), kept
    if name == "encoder":  # the decoder's layer norms are onnxruntime's fused SkipLayerNormalization: fp16
        assert kept and any(node.op_type == "LayerNormalization" for node in fp16.graph.node)


@pytest.mark.parametrize("source", ["tiny_export", "tiny_concat_export"])
def test_outputs_within_fp16_rounding(source, request, tmp_path):
    """Encoder outputs, and the decoder's logits over a teacher-forced caption through either decoder kind's
    cache (in-place: fp32 buffers bound as past and present, cast to fp16 inside), against the fp32 source."""
    source = request.getfixturevalue(source)
    fp16_export = quantize_bundle(QuantizeConfig(source, tmp_path / "fp16", method="fp16", encoder=True))
    fp32, fp16 = OnnxRuntime.from_path(source, threads=1), OnnxRuntime.from_path(fp16_export, threads=1)
    size = fp32.config.clip.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    for encode in ("encode", "encode_image"):
        want, got = getattr(fp32, encode)(pixels), getattr(fp16, encode)(pixels)
        assert got.dtype == np.float32
        want, got = torch.as_tensor(want), torch.as_tensor(got)  # numpy arrays, the CPU provider's
        assert (want - got).abs().max() <= RELATIVE_TOLERANCE * max(1.0, want.abs().max())
    prefix = fp32.encode(pixels)
    caches = [fp32.new_cache(3), fp16.new_cache(3)]
    embeds = prefix
    for _ in range(6):
        (want, caches[0]), (got, caches[1]) = fp32.step(embeds, caches[0]), fp16.step(embeds, caches[1])
        want, got = torch.as_tensor(want), torch.as_tensor(got)
        assert (want - got).abs().max() <= RELATIVE_TOLERANCE * max(1.0, want.abs().max())
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * RELATIVE_TOLERANCE * max(1.0, want.abs().max())
        assert torch.equal(want.argmax(-1)[clear], got.argmax(-1)[clear])
        embeds = fp32.embed(want.argmax(-1, keepdim=True))  # the same tokens fed to both


def test_refusals(fp16_export, tmp_path):
    with pytest.raises(BundleError, match="precision is 'fp16'; quantise an fp32 export bundle"):
        quantize_bundle(QuantizeConfig(fp16_export, tmp_path / "again", method="fp16"))
    with pytest.raises(BundleError, match="a onnx-fp16 bundle; build TensorRT engines from a model bundle"):
        concat_graphs(fp16_export, tmp_path / "work")  # to_tensorrt.py --fp16 converts from fp32 itself
    assert not (tmp_path / "again").exists() and not (tmp_path / "work").exists()


def test_quantize_script_fp16(tiny_export, tmp_path):
    out = tmp_path / "tiny-fp16"
    result = subprocess.run([sys.executable, str(ROOT / "export" / "quantize.py"), str(tiny_export), "--method", "fp16",
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["precision"] == "fp16" and manifest["graphs"]["encoder"]["file"] == "encoder.onnx"  # no --encoder
    assert QuantizeConfig(tiny_export, method="fp16").out_dir.name == tiny_export.name + "-fp16"


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="checks the refusal where onnxruntime has no CUDA provider")
def test_agreement_on_a_missing_device_is_refused_before_writing(tiny_export, tmp_path):
    image = tmp_path / "image.png"
    random_images(1)[0].save(image)
    out = tmp_path / "tiny-fp16"
    result = subprocess.run([sys.executable, str(ROOT / "export" / "quantize.py"), str(tiny_export), "--method", "fp16",
                             "--out", str(out), "--images", str(image), "--device", "cuda"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "install onnxruntime-gpu" in result.stderr, result.stderr
    assert not out.exists()
