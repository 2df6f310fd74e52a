"""TensorRT engines from an export bundle: optimisation profiles, timing cache, serialized engines.

`compute_profiles` is pure Python (tested everywhere); `build_engines` needs the `tensorrt` package
and a CUDA GPU. Precision comes from the graph, because TensorRT 11 networks are strongly typed
(no FP16 builder flag): `--fp16` first converts each fp32 ONNX graph to fp16 with onnxruntime's
converter (I/O kept fp32, LayerNorm kept fp32), and both TensorRT 10 and 11 build it strongly typed.

The decoder gets two profiles, one per kind of call the decoding loop makes: "prefix" (past 0, the
prefix or a whole no-cache sequence) and "token" (one new token after a past of P..P+max_tokens-2).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from clipcap.config import CONFIG_FILE, BundleError, ClipCapConfig
from clipcap.formats.graph_specs import BATCH, ENCODER_ATTENTIONS, PAST, SEQUENCE, TOTAL, GraphSpec, graph_specs
from clipcap.formats.tensorrt_profiles import PROFILES_FILE, TENSORRT_DECODER, TRT_FORMAT_VERSION, Profile
from clipcap.runtimes.tensorrt_runtime import import_tensorrt

TIMING_CACHE_FILE = "timing.cache"
FP16_KEPT_FP32 = ["LayerNormalization"]  # fp16 LayerNorm over 768 channels overflows; TensorRT warns the same


@dataclass
class TensorRTBuildConfig:
    export_dir: Path  # an fp32 export bundle (export/to_onnx.py)
    out: Path  # engines + profiles.json + the bundle's config, tokenizer and token table
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


def convert_graph_fp16(source: Path, target: Path) -> None:
    """fp32 ONNX -> fp16 ONNX with fp32 inputs/outputs (casts inside), LayerNorm kept fp32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True,
                                     op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEPT_FP32)
    graph = OnnxModel(model)
    graph.topological_sort()  # the converter appends its input casts after their users
    onnx.save(graph.model, str(target))
    onnx.checker.check_model(str(target))


def build_engines(config: TensorRTBuildConfig) -> dict:
    """Build and serialize one engine per graph; returns what profiles.json records."""
    from tqdm import tqdm

    from clipcap.export.onnx import ExportError
    from clipcap.formats.export_bundle import load_manifest
    from clipcap.formats.model_bundle import load_config

    source, out = Path(config.export_dir), Path(config.out)
    bundle_config = load_config(source)
    manifest = load_manifest(source, bundle_config)
    if not manifest.decoder.portable:  # TensorRT has no onnxruntime contrib ops
        raise BundleError(f"{source}: its decoder uses onnxruntime's in-place attention; for TensorRT export with "
                          f"python export/to_onnx.py MODEL_BUNDLE --out DIR --decoder-cache concat")
    if not ENCODER_ATTENTIONS[manifest.encoder_attention].portable:
        raise BundleError(f"{source}: its encoder uses onnxruntime's fused attention; for TensorRT export with "
                          f"python export/to_onnx.py MODEL_BUNDLE --out DIR --decoder-cache concat --encoder-attention open_clip")
    if manifest.precision != "fp32":
        raise BundleError(f"{source}: build TensorRT engines from an fp32 export bundle, not {manifest.precision!r}")
    trt = import_tensorrt()  # after the bundle's own checks: a wrong bundle is refused on any machine
    _require_cuda()
    profiles = compute_profiles(bundle_config, config.max_batch, config.max_tokens, config.max_beam, config.opt_batch)
    out.mkdir(parents=True, exist_ok=True)
    cache_file = config.timing_cache or out / TIMING_CACHE_FILE
    cache_bytes = cache_file.read_bytes() if cache_file.is_file() else b""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    engines = {}
    for name in tqdm(profiles, desc="tensorrt", unit="engine"):
        onnx_file = source / manifest.graphs[name].file
        if config.fp16:
            converted = out / f"{name}.fp16.onnx"
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
    record = {"format_version": TRT_FORMAT_VERSION, "tensorrt": trt.__version__,
              "precision": "fp16" if config.fp16 else "fp32", "max_batch": config.max_batch,
              "max_tokens": config.max_tokens or bundle_config.max_tokens, "max_beam": config.max_beam,
              "token_embeddings": manifest.token_embeddings, "timing_cache": str(cache_file), "engines": engines}
    (out / PROFILES_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _require_cuda() -> None:
    import torch

    from clipcap.runtimes import RuntimeUnavailable

    if not torch.cuda.is_available():
        raise RuntimeUnavailable("TensorRT needs a CUDA GPU, and torch sees none on this machine")
