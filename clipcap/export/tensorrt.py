"""TensorRT engines from a model bundle or an fp32 export: concat graphs, profiles, engines, parity.

`build_engines` takes whatever bundle the user has: the graphs TensorRT parses are the portable
decoder kind (`TENSORRT_DECODER`, concat), so a model bundle, or an export whose decoder is the
in-place kind, is first exported to concat ONNX in a work directory (`concat_graphs`) from the model
bundle (the export's `exported_from`, or `model`). After building it runs the ONNX export's parity
(`check_decoding_parity`: greedy and beam tokens vs PyTorch on 4 images; token-exact for fp32,
captions agreeing counted for fp16) and records it in profiles.json.

`compute_profiles` and `concat_graphs` are pure Python and ONNX (tested everywhere); the build
needs the `tensorrt` package and a CUDA GPU. Precision comes from the graph, because TensorRT 11 networks are strongly typed
(no FP16 builder flag): `--fp16` first converts each fp32 ONNX graph to fp16 with onnxruntime's
converter (clipcap.export.fp16: I/O kept fp32, LayerNorm kept fp32), and both TensorRT 10 and 11 build it strongly typed.

The decoder gets two profiles, one per kind of call the decoding loop makes: "prefix" (past 0, the
prefix or a whole no-cache sequence) and "token" (one new token after a past of P..P+max_tokens-2).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clipcap.config import CONFIG_FILE, BundleError, ClipCapConfig
from clipcap.export.fp16 import convert_graph_fp16
from clipcap.export.onnx import ExportError, ExportOptions, check_decoding_parity, export_bundle
from clipcap.formats.detect import detect
from clipcap.formats.export_bundle import load_manifest
from clipcap.formats.graph_specs import BATCH, ENCODER_ATTENTIONS, PAST, SEQUENCE, TOTAL, GraphSpec, graph_specs
from clipcap.formats.model_bundle import load_bundle, load_config
from clipcap.formats.tensorrt_profiles import PROFILES_FILE, TENSORRT_DECODER, TRT_FORMAT_VERSION, Profile
from clipcap.runtimes.tensorrt_runtime import TensorRTRuntime, import_tensorrt

TIMING_CACHE_FILE = "timing.cache"


@dataclass
class TensorRTBuildConfig:
    source: Path  # a model bundle, or an fp32 export bundle of either decoder kind (export/to_onnx.py)
    out: Path  # engines + profiles.json + the bundle's config, tokenizer and token table
    model: Path | None = None  # the PyTorch reference (and, for an in-place export, the concat graphs' source);
    #                            None: `source` itself if a model bundle, else the export's `exported_from`
    check_parity: bool = True  # decode 4 images greedy and beam with the engines and with PyTorch, record it
    parity_images: int = 4  # images of that check (the ONNX export's count)
    fp16: bool = False  # build from fp16 graphs (converted here); fp32 otherwise (TF32 off)
    max_batch: int = 8  # images per call
    max_tokens: int | None = None  # longest caption; None: the bundle's max_tokens
    max_beam: int = 5  # beam search runs max_batch * max_beam decoder rows
    opt_batch: int | None = None  # the batch kernels are tuned for; None: max_batch
    workspace_gib: float = 4.0  # builder scratch memory limit
    timing_cache: Path | None = None  # None: out/timing.cache; reused across builds and graphs


def compute_profiles(config: ClipCapConfig, max_batch: int, max_tokens: int | None = None, max_beam: int = 5,
                     opt_batch: int | None = None) -> dict[str, list[Profile]]:
    """min/opt/max shapes of every input of every graph, for the decoding loop's calls up to these limits."""
    max_tokens = config.max_tokens if max_tokens is None else max_tokens
    opt_batch = max_batch if opt_batch is None else opt_batch
    prefix = config.mapper.prefix_length
    limit = config.token_limit
    if not 1 <= max_batch:
        raise BundleError(f"max_batch must be >= 1, got {max_batch}")
    if not 1 <= opt_batch <= max_batch:
        raise BundleError(f"opt_batch must be in 1..max_batch ({max_batch}), got {opt_batch}")
    if not 1 <= max_tokens <= limit:
        raise BundleError(f"max_tokens must be in 1..{limit} (gpt2.n_positions - prefix_length), got {max_tokens}")
    if not 1 <= max_beam:
        raise BundleError(f"max_beam must be >= 1, got {max_beam}")
    specs = graph_specs(config, TENSORRT_DECODER)
    rows = max_batch * max_beam  # beam search expands each image to beam rows after the prefix step
    longest = prefix + max_tokens - 1  # the last step attends over the prefix and all but the last token

    def profile(name: str, spec: GraphSpec, ranges: dict[str, tuple[int, int, int]]) -> Profile:
        """Symbolic ranges -> per-input shapes (TOTAL follows PAST + SEQUENCE)."""
        low, opt, high = ({dim: r[i] for dim, r in ranges.items()} for i in range(3))
        return Profile(name, {t.name: (spec.shape(t, low), spec.shape(t, opt), spec.shape(t, high))
                              for t in spec.inputs})

    batch_only = {BATCH: (1, opt_batch, max_batch)}
    decoder = specs["decoder"]
    return {
        "encoder": [profile("all", specs["encoder"], batch_only)],
        "mapper": [profile("all", specs["mapper"], batch_only)],
        "decoder": [
            # Past 0: the prefix (T = P), or a whole sequence when decoding without the cache.
            profile("prefix", decoder, {BATCH: (1, opt_batch, rows), SEQUENCE: (prefix, prefix, longest),
                                        PAST: (0, 0, 0), TOTAL: (prefix, prefix, longest)}),
            # One token after the cache; opt at the middle of a caption.
            profile("token", decoder, {BATCH: (1, opt_batch, rows), SEQUENCE: (1, 1, 1),
                                       PAST: (prefix, prefix + max(0, max_tokens - 2) // 2, max(prefix, longest - 1)),
                                       TOTAL: (prefix + 1, prefix + 1 + max(0, max_tokens - 2) // 2,
                                               max(prefix, longest - 1) + 1)}),
        ],
    }


def network_flags(trt) -> int:
    """Strongly typed networks: implicit in TensorRT 11, a creation flag in TensorRT 10."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def concat_graphs(source: Path, work: Path, model: Path | None = None) -> tuple[Path, Path | None]:
    """(an fp32 export bundle whose decoder TensorRT can parse, the model bundle behind it or None).

    A concat fp32 export is used as it is; a model bundle, or an in-place export (through `model`, else
    its `exported_from`), is exported to `work` with the concat decoder, its parity checked.
    """
    kind = detect(source)
    if kind.name == "model":
        model = source
    elif kind.name == "onnx-fp32":
        manifest = load_manifest(source, load_config(source))
        recorded = Path(manifest.exported_from) if manifest.exported_from else None
        model = model or (recorded if recorded is not None and _is_model_bundle(recorded) else None)
        if manifest.decoder.portable and ENCODER_ATTENTIONS[manifest.encoder_attention].portable:
            return source, model
        if model is None:
            raise BundleError(f"{source}: its decoder is the {manifest.decoder_cache} kind and its encoder attention "
                              f"{manifest.encoder_attention} (onnxruntime contrib ops where not portable, "
                              f"which TensorRT cannot parse) and the model bundle it was exported from "
                              f"({manifest.exported_from or 'not recorded'}) is not there to re-export the "
                              f"{TENSORRT_DECODER.name} graphs: pass --model MODEL_BUNDLE")
    else:
        raise BundleError(f"{source}: a {kind.name} bundle; build TensorRT engines from a model bundle or an fp32 "
                          f"export bundle (python export/to_onnx.py)")
    graphs = Path(work) / "onnx"
    export_bundle(model, ExportOptions(out=graphs, decoder_cache=TENSORRT_DECODER.name))
    return graphs, model


def _is_model_bundle(path: Path) -> bool:
    try:
        return detect(path).name == "model"
    except BundleError:
        return False


def build_engines(config: TensorRTBuildConfig) -> dict:
    """Build and serialize one engine per graph, then check decoding parity; returns what profiles.json records."""
    trt = import_tensorrt()  # first: before any export work, say what to install
    _require_cuda()
    source, out = Path(config.source), Path(config.out)
    if config.model is not None and not _is_model_bundle(Path(config.model)):
        raise BundleError(f"--model {config.model}: not a model bundle")
    if config.check_parity and not 1 <= config.parity_images <= config.max_batch:
        raise BundleError(f"parity_images must be in 1..max_batch ({config.max_batch}), got {config.parity_images}")
    # Checked before any export work; every bundle kind carries the model's clipcap.json.
    profiles = compute_profiles(load_config(source), config.max_batch, config.max_tokens, config.max_beam,
                                config.opt_batch)
    # The concat and fp16 graphs go to a work directory: `out` is untouched until the engines are built.
    with tempfile.TemporaryDirectory(prefix="clipcap-tensorrt-") as work:
        graphs, model = concat_graphs(source, Path(work), config.model)
        if config.check_parity and model is None:
            raise BundleError(f"{source}: the model bundle it was exported from is not recorded or gone; the parity "
                              "check needs it as the PyTorch reference: pass --model MODEL_BUNDLE (or --no-parity)")
        out.mkdir(parents=True, exist_ok=True)
        record = {**_build(trt, config, profiles, graphs, Path(work)), "built_from": str(source)}
    _write_record(out, record)
    if config.check_parity:
        runtime = TensorRTRuntime.from_path(out)
        # Within what the engines were built for: their longest caption, their largest beam (up to 5, the paper's).
        record["decoding_parity"] = check_decoding_parity(load_bundle(model), runtime, config.parity_images,
                                                          exact=not config.fp16, max_tokens=record["max_tokens"],
                                                          beam_size=min(5, config.max_beam))
        _write_record(out, record)
    return record


def _write_record(out: Path, record: dict) -> None:
    (out / PROFILES_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _build(trt, config: TensorRTBuildConfig, profiles: dict[str, list[Profile]], source: Path, work: Path) -> dict:
    """The engines of the concat fp32 export at `source`, into config.out; `work`: fp16 graphs."""
    from tqdm import tqdm

    out = Path(config.out)
    bundle_config = load_config(source)
    manifest = load_manifest(source, bundle_config)
    if manifest.precision != "fp32":
        raise BundleError(f"{source}: build TensorRT engines from an fp32 export bundle, not {manifest.precision!r}")
    cache_file = config.timing_cache or out / TIMING_CACHE_FILE
    cache_bytes = cache_file.read_bytes() if cache_file.is_file() else b""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    engines = {}
    for name in tqdm(profiles, desc="tensorrt", unit="engine"):
        onnx_file = source / manifest.graphs[name].file
        if config.fp16:
            converted = work / f"{name}.fp16.onnx"
            convert_graph_fp16(onnx_file, converted)
            onnx_file = converted
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"{onnx_file}: TensorRT's ONNX parser failed: {errors}")
        build_config = builder.create_builder_config()
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * 2**30))
        if not config.fp16:
            build_config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: token-exact with PyTorch
        timing_cache = build_config.create_timing_cache(cache_bytes)
        build_config.set_timing_cache(timing_cache, ignore_mismatch=False)
        for profile in profiles[name]:
            trt_profile = builder.create_optimization_profile()
            for input_name, (low, opt, high) in profile.shapes.items():
                trt_profile.set_shape(input_name, low, opt, high)
            build_config.add_optimization_profile(trt_profile)
        serialized = builder.build_serialized_network(network, build_config)
        if serialized is None:
            raise ExportError(f"{onnx_file}: TensorRT could not build an engine (see the log above)")
        (out / f"{name}.engine").write_bytes(bytes(serialized))
        cache_bytes = bytes(timing_cache.serialize())  # the next graph starts from everything timed so far
        engines[name] = {"file": f"{name}.engine", "onnx": onnx_file.name,
                         "profiles": [p.to_dict() for p in profiles[name]]}
    cache_file.write_bytes(cache_bytes)
    for item in (CONFIG_FILE, bundle_config.tokenizer.file, manifest.token_embeddings):
        shutil.copyfile(source / item, out / item)
    return {"format_version": TRT_FORMAT_VERSION, "tensorrt": trt.__version__, "decoder_cache": TENSORRT_DECODER.name,
            "precision": "fp16" if config.fp16 else "fp32", "max_batch": config.max_batch,
            "max_tokens": config.max_tokens or bundle_config.max_tokens, "max_beam": config.max_beam,
            "token_embeddings": manifest.token_embeddings, "timing_cache": str(cache_file), "engines": engines}


def _require_cuda() -> None:
    import torch

    from clipcap.runtimes import RuntimeUnavailable

    if not torch.cuda.is_available():
        raise RuntimeUnavailable("TensorRT needs a CUDA GPU, and torch sees none on this machine")
