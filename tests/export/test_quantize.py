"""Dynamic int8 quantisation: the sibling bundle, its int8 graph, and its logit error within the quantisation bound."""
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from clipcap.formats.model_bundle import load_bundle
from clipcap.captioner import Captioner
from clipcap.config import BundleError
from clipcap.decoding import DecodingOptions, generate
from clipcap.export.quantize import QuantizeConfig, quantize_bundle
from clipcap.formats.export_bundle import MANIFEST_FILE
from clipcap.formats.graph_specs import decoder_spec
from clipcap.runtimes.onnx_runtime import OnnxRuntime
from clipcap.runtimes.torch_runtime import TorchRuntime
from clipcap.training.agreement import AgreementConfig, measure_agreement, token_agreement
from conftest import CAPTIONS, random_images

ROOT = Path(__file__).resolve().parents[2]


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


def _lm_head_weight_scale(graph) -> float:
    """The weight scale of the graph's last quantised MatMul (the LM head); the largest, if per channel."""
    from onnx import numpy_helper

    last = [node for node in graph.node if node.op_type == "MatMulInteger"][-1]
    name = last.input[1].removesuffix("_quantized") + "_scale"
    return float(next(numpy_helper.to_array(i) for i in graph.initializer if i.name == name).max())


def _teacher_forced(runtime, prefix: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(steps, V) logits of one row fed `tokens` (its own batch: int8 activation scales are per call)."""
    logits, cache = runtime.step(prefix, runtime.new_cache(1))
    rows = [torch.as_tensor(logits).clone()]  # onnxruntime's logits are numpy arrays on the CPU
    for token in tokens[:-1]:
        logits, cache = runtime.step(runtime.embed(torch.tensor([[token]])), cache)
        rows.append(torch.as_tensor(logits).clone())
    return torch.cat(rows)


def test_int8_logit_error_within_quantisation_bound(tiny_bundle, int8_export):
    """CPU-independent: a bound on the int8 decoder's logit error derived from its quantisation steps,
    and top-1 agreement only where the fp32 margin exceeds twice that bound.

    Bound per row and step: the LM head's worst-case error, (s_w * |h|_1 + s_h * max_j |W_j|_1) / 2
    (weight step s_w, activation step s_h = range of h (0 included) / 255, h the final hidden state),
    times the number of quantised MatMuls in the graph (each adds at most such a step to the residual
    stream the LM head reads), plus the fp32 kernel bound. Measured here: the error reaches 3.5 of
    the 9 steps. The tiny model's fp32 margins are often far smaller than int8's error, so whether
    its captions agree is the CPU's luck; this test asserts only what the mechanism guarantees.
    """
    model = load_bundle(tiny_bundle).model
    graph = onnx.load(str(int8_export / "decoder.int8.onnx")).graph
    layers = sum(node.op_type == "MatMulInteger" for node in graph.node)
    weight_scale = _lm_head_weight_scale(graph)
    head = model.gpt.lm_head.weight.detach()  # (V, E)
    int8 = OnnxRuntime.from_path(int8_export)
    pixels = Captioner.from_path(int8_export, "onnxruntime").preprocess(random_images(12, seed=2))
    prefix = torch.as_tensor(int8.encode(pixels))
    fp32 = TorchRuntime(model)
    steps = model.config.max_tokens
    tokens = generate(fp32, prefix, DecodingOptions(ignore_stop=True), [], steps)
    checked = 0
    with torch.no_grad():
        for row, ids in enumerate(tokens):
            embeds = torch.cat((prefix[row:row + 1], model.embed_tokens(torch.tensor([ids[:-1]]))), dim=1)
            hidden = model.gpt.transformer(inputs_embeds=embeds).last_hidden_state[0, prefix.shape[1] - 1:]
            expected = model.gpt.lm_head(hidden)  # (steps, V), fp32
            activation_scale = (hidden.clamp(min=0).amax(-1) - hidden.clamp(max=0).amin(-1)) / 255
            step = (weight_scale * hidden.abs().sum(-1) + activation_scale * head.abs().sum(-1).max()) / 2
            bound = layers * step + decoder_spec(model.config).atol  # (steps,)
            got = _teacher_forced(int8, prefix[row:row + 1], ids)
            error = (got - expected).abs().amax(-1)
            assert bool((error <= bound).all()), (row, (error / bound).max().item())
            top = expected.topk(2, dim=-1).values
            clear = (top[:, 0] - top[:, 1]) > 2 * bound  # no int8 error within the bound can flip these
            assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear]), row
            checked += int(clear.sum())
    assert checked > 0, "no step with a margin above twice the bound: the agreement check would be vacuous"


def test_encoder_quantisation_on_request(tiny_export, tmp_path):
    out = quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "both", encoder=True))
    graphs = json.loads((out / MANIFEST_FILE).read_text())["graphs"]
    assert graphs["encoder"]["file"] == "encoder.int8.onnx" and not (out / "encoder.onnx").exists()
    # The linears are int8; the patch embedding stays an fp32 Conv (ENCODER_KEPT_FP32), as the manifest says.
    ops = [node.op_type for node in onnx.load(str(out / "encoder.int8.onnx")).graph.node]
    assert "MatMulInteger" in ops and "ConvInteger" not in ops and ops.count("Conv") == 1
    assert graphs["encoder"]["quantization"]["kept_fp32"] == ["Conv"]
    assert graphs["decoder"]["quantization"]["kept_fp32"] == []
    captions = Captioner.from_path(out, "onnxruntime").caption_images(random_images(2)).captions
    assert len(captions) == 2


def test_encoder_with_its_own_method(tiny_export, tmp_path):
    """An int8-dynamic encoder beside an int4 weight-only decoder: each graph by its own method, the bundle's
    precision (its kind) the decoder's, captions from the mix."""
    out = quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "mix", encoder=True, method="int4-wo",
                                         encoder_method="int8-dynamic"))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    graphs = manifest["graphs"]
    assert manifest["precision"] == "int4-wo"
    assert graphs["encoder"]["quantization"]["method"] == "onnxruntime quantize_dynamic"
    assert graphs["decoder"]["quantization"]["weights"] == "int4"
    encoder_ops = {node.op_type for node in onnx.load(str(out / graphs["encoder"]["file"])).graph.node}
    decoder_ops = {node.op_type for node in onnx.load(str(out / graphs["decoder"]["file"])).graph.node}
    assert "MatMulInteger" in encoder_ops and "MatMulNBits" not in encoder_ops
    assert "MatMulNBits" in decoder_ops and "MatMulInteger" not in decoder_ops
    assert len(Captioner.from_path(out, "onnxruntime").caption_images(random_images(2)).captions) == 2
    with pytest.raises(BundleError, match="without quantising the encoder"):
        quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "refused", encoder_method="int8-dynamic"))
    with pytest.raises(BundleError, match="method must be one of"):
        quantize_bundle(QuantizeConfig(tiny_export, tmp_path / "refused", encoder=True, encoder_method="int3"))
    assert not (tmp_path / "refused").exists()


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


def test_weight_only_needs_a_decoder_kind_with_matmul_linears(tiny_concat_export, tmp_path):
    with pytest.raises(BundleError, match="needs the in-place decoder"):
        quantize_bundle(QuantizeConfig(tiny_concat_export, tmp_path / "wo", method="int4-wo"))
    assert not (tmp_path / "wo").exists()


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
