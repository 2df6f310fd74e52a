"""Dynamic int8 quantisation of an export bundle for CPU serving.

`quantize_bundle` writes a *sibling* export bundle: the same files (hard-linked where possible) with
`decoder.int8.onnx` (and, on request, `encoder.int8.onnx`) named in its export.json. A sibling
bundle keeps the runtime and `Captioner.from_path` unchanged: int8 is just another directory to
serve. How far it moves the captions is measured by clipcap.training.agreement.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from clipcap.config import BundleError
from clipcap.formats.export_bundle import INT8_PRECISION, MANIFEST_FILE, int8_graph_file, write_manifest


@dataclass
class QuantizeConfig:
    export_dir: Path  # an fp32 export bundle (export/to_onnx.py)
    out: Path | None = None  # None: a sibling directory `<export_dir>-int8`
    encoder: bool = False  # also quantise the encoder (the CLIP ViT moves more than the decoder: measure first)
    per_channel: bool = False  # per-output-channel weight scales: slower to build, sometimes closer to fp32

    @property
    def out_dir(self) -> Path:
        return self.out or self.export_dir.with_name(self.export_dir.name + "-int8")


def quantize_bundle(config: QuantizeConfig) -> Path:
    """Write the int8 sibling bundle; returns its directory."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tqdm import tqdm

    source, out = Path(config.export_dir), config.out_dir
    manifest_file = source / MANIFEST_FILE
    if not manifest_file.is_file():
        raise BundleError(f"{source}: not an export bundle (no {MANIFEST_FILE}); run export/to_onnx.py first")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("precision") != "fp32":
        raise BundleError(f"{source}: precision is {manifest.get('precision')!r}; quantise an fp32 export bundle")
    if out.resolve() == source.resolve():
        raise BundleError(f"{out}: the int8 bundle must not overwrite its fp32 source")
    out.mkdir(parents=True, exist_ok=True)
    graphs = ["decoder"] + (["encoder"] if config.encoder else [])
    sources = [manifest["graphs"][name]["file"] for name in graphs]
    quantized_files = set(sources) | {f + ".data" for f in sources}  # .data: weights of graphs past 2 GiB
    for item in source.iterdir():
        if item.is_file() and item.name not in quantized_files | {MANIFEST_FILE}:
            _link_or_copy(item, out / item.name)
    for name in tqdm(graphs, desc="quantize", unit="graph"):
        entry = manifest["graphs"][name]
        target = int8_graph_file(entry["file"])
        # Weights int8 (signed, as VNNI/AVX-512 kernels want them); activations quantised per call.
        quantize_dynamic(source / entry["file"], out / target, weight_type=QuantType.QInt8,
                         per_channel=config.per_channel,
                         use_external_data_format=(source / (entry["file"] + ".data")).exists())
        entry.update(file=target, quantization={"method": "onnxruntime quantize_dynamic", "weights": "int8",
                                                "per_channel": config.per_channel})
        entry.pop("parity", None)  # fp32 parity bounds do not apply; compare_captions measures int8
    manifest.pop("decoding_parity", None)
    manifest.update(precision=INT8_PRECISION, quantized_from=str(source))
    write_manifest(out, manifest)
    return out


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)  # the encoder alone is ~480 MB at ViT-B-32: don't duplicate it
    except OSError:
        shutil.copyfile(source, target)
