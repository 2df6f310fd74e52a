"""Model bundle -> export bundle: encoder.onnx, mapper.onnx, decoder.onnx, token table, export.json.

Each graph is exported with torch.onnx's dynamo exporter (torch.export underneath) from a small
wrapper module whose inputs and outputs are exactly the spec's (clipcap.formats.graph_specs), then checked
with `onnx.checker` and run in onnxruntime against the PyTorch module at several shapes, past
length 0 included. The decoder is exported from its kind's module (graph_specs.DECODER_KINDS):
`DecoderStepGraph` here rebuilds transformers' DynamicCache from flat past tensors, so GPT-2's own
attention code is what gets exported (the concat kind, which TensorRT builds from); the default,
in-place kind is clipcap.export.inplace_decoder's (onnxruntime's fused attention writing a
preallocated cache in place, MatMul linears). A decoder module has `translations` (custom ops the
exporter cannot translate itself) and `optimize` (rewrites after export).
"""
from __future__ import annotations

import inspect
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipcap.config import CONFIG_FILE, BundleError
from clipcap.formats.export_bundle import (TOKEN_TABLE_FILE, ExportManifest, GraphEntry, write_manifest,
                                           write_token_table)
from clipcap.formats.graph_specs import CAPACITY, DECODER_KINDS, ENCODER_ATTENTIONS, PARITY_SIZES, PAST, SEQUENCE, GraphSpec, graph_specs
from clipcap.formats.model_bundle import Bundle, load_bundle

TWO_GIB = 2**31  # protobuf's limit: bigger graphs keep their weights in a `.onnx.data` file


class ExportError(RuntimeError):
    """An export failed a check (onnx.checker, parity); the message names the graph and the numbers."""


@dataclass
class ExportOptions:
    out: Path  # the export bundle directory (created)
    check_parity: bool = True  # run each graph in onnxruntime against PyTorch and record the diffs
    parity_images: int = 4  # images decoded greedy and beam to max_tokens, torch vs onnxruntime, after export
    # the decoder kind to build, a key of DECODER_KINDS: in-place (onnxruntime's fused step, the fastest
    # on CPU) or concat (GPT-2's own attention, portable: TensorRT builds from it); export.json records it
    decoder_cache: str = "in-place"
    # the encoder's attention, a key of ENCODER_ATTENTIONS: open_clip (as torch exports it, portable) or fused
    # (onnxruntime's Attention op); docs/decisions/encoder-attention-unfused.md measures why open_clip
    encoder_attention: str = "open_clip"


# ---------------------------------------------------------------------------------------------
# The exported modules: inputs and outputs exactly as the specs declare them.


class EncoderGraph(nn.Module):
    """`visual`: the CLIP tower to export (default the model's own; clipcap.export.vit_attention's fusable copy)."""

    def __init__(self, model, visual: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.visual = model.clip if visual is None else visual

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clip_embeds = self.visual(pixel_values)  # (B, 3, H, W) -> (B, D)
        return self.model.prefix(clip_embeds), clip_embeds  # (B, P, E), (B, D)


class MapperGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        return self.model.prefix(clip_embeddings)  # (B, D) -> (B, P, E)


class DecoderStepGraph(nn.Module):
    """One GPT-2 step: flat past tensors in, last-position logits and flat presents out (the concat kind)."""

    translations: dict = {}  # GPT-2's own attention: every op has a standard ONNX translation

    def __init__(self, model):
        super().__init__()
        self.gpt = model.gpt

    def forward(self, inputs_embeds, attention_mask, position_ids, *past_key_values):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.gpt.config)
        for layer in range(len(past_key_values) // 2):  # (B, H, past, D) each; past may be 0
            cache.update(past_key_values[2 * layer], past_key_values[2 * layer + 1], layer)
        out = self.gpt.transformer(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=cache, use_cache=True)
        logits = self.gpt.lm_head(out.last_hidden_state[:, -1])  # (B, V): see decoder_spec
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (logits, *presents)

    def optimize(self, path: Path, external_data: bool) -> None:
        """Nothing: the portable graph stays as exported (TensorRT fuses on its own)."""


GRAPH_MODULES = {"encoder": EncoderGraph, "mapper": MapperGraph}  # the decoder's module comes with its kind


# ---------------------------------------------------------------------------------------------
# Export, checks and parity.


def export_bundle(bundle_path: str | Path, options: ExportOptions) -> ExportManifest:
    """Write the export bundle for the model bundle at `bundle_path`; returns the manifest."""
    from tqdm import tqdm

    bundle = load_bundle(bundle_path)
    out = Path(options.out)
    if out.resolve() == Path(bundle_path).resolve():
        raise BundleError(f"{out}: write the export bundle to its own directory, not into the model bundle")
    if options.decoder_cache not in DECODER_KINDS:
        raise BundleError(f"decoder_cache must be one of {', '.join(DECODER_KINDS)}, got {options.decoder_cache!r}")
    decoder = DECODER_KINDS[options.decoder_cache]
    if options.encoder_attention not in ENCODER_ATTENTIONS:
        raise BundleError(f"encoder_attention must be one of {', '.join(ENCODER_ATTENTIONS)}, "
                          f"got {options.encoder_attention!r}")
    out.mkdir(parents=True, exist_ok=True)
    specs = graph_specs(bundle.config, decoder)
    manifest = ExportManifest(decoder_cache=decoder.name, precision="fp32", opset=specs["decoder"].opset,
                              token_embeddings=TOKEN_TABLE_FILE, graphs={}, exported_with=_versions(),
                              exported_from=str(Path(bundle_path).resolve()),
                              encoder_attention=options.encoder_attention)
    for name, spec in (progress := tqdm(specs.items(), desc="export", unit="graph")):
        progress.set_postfix_str(name)
        fused = None
        start = time.perf_counter()
        if name == "decoder":
            module = decoder.export_module_class()(bundle.model).eval()
            export_graph(module, spec, out / spec.file, module.translations)
            fused = module.optimize(out / spec.file, _needs_external_data(module))
        elif name == "encoder" and options.encoder_attention == "fused":
            module = EncoderGraph(bundle.model).eval()  # the parity reference: open_clip's own attention
            fused = export_fused_encoder(bundle, spec, out / spec.file)
        else:
            module = GRAPH_MODULES[name](bundle.model).eval()
            export_graph(module, spec, out / spec.file)
        entry = GraphEntry(spec.file, spec.input_names, spec.output_names,
                           export_seconds=round(time.perf_counter() - start, 1), fused_operators=fused)
        if options.check_parity:
            sizes = decoder.parity_sizes if name == "decoder" else PARITY_SIZES
            entry.parity = check_graph_parity(module, spec, out / spec.file, sizes)
        manifest.graphs[name] = entry
    write_token_table(bundle, out / TOKEN_TABLE_FILE)
    shutil.copyfile(Path(bundle_path) / CONFIG_FILE, out / CONFIG_FILE)
    shutil.copyfile(Path(bundle_path) / bundle.config.tokenizer.file, out / bundle.config.tokenizer.file)
    write_manifest(out, manifest)
    if options.check_parity:
        from clipcap.runtimes.onnx_runtime import OnnxRuntime

        manifest.decoding_parity = check_decoding_parity(bundle, OnnxRuntime.from_path(out), options.parity_images)
        write_manifest(out, manifest)
    return manifest


def export_fused_encoder(bundle: Bundle, spec: GraphSpec, path: Path) -> dict:
    """The encoder with onnxruntime's Attention op in every ViT block, then its ViT optimiser; returns the
    fusion counts."""
    from clipcap.export.vit_attention import TRANSLATIONS, fusable_visual, optimize_vit

    visual, replaced = fusable_visual(bundle.model.clip)
    if not replaced:
        raise BundleError(f"encoder_attention 'fused': the {bundle.config.clip.model_name} tower has no "
                          f"nn.MultiheadAttention blocks to fuse; export it with encoder_attention 'open_clip'")
    module = EncoderGraph(bundle.model, visual).eval()
    export_graph(module, spec, path, TRANSLATIONS)
    return optimize_vit(path, visual.transformer.width, visual.transformer.resblocks[0].attn.num_heads,
                        _needs_external_data(module))


def export_graph(module: nn.Module, spec: GraphSpec, path: Path, translations: dict | None = None) -> None:
    """torch.onnx.export (dynamo) with the spec's names and dynamic axes, then onnx.checker.

    `translations`: torch custom op -> onnxscript function, for ops the exporter cannot translate itself.
    """
    import onnx

    examples = spec.example_inputs()
    external = _needs_external_data(module)
    with torch.no_grad(), warnings.catch_warnings():
        # Our Dims carry the spec's names already; the exporter warns when it sees them twice.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(
            module, tuple(examples.values()), dynamo=True, opset_version=spec.opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(module, spec), custom_translation_table=translations or None,
            external_data=external, verbose=False,
        )
    program.save(str(path), external_data=external)
    onnx.checker.check_model(str(path), full_check=True)  # by path: works past 2 GiB too


def _needs_external_data(module: nn.Module) -> bool:
    return sum(p.numel() * p.element_size() for p in module.parameters()) > TWO_GIB * 0.9


def _dynamic_shapes(module: nn.Module, spec: GraphSpec) -> tuple:
    """The spec's symbolic axes as torch.export Dims, shaped like `module.forward`'s parameters.

    One Dim object per symbolic name, so equal names are one dimension (batch everywhere, past in
    every cache tensor); a `*args` parameter takes the remaining inputs as one tuple.
    """
    from torch.export import Dim

    dims: dict[str, Dim] = {}

    declared = spec.dynamic_axes()

    def axes(tensor):
        return {axis: dims.setdefault(name, Dim(name)) for axis, name in declared[tensor.name].items()}

    shapes, position = [], 0
    for parameter in inspect.signature(module.forward).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            shapes.append(tuple(axes(t) for t in spec.inputs[position:]))
            position = len(spec.inputs)
        else:
            shapes.append(axes(spec.inputs[position]))
            position += 1
    return tuple(shapes)


def open_session(path: Path):
    """An onnxruntime CPU session with every graph optimisation on (default thread count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the exporter's graphs trigger harmless warnings
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def graph_max_diff(module: nn.Module, spec: GraphSpec, session, sizes: dict[str, int]) -> float:
    inputs = spec.example_inputs(sizes, seed=1)
    expected = module(*inputs.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = session.run(spec.output_names, {name: t.numpy() for name, t in inputs.items()})
    diffs = []
    total = sizes.get(PAST, 0) + sizes.get(SEQUENCE, 0)
    for tensor_spec, want, got in zip(spec.outputs, expected, actual):
        name = tensor_spec.name
        if CAPACITY in tensor_spec.shape:  # an in-place cache: positions past the total hold no value yet
            want, got = want[:, :, :total], got[:, :, :total]
        if tuple(want.shape) != got.shape:
            raise ExportError(f"{spec.file}: output {name} has shape {got.shape}, PyTorch {tuple(want.shape)} "
                              f"(sizes {sizes})")
        diffs.append(float((want - torch.from_numpy(got)).abs().max()) if want.numel() else 0.0)
    return max(diffs)


def check_graph_parity(module: nn.Module, spec: GraphSpec, path: Path, parity_sizes: tuple[dict[str, int], ...]) -> dict:
    """Max abs diff vs PyTorch at each of `parity_sizes` (the dims a graph lacks are ignored)."""
    session = open_session(path)
    cases = {}
    for sizes in parity_sizes:
        used = {dim: size for dim, size in sizes.items()
                if any(dim in t.shape for t in spec.inputs) or (dim == PAST and CAPACITY in sizes)}
        key = ",".join(f"{dim}={size}" for dim, size in used.items())
        if key not in cases:
            cases[key] = graph_max_diff(module, spec, session, used)
    worst = max(cases.values())
    if worst > spec.atol:
        raise ExportError(f"{spec.file}: max abs diff vs PyTorch {worst:.3g} exceeds the bound {spec.atol:g} "
                          f"(per shape: {cases})")
    return {"max_abs_diff": worst, "atol": spec.atol, "cases": cases}


def check_decoding_parity(bundle: Bundle, runtime, images: int, exact: bool = True, max_tokens: int | None = None,
                          beam_size: int = 5) -> dict:
    """Greedy and beam tokens from `runtime` (an exported bundle's) vs the PyTorch runtime on its device:
    `images` random-pixel images in one batch, each decoded to `max_tokens` (None: the bundle's) or its
    stop token; beam search with `beam_size` (5, the paper's).

    `exact` (fp32 graphs): any token difference fails the export. Otherwise (fp16 engines, where a
    near-tie may flip) the number of identical captions is recorded and nothing fails.
    """
    from clipcap.decoding import DecodingOptions, generate
    from clipcap.runtimes.torch_runtime import TorchRuntime

    clip, max_tokens = bundle.config.clip, max_tokens or bundle.config.max_tokens
    pixels = torch.randn(images, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(0))
    stops = bundle.config.tokenizer.stop_token_ids
    reference = TorchRuntime(bundle.model, str(runtime.device))  # PyTorch on the same device: CPU, or the engines' GPU
    reference_prefix, prefix = reference.encode(pixels), runtime.encode(pixels.to(runtime.device))
    beam = DecodingOptions(strategy="beam", max_tokens=max_tokens, beam_size=beam_size)
    report = {"images": images, "max_tokens": max_tokens, "beam_size": beam.beam_size}
    for options in (DecodingOptions(max_tokens=max_tokens), beam):
        expected = generate(reference, reference_prefix, options, stops, max_tokens)
        got = generate(runtime, prefix, options, stops, max_tokens)
        same = sum(a == b for a, b in zip(expected, got))
        if exact and same < images:
            raise ExportError(f"{options.strategy} tokens differ between PyTorch {expected} and "
                              f"{type(runtime).__name__} {got}")
        report[options.strategy] = {"identical": same == images, "captions_identical": same,
                                    "tokens_compared": sum(map(len, expected))}
    return report


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}

