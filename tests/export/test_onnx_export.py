"""ONNX export: specs, graphs (onnx.checker, dynamic axes), parity with PyTorch, the export bundle."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from clipcap.config import BundleError
from clipcap.export.onnx import DecoderStepGraph, ExportError, check_decoding_parity, graph_max_diff, open_session
from clipcap.formats.export_bundle import MANIFEST_FILE, TOKEN_TABLE_FILE, load_manifest, load_token_table
from clipcap.formats.graph_specs import BATCH, DECODER_KINDS, PAST, SEQUENCE, decoder_spec, graph_specs, kv_names
from clipcap.formats.model_bundle import load_bundle, load_config
from clipcap.runtimes.onnx_runtime import OnnxRuntime
from conftest import max_diff

ROOT = Path(__file__).resolve().parents[2]


def test_decoder_spec_follows_optimum_names(tiny_bundle):
    config = load_config(tiny_bundle)
    spec = decoder_spec(config)
    past, present = kv_names(spec)
    layers = config.gpt2.n_layer
    assert spec.input_names[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert past == [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert present == [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    axes = spec.dynamic_axes()
    assert axes["past_key_values.0.key"] == {0: "batch_size", 2: "past_sequence_length"}
    assert axes["present.1.value"] == {0: "batch_size", 2: "total_sequence_length"}
    assert axes["logits"] == {0: "batch_size"}  # last position only


def test_example_inputs_follow_sizes(tiny_bundle):
    spec = decoder_spec(load_config(tiny_bundle))
    inputs = spec.example_inputs({BATCH: 3, SEQUENCE: 2, PAST: 4})
    assert inputs["inputs_embeds"].shape == (3, 2, 64)
    assert inputs["attention_mask"].shape == (3, 6) and bool((inputs["attention_mask"] == 1).all())
    assert inputs["position_ids"].tolist() == [[4, 5]] * 3
    assert inputs["past_key_values.1.value"].shape == (3, 1, 4, 64)
    assert spec.example_inputs({BATCH: 1, SEQUENCE: 4, PAST: 0})["past_key_values.0.key"].shape == (1, 1, 0, 64)


@pytest.mark.parametrize("kind", DECODER_KINDS.values(), ids=DECODER_KINDS)
def test_every_decoder_kind_is_complete(tiny_bundle, kind):
    """Each registry entry names what the exporter, the parity check and the runtime need, and they load."""
    config = load_config(tiny_bundle)
    spec = kind.spec(config)
    assert spec.name == "decoder" and spec.outputs[0].name == "logits"
    module = kind.export_module_class()(load_bundle(tiny_bundle).model)
    assert isinstance(module.translations, dict) and callable(module.optimize)
    assert all(callable(getattr(kind.cache_class(), method)) for method in ("new", "step", "select"))
    sizes = kind.parity_sizes
    # The prefix step (past 0), batch 1 and a one-token step are each among the shapes checked.
    assert any(s[PAST] == 0 for s in sizes) and any(s[BATCH] == 1 for s in sizes) and any(s[SEQUENCE] == 1 for s in sizes)


@pytest.mark.parametrize("kind", ["in-place", "concat"])
def test_export_bundle_contents(tiny_export, tiny_concat_export, tiny_bundle, kind):
    tiny_export = tiny_export if kind == "in-place" else tiny_concat_export
    manifest = json.loads((tiny_export / MANIFEST_FILE).read_text())
    config = load_config(tiny_export)
    assert config == load_config(tiny_bundle)
    assert manifest["precision"] == "fp32" and manifest["decoder_logits"] == "last_position"
    assert manifest["decoder_cache"] == kind
    parity = manifest["decoding_parity"]
    assert parity["max_tokens"] == config.max_tokens and parity["images"] >= 3
    assert parity["greedy"]["identical"] is True and parity["beam"]["identical"] is True
    for name, spec in graph_specs(config, DECODER_KINDS[kind]).items():
        entry = manifest["graphs"][name]
        assert entry["parity"]["max_abs_diff"] <= spec.atol
        onnx.checker.check_model(str(tiny_export / entry["file"]), full_check=True)
    assert any("past_sequence_length=0" in case for case in manifest["graphs"]["decoder"]["parity"]["cases"])
    table = load_token_table(tiny_export / TOKEN_TABLE_FILE)
    assert torch.equal(torch.from_numpy(table), load_bundle(tiny_bundle).model.gpt.transformer.wte.weight)
    assert load_manifest(tiny_export, config).graphs.keys() == {"encoder", "mapper", "decoder"}


def test_decoding_parity_fails_on_a_token_difference(tiny_export, tiny_bundle):
    """The export's end-to-end check compares tokens, not just graph outputs: a model that no longer
    matches its graphs fails it."""
    bundle = load_bundle(tiny_bundle)
    runtime = OnnxRuntime.from_path(tiny_export)
    assert check_decoding_parity(bundle, runtime, 3)["beam"]["identical"]
    weight = bundle.model.gpt.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():
        weight.add_(2.0 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ExportError, match="tokens differ between PyTorch"):
        check_decoding_parity(bundle, runtime, 3)


class _SwappedTokens:
    """A runtime that decodes exactly like `inner` with token ids `a` and `b` exchanged: the same lengths and
    stops, different tokens. What a parity check that compares lengths only would wave through."""

    def __init__(self, inner, a: int, b: int):
        self.inner, self.device, self.swap = inner, inner.device, (a, b)

    def _swapped(self, ids):
        a, b = self.swap
        return np.where(ids == a, b, np.where(ids == b, a, ids))  # onnxruntime's arrays: numpy on the CPU

    def encode(self, pixels):
        return self.inner.encode(pixels)

    def new_cache(self, batch_size):
        return self.inner.new_cache(batch_size)

    def embed(self, token_ids):
        return self.inner.embed(self._swapped(token_ids))

    def step(self, embeds, cache):
        logits, cache = self.inner.step(embeds, cache)
        a, b = self.swap
        order = np.arange(logits.shape[-1])
        order[a], order[b] = b, a
        return logits[:, order], cache

    def select(self, cache, index):
        return self.inner.select(cache, index)


def test_decoding_parity_compares_tokens_not_lengths(tiny_export, tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    runtime = OnnxRuntime.from_path(tiny_export)
    report = check_decoding_parity(bundle, runtime, 3)
    stops = set(bundle.config.tokenizer.stop_token_ids)
    from clipcap.decoding import DecodingOptions, generate

    prefix = runtime.encode(torch.randn(3, 3, bundle.config.clip.image_size, bundle.config.clip.image_size,
                                        generator=torch.Generator().manual_seed(0)))
    used = [t for ids in generate(runtime, prefix, DecodingOptions(), list(stops), report["max_tokens"]) for t in ids]
    a = next(t for t in used if t not in stops)
    b = next(t for t in range(bundle.config.gpt2.vocab_size) if t not in stops and t != a)
    with pytest.raises(ExportError, match="greedy tokens differ"):
        check_decoding_parity(bundle, _SwappedTokens(runtime, a, b), 3)


def test_graph_parity_fails_on_a_difference_at_one_shape_only(tiny_export, tiny_bundle):
    """The bound applies to the worst shape: a graph off by twice the bound at batch 3 alone fails the check."""
    from clipcap.export.onnx import MapperGraph, check_graph_parity
    from clipcap.formats.graph_specs import PARITY_SIZES, mapper_spec

    model = load_bundle(tiny_bundle).model
    spec = mapper_spec(model.config)
    assert check_graph_parity(MapperGraph(model).eval(), spec, tiny_export / spec.file, PARITY_SIZES)["max_abs_diff"] \
        <= spec.atol

    class OffAtBatchThree(MapperGraph):  # twice the bound off, at one shape: the bound itself must hold
        def forward(self, clip_embeddings):
            out = super().forward(clip_embeddings)
            return out + 2 * spec.atol if clip_embeddings.shape[0] == 3 else out

    assert any(sizes[BATCH] == 3 for sizes in PARITY_SIZES) and any(sizes[BATCH] != 3 for sizes in PARITY_SIZES)
    with pytest.raises(ExportError, match="exceeds the bound"):
        check_graph_parity(OffAtBatchThree(model).eval(), spec, tiny_export / spec.file, PARITY_SIZES)


def test_graph_axes_stay_symbolic(tiny_concat_export):
    """Exported with batch 2, seq 3, past 5: none of these may be baked into the graph."""
    tiny_export = tiny_concat_export
    decoder = onnx.load(str(tiny_export / "decoder.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.graph.input}
    assert dims["inputs_embeds"][:2] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.0.key"][0] == "batch_size" and dims["past_key_values.0.key"][2] == "past_sequence_length"
    encoder = onnx.load(str(tiny_export / "encoder.onnx"), load_external_data=False)
    assert encoder.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch_size"


@pytest.mark.parametrize("sizes", [
    {BATCH: 1, SEQUENCE: 4, PAST: 0},  # the prefix step
    {BATCH: 8, SEQUENCE: 1, PAST: 4},  # a token step at batch 8
    {BATCH: 5, SEQUENCE: 27, PAST: 0},  # a whole no-cache sequence
    {BATCH: 2, SEQUENCE: 1, PAST: 40},  # a long past
])
def test_decoder_parity_at_shapes_not_traced(tiny_concat_export, tiny_bundle, sizes):
    model = load_bundle(tiny_bundle).model
    spec = decoder_spec(model.config)
    session = open_session(tiny_concat_export / spec.file)
    assert graph_max_diff(DecoderStepGraph(model).eval(), spec, session, sizes) <= spec.atol


def test_to_onnx_script_transformer_mapper(tiny_transformer_bundle, tmp_path):
    """The script end to end, on the transformer mapper with L2-normalised prefixes."""
    out = tmp_path / "onnx"
    result = subprocess.run([sys.executable, str(ROOT / "export" / "to_onnx.py"), str(tiny_transformer_bundle),
                             "--out", str(out), "--threads", "1"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "greedy and beam tokens identical to PyTorch" in result.stdout
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    specs = graph_specs(load_config(out), DECODER_KINDS[manifest["decoder_cache"]])
    assert all(manifest["graphs"][n]["parity"]["max_abs_diff"] <= specs[n].atol for n in specs)


def test_manifest_errors_are_clear(tiny_export, tiny_bundle, tmp_path):
    config = load_config(tiny_export)
    with pytest.raises(BundleError, match="not an export bundle .*to_onnx.py"):
        load_manifest(tiny_bundle, config)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_export, broken)
    manifest = json.loads((tiny_export / MANIFEST_FILE).read_text())
    manifest["graphs"]["decoder"]["file"] = "gone.onnx"
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="graph 'decoder' missing"):
        load_manifest(broken, config)
    (broken / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(broken, config)
    other = config.__class__.from_dict({**config.to_dict(), "gpt2": {**config.to_dict()["gpt2"], "n_layer": 3}})
    with pytest.raises(BundleError, match="do not match"):
        load_manifest(tiny_export, other)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(surprise=1), r"unknown field\(s\) surprise"),
    (lambda m: m["graphs"]["decoder"].update(surprise=1), r"unknown field\(s\) graphs\.decoder\.surprise"),
    (lambda m: m.update(opset="18"), r"field 'opset' must be int"),
    (lambda m: m["graphs"]["encoder"].update(file=3), r"field 'graphs\.encoder\.file' must be str"),
    (lambda m: m["graphs"]["mapper"].pop("inputs"), r"missing field\(s\) graphs\.mapper\.inputs"),
    (lambda m: m.pop("decoder_cache"), r"field 'decoder_cache' missing .*re-export"),
    (lambda m: m.update(decoder_cache="ring"), r"field 'decoder_cache' is 'ring'; this library reads in-place, concat"),
    (lambda m: m.update(format_version=2), r"unsupported export format version 2"),
    (lambda m: m.update(decoder_logits="all_positions"), r"field 'decoder_logits' is 'all_positions'.*re-export"),
    (lambda m: m.update(encoder_attention="flash"), r"field 'encoder_attention' is 'flash'; this library reads"),
    (lambda m: m.update(graphs=[]), r"field 'graphs' must be dict"),
    (lambda m: m["graphs"]["decoder"].update(engine="openvino"),
     r"field 'graphs\.decoder\.engine' is 'openvino'; this library runs the decoder on onnxruntime$"),
    (lambda m: m["graphs"]["encoder"].update(engine="tvm"),
     r"field 'graphs\.encoder\.engine' is 'tvm'; this library runs the encoder on onnxruntime, openvino$"),
])
def test_manifest_fields_are_checked(tiny_export, tmp_path, change, message):
    """export.json is parsed once into ExportManifest: a bad key or type names the field; no kind is guessed."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_export, broken)
    manifest = json.loads((tiny_export / MANIFEST_FILE).read_text())
    change(manifest)
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_manifest(broken, load_config(broken))


def test_manifest_round_trips(tiny_export):
    manifest = load_manifest(tiny_export, load_config(tiny_export))
    assert manifest.to_dict() == json.loads((tiny_export / MANIFEST_FILE).read_text())
    assert manifest.decoder is DECODER_KINDS["in-place"] and manifest.graphs["decoder"].fused_operators


@pytest.mark.slow
def test_full_size_graph_parity(full_size_export):
    """ViT-B-32 + GPT-2 small: the bounds the specs state hold, past 0 and batch 8 included."""
    manifest = json.loads((full_size_export / MANIFEST_FILE).read_text())
    specs = graph_specs(load_config(full_size_export), DECODER_KINDS[manifest["decoder_cache"]])
    for name, spec in specs.items():
        parity = manifest["graphs"][name]["parity"]
        assert parity["max_abs_diff"] <= spec.atol, (name, parity)
    assert manifest["decoding_parity"]["greedy"]["identical"] and manifest["decoding_parity"]["beam"]["identical"]
    decoder = onnx.load(str(full_size_export / "decoder.onnx"), load_external_data=False)
    assert len(decoder.graph.input) == 2 + 2 * 12 and len(decoder.graph.output) == 1 + 2 * 12  # in-place: no mask


@pytest.mark.slow
def test_fused_encoder_attention(tiny_bundle, tiny_export, tmp_path):
    """--encoder-attention fused: one onnxruntime Attention per ViT block, no softmax left, outputs and
    greedy/beam tokens within the export's parity (checked by the export itself), same embeddings as the
    open_clip graph; TensorRT's graphs are re-exported from the model bundle with the portable attention."""
    from clipcap.export.tensorrt import concat_graphs

    result = subprocess.run([sys.executable, str(ROOT / "export" / "to_onnx.py"), str(tiny_bundle), "--out",
                             str(tmp_path / "fused"), "--encoder-attention", "fused", "--decoder-cache", "concat",
                             "--parity-images", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(tmp_path / "fused", load_config(tiny_bundle))
    layers = load_config(tiny_bundle).clip.model_config["vision_cfg"]["layers"]
    assert manifest.encoder_attention == "fused" and manifest.graphs["encoder"].fused_operators["Attention"] == layers
    ops = [node.op_type for node in onnx.load(str(tmp_path / "fused" / "encoder.onnx")).graph.node]
    assert ops.count("Attention") == layers and "Softmax" not in ops
    assert manifest.decoding_parity["greedy"]["identical"] and manifest.decoding_parity["beam"]["identical"]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    fused, plain = OnnxRuntime.from_path(tmp_path / "fused"), OnnxRuntime.from_path(tiny_export)
    assert max_diff(fused.encode_image(pixels), plain.encode_image(pixels)) <= 2e-4  # both within 1e-4 of torch
    assert load_manifest(tiny_export, load_config(tiny_bundle)).encoder_attention == "open_clip"
    graphs, model = concat_graphs(tmp_path / "fused", tmp_path / "work")  # TensorRT's graphs: re-exported portable
    assert graphs != tmp_path / "fused" and model == tiny_bundle.resolve()
    assert load_manifest(graphs, load_config(tiny_bundle)).encoder_attention == "open_clip"


def test_the_export_suggested_for_a_model_bundle_is_one_to_onnx_runs(tiny_bundle, tmp_path, monkeypatch):
    """quantize.py (or --backend onnxruntime) given a model bundle suggests a to_onnx.py command; that command,
    as printed, exports (it once suggested --out into the model bundle, which to_onnx.py refuses)."""
    import shlex

    from clipcap.export.onnx import ExportOptions, export_bundle

    with pytest.raises(BundleError, match="not an export bundle") as error:
        load_manifest(tiny_bundle, load_config(tiny_bundle))
    command = shlex.split(str(error.value).split("make one with: ", 1)[1])
    assert command[:2] == ["python", "export/to_onnx.py"] and command[2] == str(tiny_bundle) and command[3] == "--out"
    monkeypatch.chdir(tmp_path)
    export_bundle(command[2], ExportOptions(out=command[4], check_parity=False))
    assert (tmp_path / command[4] / "export.json").is_file()


def test_an_export_bundle_where_a_model_bundle_is_needed_says_so(tiny_export):
    from clipcap.formats.model_bundle import load_bundle

    with pytest.raises(BundleError, match=r"an export bundle \(export.json.*a model bundle .* is needed"):
        load_bundle(tiny_export)
