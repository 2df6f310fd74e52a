"""Quantisation of an export bundle for CPU serving: dynamic int8, weight-only int8/int4.

`quantize_bundle` writes a *sibling* export bundle: the same files (hard-linked where possible) with
`decoder.int8.onnx` (and, on request, `encoder.int8.onnx`) named in its export.json; weight-only
methods write `decoder.int8-wo.onnx` / `decoder.int4-wo.onnx` (onnxruntime's MatMulNBits: weights in
blocks along the input axis, one fp32 scale per block; activations never share a scale across rows,
so a caption does not depend on its batch mates as it can under dynamic int8). A sibling
bundle keeps the runtime and `Captioner.from_path` unchanged: int8 is just another directory to
serve. `fp16` (clipcap.export.fp16) converts the same graphs to fp16 for onnxruntime's CUDA provider.
How far it moves the captions is measured by clipcap.training.agreement.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from clipcap.config import BundleError
from clipcap.export.fp16 import convert_graph_fp16
from clipcap.formats.export_bundle import (FP16_PRECISION, INT8_PRECISION, MANIFEST_FILE, WEIGHT_ONLY_BITS,
                                           fp16_graph_file, int8_graph_file, load_manifest, weight_only_graph_file,
                                           write_manifest)
from clipcap.formats.model_bundle import load_config

METHODS = (INT8_PRECISION, *WEIGHT_ONLY_BITS, FP16_PRECISION)  # the sibling's precision, as export.json names it
# Dynamic int8 leaves the ViT's patch embedding fp32: onnxruntime's ConvInteger ran it ~3x slower than the
# fp32 Conv on an AVX2 CPU (docs/decisions/int8-encoder-patch-conv-fp32.md), a few % of the whole encoder.
ENCODER_KEPT_FP32 = ("Conv",)


@dataclass
class QuantizeConfig:
    export_dir: Path  # an fp32 export bundle (export/to_onnx.py)
    out: Path | None = None  # None: a sibling directory `<export_dir>-int8`
    encoder: bool = False  # also quantise the encoder (the CLIP ViT moves more than the decoder: measure first)
    per_channel: bool = False  # dynamic int8: per-output-channel weight scales: slower to build, sometimes closer
    method: str = INT8_PRECISION  # int8-dynamic | int8-wo | int4-wo (weight-only: in-place MatMuls) | fp16 (GPUs)
    block_size: int = 128  # weight-only: weights per scale (docs/decisions/quantize-default-method.md, measured at 128)
    accuracy_level: int = 4  # weight-only: 4 = int8 activations per block inside the kernel (0: fp32, ~3x slower here)
    encoder_method: str | None = None  # with `encoder`: the encoder's own method (e.g. int8-dynamic beside an
    #                                    int4-wo decoder); None: `method`

    def graph_method(self, graph: str) -> str:
        """The method `graph` ("encoder" | "decoder") is quantised with."""
        return self.encoder_method or self.method if graph == "encoder" else self.method

    @property
    def out_dir(self) -> Path:
        suffix = "-int8" if self.method == INT8_PRECISION else f"-{self.method}"
        return self.out or self.export_dir.with_name(self.export_dir.name + suffix)


def quantize_bundle(config: QuantizeConfig) -> Path:
    """Write the quantised sibling bundle; returns its directory."""
    from tqdm import tqdm

    source, out = Path(config.export_dir), config.out_dir
    manifest = load_manifest(source, load_config(source))
    if manifest.precision != "fp32":
        raise BundleError(f"{source}: precision is {manifest.precision!r}; quantise an fp32 export bundle")
    for method in (config.method, config.encoder_method or config.method):
        if method not in METHODS:
            raise BundleError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if config.encoder_method and not config.encoder:
        raise BundleError("an encoder method was given without quantising the encoder (encoder=True, --encoder)")
    if config.method in WEIGHT_ONLY_BITS and not manifest.decoder.matmul_linears:
        raise BundleError(f"{source}: weight-only quantisation needs the in-place decoder (MatMul linears); "
                          f"re-export with python export/to_onnx.py MODEL_BUNDLE --out DIR")
    if out.resolve() == source.resolve():
        raise BundleError(f"{out}: the quantised bundle must not overwrite its fp32 source")
    out.mkdir(parents=True, exist_ok=True)
    graphs = ["decoder"] + (["encoder"] if config.encoder else [])
    sources = [manifest.graphs[name].file for name in graphs]
    quantized_files = set(sources) | {f + ".data" for f in sources}  # .data: weights of graphs past 2 GiB
    for item in source.iterdir():
        if item.is_file() and item.name not in quantized_files | {MANIFEST_FILE}:
            _link_or_copy(item, out / item.name)
    for name in tqdm(graphs, desc="quantize", unit="graph"):
        entry = manifest.graphs[name]
        external, method = (source / (entry.file + ".data")).exists(), config.graph_method(name)
        if method == FP16_PRECISION:
            target = fp16_graph_file(entry.file)
            entry.quantization = convert_graph_fp16(source / entry.file, out / target, external)
        elif method in WEIGHT_ONLY_BITS:
            target = weight_only_graph_file(entry.file, method)
            entry.quantization = quantize_weight_only(source / entry.file, out / target, config, external, method)
        else:
            target = int8_graph_file(entry.file)
            kept_fp32 = ENCODER_KEPT_FP32 if name == "encoder" else ()
            _quantize_dynamic(source / entry.file, out / target, config, external, kept_fp32)
            entry.quantization = {"method": "onnxruntime quantize_dynamic", "weights": "int8",
                                  "per_channel": config.per_channel, "kept_fp32": list(kept_fp32)}
        entry.file = target
        entry.parity = None  # fp32 parity bounds do not apply; clipcap.training.agreement measures these
    manifest.decoding_parity = None
    manifest.precision, manifest.quantized_from = config.method, str(source)
    write_manifest(out, manifest)
    return out


def _quantize_dynamic(source: Path, target: Path, config: QuantizeConfig, external: bool,
                      kept_fp32: tuple[str, ...] = ()) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    # Weights int8 (signed, as VNNI/AVX-512 kernels want them); activations quantised per call.
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=config.per_channel,
                     op_types_to_quantize=[op for op in IntegerOpsRegistry if op not in kept_fp32],
                     use_external_data_format=external)


def quantize_weight_only(source: Path, target: Path, config: QuantizeConfig, external: bool = False,
                         method: str | None = None) -> dict:
    """One ONNX graph: every MatMul with a constant weight (all linears and the LM head) -> MatMulNBits
    (`method`, default config.method), symmetric blocks of `config.block_size` weights along the input axis,
    one fp32 scale each."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    bits = WEIGHT_ONLY_BITS[method or config.method]
    algorithm = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=True,
                                             accuracy_level=config.accuracy_level, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=algorithm)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
    quantized = sum(node.op_type == "MatMulNBits" for node in quantizer.model.model.graph.node)
    return {"method": "onnxruntime MatMulNBits (weight-only)", "weights": f"int{bits}", "block_size": config.block_size,
            "accuracy_level": config.accuracy_level, "symmetric": True, "matmuls_quantized": quantized}


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)  # the encoder alone is ~480 MB at ViT-B-32: don't duplicate it
    except OSError:
        shutil.copyfile(source, target)
