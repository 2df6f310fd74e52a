"""Every exported graph declared once: names, symbolic shapes, example inputs, opset, parity tolerance.

The ONNX exporter, the parity checks, the onnxruntime and TensorRT runtimes and the TensorRT
profile builder all read these specs, so a name or an axis is written in exactly one place.
Decoder names follow Hugging Face Optimum: `past_key_values.{i}.key/value` in, `present.{i}.key/value` out.
The decoder comes in two kinds (`DECODER_KINDS`: in-place, concat); an export bundle's manifest names its own.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from clipcap.config import ClipCapConfig

if TYPE_CHECKING:
    import torch

OPSET = 18  # what torch.onnx's dynamo exporter targets natively; TensorRT 10/11 and onnxruntime read it

# Symbolic dimension names. The total is derived (past + new), never chosen independently.
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"
CAPACITY = "cache_capacity"  # in-place decoder: positions each cache buffer holds (>= past + new)

# Example sizes for tracing: none is 0 or 1, so the exporter cannot specialise a dynamic axis to it.
EXAMPLE_SIZES = {BATCH: 2, SEQUENCE: 3, PAST: 5, CAPACITY: 11}
# Sizes the parity check runs: batch 1, the prefix step (past 0), a token step (T=1), odd batches.
# Encoder and mapper take the batches of these; each decoder kind has its own (DecoderKind.parity_sizes).
PARITY_SIZES = (
    {BATCH: 2, SEQUENCE: 3, PAST: 5},
    {BATCH: 1, SEQUENCE: 4, PAST: 0},
    {BATCH: 3, SEQUENCE: 1, PAST: 7},
    {BATCH: 8, SEQUENCE: 1, PAST: 1},
)
# The in-place decoder's: onnxruntime's attention takes several new positions after a past only at
# batch 1 (the runtime steps one position at a time otherwise); capacity is left over in some cases.
INPLACE_PARITY_SIZES = (
    {BATCH: 1, SEQUENCE: 4, PAST: 0, CAPACITY: 4},
    {BATCH: 2, SEQUENCE: 3, PAST: 0, CAPACITY: 9},
    {BATCH: 1, SEQUENCE: 3, PAST: 5, CAPACITY: 12},
    {BATCH: 3, SEQUENCE: 1, PAST: 7, CAPACITY: 8},
    {BATCH: 8, SEQUENCE: 1, PAST: 1, CAPACITY: 20},
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # ints are fixed sizes, strings symbolic (dynamic) dimensions
    dtype: str = "float32"  # the element type's name in numpy and torch alike (float32, float16, int64)
    fill: str = "normal"  # example contents: normal (random) | ones (attention mask) | positions


@dataclass(frozen=True)
class GraphSpec:
    name: str  # encoder | mapper | decoder; the file is `{name}.onnx`
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float  # fp32 parity bound: max |onnx - torch| over every output element (see each spec)
    opset: int = OPSET

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs + self.outputs if t.name == name)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """name -> {axis: symbolic name}, for inputs and outputs (the torch.onnx / Optimum form)."""
        return {t.name: {axis: dim for axis, dim in enumerate(t.shape) if isinstance(dim, str)}
                for t in self.inputs + self.outputs}

    def shape(self, tensor: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape of `tensor` for symbolic `sizes` (TOTAL = PAST + SEQUENCE when not given)."""
        sizes = resolve_sizes(sizes)
        return tuple(sizes[dim] if isinstance(dim, str) else dim for dim in tensor.shape)

    def example_inputs(self, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        import torch  # export and its parity checks only: the runtimes read the specs without torch

        sizes = resolve_sizes(sizes or EXAMPLE_SIZES)
        generator = torch.Generator().manual_seed(seed)
        examples = {}
        for tensor in self.inputs:
            shape = self.shape(tensor, sizes)
            if tensor.fill == "ones":
                examples[tensor.name] = torch.ones(shape, dtype=getattr(torch, tensor.dtype))
            elif tensor.fill == "positions":
                past = sizes.get(PAST, 0)
                examples[tensor.name] = torch.arange(past, past + shape[1], dtype=getattr(torch, tensor.dtype)).expand(shape).contiguous()
            else:
                examples[tensor.name] = torch.randn(shape, generator=generator, dtype=getattr(torch, tensor.dtype))
        return examples


def resolve_sizes(sizes: dict[str, int]) -> dict[str, int]:
    sizes = dict(sizes)
    if PAST in sizes and SEQUENCE in sizes:
        sizes.setdefault(TOTAL, sizes[PAST] + sizes[SEQUENCE])
    return sizes


def encoder_spec(config: ClipCapConfig) -> GraphSpec:
    """Pixels -> prefix embeddings: CLIP visual tower + optional L2 norm + mapper, one graph; also the CLIP
    image embedding before the mapper (`Runtime.encode_image`, bulk embeddings), at no extra compute."""
    side = config.clip.image_size
    return GraphSpec(
        name="encoder",
        inputs=(TensorSpec("pixel_values", (BATCH, 3, side, side)),),
        outputs=(TensorSpec("prefix_embeds", (BATCH, config.mapper.prefix_length, config.gpt2.n_embd)),
                 TensorSpec("clip_embeds", (BATCH, config.clip.embed_dim))),
        # Measured 1.3e-6 on ViT-B-32 with random weights (outputs ~1): 1e-4 leaves room for other CPUs.
        atol=1e-4,
    )


def mapper_spec(config: ClipCapConfig) -> GraphSpec:
    """CLIP embeddings -> prefix embeddings (optional L2 norm + mapper): `caption-embeddings` on export bundles."""
    return GraphSpec(
        name="mapper",
        inputs=(TensorSpec("clip_embeddings", (BATCH, config.clip.embed_dim)),),
        outputs=(TensorSpec("prefix_embeds", (BATCH, config.mapper.prefix_length, config.gpt2.n_embd)),),
        atol=1e-4,
    )


def decoder_spec(config: ClipCapConfig) -> GraphSpec:
    """One GPT-2 step with a KV cache. PAST may be 0: that is the prefix step.

    `logits` holds the last position only, (B, V): decoding never reads the others, and the full
    (B, T, V) output would cost T times the largest matmul of the graph on the prefix step.
    """
    g = config.gpt2
    head_dim = g.n_embd // g.n_head
    past = [TensorSpec(f"past_key_values.{layer}.{kind}", (BATCH, g.n_head, PAST, head_dim))
            for layer in range(g.n_layer) for kind in ("key", "value")]
    present = [TensorSpec(f"present.{layer}.{kind}", (BATCH, g.n_head, TOTAL, head_dim))
               for layer in range(g.n_layer) for kind in ("key", "value")]
    return GraphSpec(
        name="decoder",
        inputs=(
            TensorSpec("inputs_embeds", (BATCH, SEQUENCE, g.n_embd)),
            TensorSpec("attention_mask", (BATCH, TOTAL), "int64", fill="ones"),
            TensorSpec("position_ids", (BATCH, SEQUENCE), "int64", fill="positions"),
            *past,
        ),
        outputs=(TensorSpec("logits", (BATCH, g.vocab_size)), *present),
        # Measured up to 1.1e-5 on GPT-2 small with random weights (logits ~10); greedy tokens are
        # checked separately for exact equality.
        atol=1e-4,
    )


def inplace_decoder_spec(config: ClipCapConfig) -> GraphSpec:
    """One GPT-2 step whose caches are buffers of CAPACITY positions, written in place (clipcap.export.inplace_decoder).

    No attention mask (rows are never padded); the positions say where the new keys/values go. The
    runtime binds each past buffer as its present output too, so presents alias pasts.
    """
    g = config.gpt2
    head_dim = g.n_embd // g.n_head
    caches = [(layer, kind) for layer in range(g.n_layer) for kind in ("key", "value")]
    return GraphSpec(
        name="decoder",
        inputs=(
            TensorSpec("inputs_embeds", (BATCH, SEQUENCE, g.n_embd)),
            TensorSpec("position_ids", (BATCH, SEQUENCE), "int64", fill="positions"),
            *[TensorSpec(f"past_key_values.{layer}.{kind}", (BATCH, g.n_head, CAPACITY, head_dim))
              for layer, kind in caches],
        ),
        outputs=(TensorSpec("logits", (BATCH, g.vocab_size)),
                 *[TensorSpec(f"present.{layer}.{kind}", (BATCH, g.n_head, CAPACITY, head_dim)) for layer, kind in caches]),
        atol=1e-4,  # as decoder_spec: the same arithmetic, fused differently
    )


@dataclass(frozen=True)
class DecoderKind:
    """One kind of decoder graph: its spec, the module exported, the parity shapes and the runtime's cache.

    The export module and the cache class live in layers above this one (clipcap.export,
    clipcap.runtimes): they are named "module:class" and imported on use, as clipcap.runtimes.RUNTIMES does.
    """

    name: str  # the manifest's `decoder_cache`
    spec: Callable[[ClipCapConfig], GraphSpec]  # the decoder graph's names and shapes
    parity_sizes: tuple[dict[str, int], ...]  # shapes the export's graph parity check runs
    export_module: str  # "module:class": the torch module exported as decoder.onnx (clipcap.export)
    cache: str  # "module:class": the onnxruntime backend's cache discipline, with new / step / select
    portable: bool  # standard ONNX operators only (TensorRT parses it); False: onnxruntime contrib ops
    matmul_linears: bool  # linears exported as MatMul + Add, which weight-only quantisation (MatMulNBits) rewrites
    summary: str  # one line for --help and error messages

    def export_module_class(self) -> type:
        return _load(self.export_module)

    def cache_class(self) -> type:
        return _load(self.cache)


def _load(target: str) -> type:
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


DECODER_KINDS = {kind.name: kind for kind in (
    DecoderKind("in-place", inplace_decoder_spec, INPLACE_PARITY_SIZES,
                "clipcap.export.inplace_decoder:InPlaceDecoderStep", "clipcap.runtimes.onnx_runtime:InPlaceCache",
                portable=False, matmul_linears=True, summary="onnxruntime's fused GPT-2 step writing a preallocated cache (CPU/CUDA EP)"),
    DecoderKind("concat", decoder_spec, PARITY_SIZES,
                "clipcap.export.onnx:DecoderStepGraph", "clipcap.runtimes.onnx_runtime:ConcatCache",
                portable=True, matmul_linears=False, summary="GPT-2's own attention, the cache grows by concatenation (TensorRT builds from it)"),
)}


@dataclass(frozen=True)
class EncoderAttention:
    """How the encoder graph writes the CLIP ViT's attention (the graph's names and shapes are the same)."""

    name: str  # the manifest's `encoder_attention`
    portable: bool  # standard ONNX operators only (TensorRT parses it); False: onnxruntime contrib ops
    summary: str  # one line for --help and error messages


ENCODER_ATTENTIONS = {kind.name: kind for kind in (
    EncoderAttention("open_clip", portable=True,
                     summary="open_clip's nn.MultiheadAttention as torch exports it (packed QKV, unfused)"),
    EncoderAttention("fused", portable=False,
                     summary="onnxruntime's Attention contrib op per block (clipcap.export.vit_attention)"),
)}


def graph_specs(config: ClipCapConfig, decoder: DecoderKind) -> dict[str, GraphSpec]:
    """The bundle's graphs, the decoder of kind `decoder` (an export manifest's, or TensorRT's portable one)."""
    return {spec.name: spec for spec in (encoder_spec(config), mapper_spec(config), decoder.spec(config))}


def kv_names(spec: GraphSpec) -> tuple[list[str], list[str]]:
    """The decoder's past input names and present output names, in matching order."""
    return ([t.name for t in spec.inputs if t.name.startswith("past_key_values.")],
            [t.name for t in spec.outputs if t.name.startswith("present.")])
