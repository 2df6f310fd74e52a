"""Bundles for benchmarking: which kind a path holds, and the full-size model built with random weights."""
from __future__ import annotations

from pathlib import Path

import torch

from clipcap.config import BundleError, ClipCapConfig
from clipcap.formats.detect import KINDS, detect
from clipcap_bench.steps import run_steps


# How to make each kind (clipcap.formats.detect's own commands); a benchmark can also build its model bundle.
BUNDLE_HOW_TO = {kind.name: kind.how_to_build for kind in KINDS} | {"model": "--make-full-size DIR"}


def bundle_kind(path: Path) -> str | None:
    """model | onnx-fp32 | onnx-int8 | onnx-int8-wo | onnx-int4-wo | onnx-fp16 | tensorrt (clipcap.formats.detect's names);
    None if none fits."""
    try:
        return detect(path).name
    except BundleError:
        return None

# ---------------------------------------------------------------------------------------------
# The full-size model for speed work: nothing can be downloaded, so random weights.

FULL_SIZE_CAPTIONS = [
    "a dog runs on the grass.", "two cats sleep on a sofa.", "a man rides a bicycle down the street.",
    "a plate of food on a wooden table.", "a red bus parked next to a building.", "a bird sits on a branch.",
]


def make_full_size_bundles(out: Path, int8: bool = True, exports: bool = True, progress: bool = True) -> dict[str, Path]:
    """ViT-B-32 + GPT-2 small (random weights, a small BPE tokenizer) as a model bundle, its fp32
    ONNX export and (with `int8`) the quantised siblings: out/model, out/onnx, out/onnx-int8 (dynamic),
    out/onnx-int8-wo and out/onnx-int4-wo (weight-only, QuantizeConfig's default block and accuracy level),
    out/onnx-int8-encoder (dynamic int8 decoder and encoder: the encoder option export/README measures) and
    out/onnx-int4-wo-int8-encoder (that encoder beside the int4 weight-only decoder).
    `exports=False` builds the model bundle alone (a GPU run of the torch backend needs no ONNX).

    Steps whose output already exists are skipped, so a second call costs nothing. Random weights
    time exactly like trained ones: the same shapes do the same arithmetic. The whole build takes minutes
    and peaks at 5.5 GiB of memory; a progress bar names each step.
    """
    from clipcap.formats.model_bundle import save_bundle
    from clipcap.config import TokenizerConfig
    from clipcap.model import ClipCapModel, resolve_clip_config
    from clipcap.export.quantize import QuantizeConfig, quantize_bundle
    from clipcap.export.onnx import ExportOptions, export_bundle
    from clipcap.formats.export_bundle import MANIFEST_FILE
    from clipcap.tokenizer import train_bpe

    out = Path(out)
    paths, steps = {"model": out / "model"}, []

    def build_model() -> None:
        torch.manual_seed(0)
        tokenizer = train_bpe(FULL_SIZE_CAPTIONS * 4, vocab_size=300)
        tokens = TokenizerConfig(eos_token_id=tokenizer.eos_token_id, stop_token_ids=tokenizer.stop_token_ids())
        model = ClipCapModel(ClipCapConfig(clip=resolve_clip_config("ViT-B-32"), tokenizer=tokens).validate())
        save_bundle(model.eval(), tokenizer, paths["model"])

    if not (paths["model"] / "model.safetensors").is_file():
        steps.append(("model", build_model))
    if exports:
        paths["onnx-fp32"] = out / "onnx"
        if not (paths["onnx-fp32"] / MANIFEST_FILE).is_file():
            steps.append(("onnx", lambda: export_bundle(paths["model"], ExportOptions(out=paths["onnx-fp32"]))))
    if exports and int8:
        siblings = (("int8-dynamic", None, "onnx-int8"), ("int8-wo", None, "onnx-int8-wo"),
                    ("int4-wo", None, "onnx-int4-wo"), ("int8-dynamic", "int8-dynamic", "onnx-int8-encoder"),
                    ("int4-wo", "int8-dynamic", "onnx-int4-wo-int8-encoder"))
        for method, encoder_method, name in siblings:  # encoder_method None: the encoder stays fp32
            paths[name] = out / name
            config = QuantizeConfig(paths["onnx-fp32"], paths[name], encoder=encoder_method is not None,
                                    method=method, encoder_method=encoder_method)
            if not (paths[name] / MANIFEST_FILE).is_file():
                steps.append((name, lambda config=config: quantize_bundle(config)))
    run_steps(steps, "full-size bundles", progress)
    return paths


def source_digest(paths: list[Path], skip: tuple[str, ...] = ("__pycache__",)) -> str:
    """sha256 over the files under `paths` (sorted, names included), leaving out folders named in `skip`:
    a cache key for what they build."""
    import hashlib

    digest = hashlib.sha256()
    for root in paths:
        files = sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]
        for file in files:
            if file.is_file() and not set(skip) & set(file.relative_to(root).parts):
                digest.update(str(file.relative_to(root.parent)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def make_demo_exports(bundle: Path, out: Path, library: Path, progress: bool = True) -> dict[str, Path]:
    """`bundle`'s fp32 ONNX export and int8 sibling in out/onnx, out/onnx-int8, rebuilt only when the bundle
    or the library's code (`library`, the clipcap package) changed since they were built."""
    import shutil

    from clipcap.export.quantize import QuantizeConfig, quantize_bundle
    from clipcap.export.onnx import ExportOptions, export_bundle

    out = Path(out)
    key, stamp = source_digest([Path(bundle), Path(library)]), out / "source.sha256"
    paths = {"onnx-fp32": out / "onnx", "onnx-int8": out / "onnx-int8"}
    if not stamp.is_file() or stamp.read_text() != key:
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
        run_steps([("onnx", lambda: export_bundle(Path(bundle), ExportOptions(out=paths["onnx-fp32"]))),
                   ("onnx-int8", lambda: quantize_bundle(QuantizeConfig(paths["onnx-fp32"], paths["onnx-int8"])))],
                  "demo exports", progress)
        stamp.write_text(key)
    return paths
