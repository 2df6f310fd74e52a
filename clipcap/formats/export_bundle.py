"""The export bundle on disk: export.json (the manifest), the token table, and the int8 sibling's names.

An export bundle is a directory with the model bundle's `clipcap.json` and tokenizer, one ONNX
file per graph of clipcap.formats.graph_specs, GPT-2's input embedding table and `export.json`,
which names each graph's file, inputs and outputs. An int8 sibling is an export bundle of the
same kind whose manifest names `*.int8.onnx` graphs (precision `int8-dynamic`); a weight-only sibling
names `*.int8-wo.onnx` or `*.int4-wo.onnx` (MatMulNBits decoders of an in-place export). An export
bundle's `decoder_cache` says which decoder graph it holds (graph_specs: in-place or concat).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from clipcap.config import CONFIG_FILE, BundleError, ClipCapConfig
from clipcap.formats.graph_specs import DECODER_CACHES, graph_specs

MANIFEST_FILE = "export.json"
TOKEN_TABLE_FILE = "token_embeddings.safetensors"
TOKEN_TABLE_KEY = "wte"  # (vocab_size, n_embd): GPT-2's input embedding, indexed by the runtimes
EXPORT_FORMAT_VERSION = 1
INT8_PRECISION = "int8-dynamic"  # export.json's precision in an int8 sibling ("fp32" in an export bundle)
WEIGHT_ONLY_BITS = {"int8-wo": 8, "int4-wo": 4}  # weight-only siblings' precision -> bits per weight (MatMulNBits)


def int8_graph_file(file: str) -> str:
    """The int8 sibling's name for a graph file: decoder.onnx -> decoder.int8.onnx."""
    return file.replace(".onnx", ".int8.onnx")


def weight_only_graph_file(file: str, precision: str) -> str:
    """A weight-only sibling's name for a graph file: decoder.onnx -> decoder.int4-wo.onnx."""
    return file.replace(".onnx", f".{precision}.onnx")


def write_token_table(bundle, path: Path) -> None:
    """GPT-2's input embedding table of a `Bundle`; the runtimes index it for each next token (no graph call)."""
    from safetensors.torch import save_file

    table = bundle.model.gpt.transformer.wte.weight.detach().float().contiguous()
    save_file({TOKEN_TABLE_KEY: table}, str(path))


def load_token_table(path: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise BundleError(f"{path}: token embedding table not found")
    try:
        return load_file(str(path))[TOKEN_TABLE_KEY]
    except (SafetensorError, OSError, KeyError) as error:
        raise BundleError(f"{path}: not a token table written by the exporter ({error})") from None


def write_manifest(out: Path, manifest: dict) -> None:
    (Path(out) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def load_manifest(path: str | Path, config: ClipCapConfig) -> dict:
    """The export bundle's manifest, checked against `config` (every graph file present)."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise BundleError(f"{path}: not an export bundle (no {MANIFEST_FILE}); "
                          f"make one with: python export/to_onnx.py MODEL_BUNDLE --out {path}")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{manifest_file}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != EXPORT_FORMAT_VERSION:
        raise BundleError(f"{manifest_file}: unsupported export format (this library reads version "
                          f"{EXPORT_FORMAT_VERSION})")
    graphs = manifest.get("graphs", {})
    decoder_cache = manifest.get("decoder_cache", "concat")  # bundles written before in-place caches: concat
    if decoder_cache not in DECODER_CACHES:
        raise BundleError(f"{manifest_file}: unknown decoder_cache {decoder_cache!r} (this library reads "
                          f"{', '.join(DECODER_CACHES)})")
    for name, spec in graph_specs(config, decoder_cache).items():
        entry = graphs.get(name)
        if not isinstance(entry, dict) or not (path / str(entry.get("file", ""))).is_file():
            raise BundleError(f"{manifest_file}: graph {name!r} missing or its file is not in {path}")
        if entry.get("inputs") != spec.input_names or entry.get("outputs") != spec.output_names:
            raise BundleError(f"{manifest_file}: graph {name!r} inputs/outputs do not match {CONFIG_FILE} "
                              f"(exported from another model?)")
    return manifest
