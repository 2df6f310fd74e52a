"""What `export/to_tensorrt.py BUNDLE` does before TensorRT is needed, and what its parser would be given.

`concat_graphs` turns whatever bundle the user has into the concat fp32 export TensorRT builds
from; every node of those graphs (and of their fp16 conversions, what `--fp16` parses) must be an
operator, with inputs and attributes in a form, that ONNX-TensorRT supports: its published list
is stored in tests/export/data/onnx_tensorrt_operators.json (source and release inside), for the
TensorRT versions pyproject's [tensorrt] extra names.
"""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from clipcap.config import BundleError
from clipcap.export.onnx import GRAPH_MODULES, export_graph
from clipcap.export.fp16 import convert_graph_fp16
from clipcap.export.tensorrt import concat_graphs
from clipcap.formats.export_bundle import MANIFEST_FILE, load_manifest
from clipcap.formats.graph_specs import encoder_spec
from clipcap.formats.model_bundle import load_bundle, load_config
from clipcap.formats.tensorrt_profiles import TENSORRT_DECODER

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = json.loads((Path(__file__).parent / "data" / "onnx_tensorrt_operators.json").read_text())


def unsupported_nodes(path: Path) -> list[str]:
    """Every node of the graph at `path` that ONNX-TensorRT's list does not accept, with the reason."""
    model = onnx.load(str(path))
    del model.graph.value_info[:]  # the fp16 converter leaves stale types there: infer them afresh
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    problems = []
    low, high = SUPPORT["opset_range"]
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not low <= opset.version <= high:
            problems.append(f"opset {opset.version} outside {low}..{high}")
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    constants = {t.name for t in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    consumed = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    allowed_types = {name: {getattr(onnx.TensorProto, SUPPORT["onnx_types"][t]) for t in entry["types"]}
                     for name, entry in SUPPORT["supported"].items()}
    for node in graph.node:
        where = f"{node.op_type} {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {node.domain!r} (TensorRT parses standard ONNX operators only)")
            continue
        if node.op_type not in SUPPORT["supported"]:
            problems.append(f"{where}: not supported")
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            problems.append(f"{where}: has a subgraph (not checked here)")
        if node.input and node.input[0]:
            elem = types.get(node.input[0])
            if elem not in allowed_types[node.op_type]:
                name = onnx.TensorProto.DataType.Name(elem) if elem else "unknown"
                problems.append(f"{where}: input type {name} not among {SUPPORT['supported'][node.op_type]['types']}")
        check = SUPPORT["checks"].get(node.op_type, {})
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for index, what in check.get("constant_inputs", {}).items():
            index = int(index)
            if index < len(node.input) and node.input[index] and node.input[index] not in constants:
                problems.append(f"{where}: input {what} must be an initializer or a Constant")
        if "used_outputs" in check and any(out in consumed for out in node.output[check["used_outputs"]:] if out):
            problems.append(f"{where}: uses outputs past the first {check['used_outputs']}")
        for name in check.get("attributes_all_ones", []):
            if any(v != 1 for v in attributes.get(name, [])):
                problems.append(f"{where}: {name} must be all ones")
        for name, value in check.get("attribute_values", {}).items():
            if name in attributes and attributes[name] != value:
                problems.append(f"{where}: {name} must be {value}")
        for name in check.get("forbidden_attributes", []):
            if name in attributes:
                problems.append(f"{where}: attribute {name} unsupported")
    return problems


@pytest.fixture(scope="module")
def graphs_from_model(tiny_bundle, tmp_path_factory):
    return concat_graphs(tiny_bundle, tmp_path_factory.mktemp("trt-work"))


def test_a_model_bundle_is_exported_to_concat_graphs(graphs_from_model, tiny_bundle):
    graphs, model = graphs_from_model
    manifest = load_manifest(graphs, load_config(graphs))
    assert model == tiny_bundle and manifest.decoder is TENSORRT_DECODER and manifest.precision == "fp32"
    assert manifest.decoding_parity["greedy"]["identical"] and manifest.decoding_parity["beam"]["identical"]


def test_a_concat_export_is_used_as_it_is(tiny_concat_export, tiny_bundle, tmp_path):
    assert concat_graphs(tiny_concat_export, tmp_path) == (tiny_concat_export, tiny_bundle)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_an_in_place_export_is_re_exported_from_its_model(tiny_export, tiny_bundle, tmp_path):
    assert load_manifest(tiny_export, load_config(tiny_export)).decoder_cache == "in-place"
    graphs, model = concat_graphs(tiny_export, tmp_path)
    assert model == Path(tiny_bundle).resolve() and graphs.parent == tmp_path
    assert load_manifest(graphs, load_config(graphs)).decoder is TENSORRT_DECODER


def test_sources_it_cannot_use_are_refused(tiny_export, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_export, moved)
    manifest = json.loads((moved / MANIFEST_FILE).read_text())
    (moved / MANIFEST_FILE).write_text(json.dumps({**manifest, "exported_from": str(tmp_path / "gone")}))
    with pytest.raises(BundleError, match="in-place kind .* pass --model MODEL_BUNDLE"):
        concat_graphs(moved, tmp_path / "work")
    for item in moved.glob("decoder.onnx"):
        shutil.copyfile(item, moved / "decoder.int8.onnx")  # now it looks like an int8 sibling
    with pytest.raises(BundleError, match="a onnx-int8 bundle; build TensorRT engines from a model bundle"):
        concat_graphs(moved, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_every_graph_tensorrt_parses_uses_supported_operators(graphs_from_model, tiny_transformer_bundle, tmp_path):
    """fp32 and fp16 (--fp16) graphs of the MLP-mapper bundle, and the transformer mapper's encoder."""
    graphs, _ = graphs_from_model
    files = [graphs / name for name in ("encoder.onnx", "mapper.onnx", "decoder.onnx")]
    for file in list(files):
        converted = tmp_path / file.name.replace(".onnx", ".fp16.onnx")
        convert_graph_fp16(file, converted)
        files.append(converted)
    model = load_bundle(tiny_transformer_bundle).model
    export_graph(GRAPH_MODULES["encoder"](model).eval(), encoder_spec(model.config), tmp_path / "transformer.onnx")
    files.append(tmp_path / "transformer.onnx")
    problems = {file.name: unsupported_nodes(file) for file in files}
    assert all(not found for found in problems.values()), problems


def test_the_check_refuses_the_in_place_decoder(tiny_export):
    """The same check on onnxruntime's fused decoder: its contrib operators are what TensorRT cannot parse."""
    problems = unsupported_nodes(tiny_export / "decoder.onnx")
    assert any("GroupQueryAttention" in p and "com.microsoft" in p for p in problems)
    assert any("SkipLayerNormalization" in p for p in problems)


def test_the_stored_list_names_its_source():
    assert SUPPORT["source"].startswith("https://github.com/onnx/onnx-tensorrt/blob/")
    assert "10.1" in SUPPORT["release"] and SUPPORT["opset_range"] == [9, 20]
    assert {"MatMul", "Softmax", "LayerNormalization", "Gather"} <= set(SUPPORT["supported"])
    extra = (ROOT / "pyproject.toml").read_text()
    assert 'tensorrt = ["clipcap-deploy[torch]", "tensorrt>=10.1,<11"]' in extra


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="tensorrt is installed here: the missing-package message cannot show")
@pytest.mark.parametrize("source", ["tiny_bundle", "tiny_export"])
def test_script_says_install_tensorrt_before_any_work(request, source, tmp_path):
    """Up to where TensorRT is needed: from a model bundle or an in-place export, the command says what
    to install (exit 2) before exporting anything, and writes nothing."""
    out = tmp_path / "trt"
    result = subprocess.run([sys.executable, str(ROOT / "export" / "to_tensorrt.py"),
                             str(request.getfixturevalue(source)), "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "error: the tensorrt Python package is not installed: pip install tensorrt" \
        in result.stderr
    assert not out.exists()


def test_print_profiles_from_a_model_bundle(tiny_bundle):
    result = subprocess.run([sys.executable, str(ROOT / "export" / "to_tensorrt.py"), str(tiny_bundle),
                             "--print-profiles", "--max-batch", "2", "--max-tokens", "5"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(len(line.split()) >= 9 and " min [" in line and " opt [" in line and " max [" in line
                         for line in lines)
