"""The export bundle on disk: export.json (the manifest), the token table, and the int8 sibling's names.

An export bundle is a directory with the model bundle's `clipcap.json` and tokenizer, one ONNX
file per graph of clipcap.formats.graph_specs, GPT-2's input embedding table and `export.json`,
the `ExportManifest`: which decoder kind it holds (`decoder_cache`, graph_specs.DECODER_KINDS), each
graph's file, inputs and outputs, and the parity the export measured. An int8 sibling is an export
bundle of the same kind whose manifest names `*.int8.onnx` graphs (precision `int8-dynamic`); a
weight-only sibling names `*.int8-wo.onnx` or `*.int4-wo.onnx` (MatMulNBits decoders of an in-place export),
an fp16 sibling `*.fp16.onnx` (fp16 weights and compute, fp32 inputs and outputs; for GPUs).
Each graph names the engine that runs it (`GraphEntry.engine`, a key of ENGINES): onnxruntime, or for an
encoder quantised by NNCF, OpenVINO (its IR, `encoder.openvino-int8.xml` + `.bin`, beside the onnxruntime decoder).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipcap.config import CONFIG_FILE, BundleError, ClipCapConfig, dataclass_from_dict
from clipcap.formats.graph_specs import DECODER_KINDS, ENCODER_ATTENTIONS, DecoderKind, graph_specs

MANIFEST_FILE = "export.json"
TOKEN_TABLE_FILE = "token_embeddings.safetensors"
TOKEN_TABLE_KEY = "wte"  # (vocab_size, n_embd): GPT-2's input embedding, indexed by the runtimes
EXPORT_FORMAT_VERSION = 1
INT8_PRECISION = "int8-dynamic"  # export.json's precision in an int8 sibling ("fp32" in an export bundle)
WEIGHT_ONLY_BITS = {"int8-wo": 8, "int4-wo": 4}  # weight-only siblings' precision -> bits per weight (MatMulNBits)
FP16_PRECISION = "fp16"  # export.json's precision in an fp16 sibling (GPU serving: onnxruntime's CUDA provider)
OPENVINO_INT8 = "openvino-int8"  # an encoder method: NNCF static int8, an OpenVINO IR run by the openvino engine
# A graph's engine -> the graphs it may run. Manifests before the field: every graph onnxruntime.
ENGINES = {"onnxruntime": ("encoder", "mapper", "decoder"), "openvino": ("encoder",)}


def int8_graph_file(file: str) -> str:
    """The int8 sibling's name for a graph file: decoder.onnx -> decoder.int8.onnx."""
    return file.replace(".onnx", ".int8.onnx")


def weight_only_graph_file(file: str, precision: str) -> str:
    """A weight-only sibling's name for a graph file: decoder.onnx -> decoder.int4-wo.onnx."""
    return file.replace(".onnx", f".{precision}.onnx")


def fp16_graph_file(file: str) -> str:
    """The fp16 sibling's name for a graph file: decoder.onnx -> decoder.fp16.onnx."""
    return file.replace(".onnx", ".fp16.onnx")


def openvino_graph_file(file: str) -> str:
    """The OpenVINO IR's name for a graph file: encoder.onnx -> encoder.openvino-int8.xml (weights: .bin beside it)."""
    return file.replace(".onnx", f".{OPENVINO_INT8}.xml")


def write_token_table(bundle, path: Path) -> None:
    """GPT-2's input embedding table of a `Bundle`; the runtimes index it for each next token (no graph call)."""
    from safetensors.torch import save_file

    table = bundle.model.gpt.transformer.wte.weight.detach().float().contiguous()
    save_file({TOKEN_TABLE_KEY: table}, str(path))


def load_token_table(path: Path) -> np.ndarray:
    """(vocab_size, n_embd) float32, a numpy array (torch-free: the core install reads it)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise BundleError(f"{path}: token embedding table not found")
    try:
        return load_file(str(path))[TOKEN_TABLE_KEY]
    except (SafetensorError, OSError, KeyError) as error:
        raise BundleError(f"{path}: not a token table written by the exporter ({error})") from None


@dataclass
class GraphEntry:
    """One graph of the bundle, as export.json records it."""

    file: str  # the ONNX file, inside the bundle
    inputs: list[str]  # input names, in the order of its GraphSpec
    outputs: list[str]  # output names, likewise
    export_seconds: float | None = None  # torch.onnx.export + checks; None: not recorded
    fused_operators: dict | None = None  # in-place decoder: onnxruntime's fusion counts (operator -> count)
    parity: dict | None = None  # max abs diff vs PyTorch per shape (export); None: not checked or quantised
    quantization: dict | None = None  # quantised siblings: the method and its settings
    engine: str = "onnxruntime"  # what runs `file`: a key of ENGINES (openvino: an IR, .xml + .bin)


@dataclass
class ExportManifest:
    """export.json: every key maps onto a field; unknown keys and wrong types are refused, naming the field."""

    decoder_cache: str  # the decoder's kind, a key of DECODER_KINDS (no default: every manifest says it)
    precision: str  # fp32 | int8-dynamic | int8-wo | int4-wo | fp16 (siblings)
    opset: int  # ONNX opset the graphs were exported at
    token_embeddings: str  # GPT-2's input embedding table, inside the bundle (TOKEN_TABLE_FILE)
    graphs: dict[str, GraphEntry]  # encoder | mapper | decoder -> its entry
    decoder_logits: str = "last_position"  # the decoder outputs the last position's logits only, (B, V)
    # the encoder's attention, a key of ENCODER_ATTENTIONS (manifests before the key: open_clip, the only one then)
    encoder_attention: str = "open_clip"
    exported_with: dict = field(default_factory=dict)  # library versions (torch, transformers, onnx, onnxruntime)
    decoding_parity: dict | None = None  # greedy and beam tokens vs PyTorch after export; None: not checked
    exported_from: str | None = None  # the model bundle's absolute path at export (to_tensorrt.py re-exports from it)
    quantized_from: str | None = None  # quantised siblings: the fp32 export bundle they were made from
    format_version: int = EXPORT_FORMAT_VERSION

    @property
    def decoder(self) -> DecoderKind:
        return DECODER_KINDS[self.decoder_cache]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data, where: str) -> "ExportManifest":
        if isinstance(data, dict) and data.get("format_version", EXPORT_FORMAT_VERSION) != EXPORT_FORMAT_VERSION:
            raise BundleError(f"{where}: unsupported export format version {data['format_version']!r} (this "
                              f"library reads version {EXPORT_FORMAT_VERSION})")
        if isinstance(data, dict) and "decoder_cache" not in data:
            raise BundleError(f"{where}: field 'decoder_cache' missing (the manifest predates decoder kinds); "
                              "re-export the bundle with python export/to_onnx.py MODEL_BUNDLE --out DIR")
        manifest = dataclass_from_dict(cls, data, where, prefix="")
        manifest.graphs = {name: dataclass_from_dict(GraphEntry, entry, where, prefix=f"graphs.{name}.")
                           for name, entry in manifest.graphs.items()}
        for name, entry in manifest.graphs.items():
            if name not in ENGINES.get(entry.engine, ()):
                raise BundleError(f"{where}: field 'graphs.{name}.engine' is {entry.engine!r}; this library runs "
                                  f"the {name} on {', '.join(e for e, graphs in ENGINES.items() if name in graphs)}")
        if manifest.decoder_cache not in DECODER_KINDS:
            raise BundleError(f"{where}: field 'decoder_cache' is {manifest.decoder_cache!r}; this library reads "
                              f"{', '.join(DECODER_KINDS)}")
        if manifest.encoder_attention not in ENCODER_ATTENTIONS:
            raise BundleError(f"{where}: field 'encoder_attention' is {manifest.encoder_attention!r}; this library "
                              f"reads {', '.join(ENCODER_ATTENTIONS)}")
        if manifest.decoder_logits != "last_position":
            raise BundleError(f"{where}: field 'decoder_logits' is {manifest.decoder_logits!r}; this library reads "
                              "'last_position' decoders (re-export the bundle)")
        return manifest


def write_manifest(out: Path, manifest: ExportManifest) -> None:
    (Path(out) / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def load_manifest(path: str | Path, config: ClipCapConfig) -> ExportManifest:
    """The export bundle's manifest, checked against `config` (every graph present, with the spec's names)."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        # The command suggested must be one to_onnx.py runs: its --out is never the model bundle itself.
        source = path if (path / CONFIG_FILE).is_file() else Path("MODEL_BUNDLE")
        raise BundleError(f"{path}: not an export bundle (no {MANIFEST_FILE}); make one with: "
                          f"python export/to_onnx.py {source} --out build/{source.name.lower()}-onnx")
    try:
        data = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{manifest_file}: not valid JSON ({error})") from None
    manifest = ExportManifest.from_dict(data, where=str(manifest_file))
    for name, spec in graph_specs(config, manifest.decoder).items():
        entry = manifest.graphs.get(name)
        if entry is None or not (path / entry.file).is_file():
            raise BundleError(f"{manifest_file}: graph {name!r} missing or its file is not in {path}")
        if entry.inputs != spec.input_names or entry.outputs != spec.output_names:
            raise BundleError(f"{manifest_file}: graph {name!r} inputs/outputs do not match {CONFIG_FILE} "
                              f"(exported from another model?)")
    return manifest
