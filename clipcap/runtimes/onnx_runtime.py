"""The onnxruntime backend: an export bundle's graphs behind the `Runtime` protocol.

Every graph runs through IOBinding with the runtime's arrays as the buffers (inputs bound in place,
outputs preallocated from the spec's shapes): numpy arrays on the CPU provider (no torch needed),
torch CUDA tensors on the CUDA and TensorRT providers, so the KV cache stays on the runtime's device
and `select` is a take there. One code path (the array API, clipcap.arrays) serves both.
Measured on CPU against plain `session.run`: 4-14% faster per step at GPT-2 small (the growing
presents are written in place, not copied out), ~0.2 ms slower per step on the 3-layer demo model
(the Python binding calls); one path is kept, the one the real model and the GPU need.

The cache is one object of the decoder's kind (the manifest's `decoder_cache`, graph_specs.DECODER_KINDS),
with `new` / `step` / `select`; the runtime holds its class and never branches on the kind.
`InPlaceCache` keeps each layer's keys and values in buffers of `capacity` positions, bound as both
the past input and the present output, so a step writes only its new positions into the cache it
is given; it binds them once per buffer set and a step binds only its embeddings, positions and
logits (binding GPT-2 small's 24 buffers anew cost 0.3 ms a step, ~3% of a batch-1 CPU step).
`ConcatCache`'s step returns new, longer tensors. Both hold rows of different lengths (so a row can
join a running decode, `join`): the in-place cache pads on the right, the concat cache on the left. Both obey the `Runtime` protocol's cache
contract (clipcap.runtimes.base): a cache given to `step` or `select` is spent.

An encoder whose manifest entry names the openvino engine (an NNCF int8 IR) is run by
clipcap.runtimes.openvino_encoder instead of a session; everything else stays as above.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import Any

import array_api_compat.numpy as numpy_namespace
import numpy as np

import clipcap.arrays as arrays
from clipcap.config import ClipCapConfig
from clipcap.formats.export_bundle import ExportManifest, load_manifest, load_token_table
from clipcap.formats.graph_specs import BATCH, CAPACITY, PAST, SEQUENCE, GraphSpec, TensorSpec, graph_specs, kv_names
from clipcap.formats.model_bundle import load_config
from clipcap.runtimes import padding
from clipcap.runtimes.base import RuntimeUnavailable, compute_threads
from clipcap.runtimes.openvino_encoder import OpenVinoEncoder

# dtype name -> the numpy type onnxruntime's binding API takes as the element type.
_ELEMENT_TYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


@dataclass
class ConcatCache:
    """The concat decoder's cache: each step's presents, new tensors one step longer, are the next past.
    Rows of different lengths are left-padded (clipcap.runtimes.padding) and masked by `attention_mask`."""

    past: list[Any]  # the decoder's past inputs in spec order, each (B, H, past, D)
    pads: Any | None = None  # (B,) padding positions before each row's first; None: none padded

    @property
    def length(self) -> int:
        return self.past[0].shape[2]

    @classmethod
    def new(cls, runtime: "OnnxRuntime", batch_size: int) -> "ConcatCache":
        spec = runtime.specs["decoder"]
        return cls([runtime.empty(spec.tensor(name), {BATCH: batch_size, PAST: 0}) for name in runtime.past_names])

    def step(self, runtime: "OnnxRuntime", embeds: Any) -> tuple[Any, "ConcatCache"]:
        batch, length, _ = embeds.shape
        past, xp = self.length, runtime.xp
        mask, positions = padding.step_inputs(self.pads, past, length, batch, xp, runtime.device)
        inputs = {
            "inputs_embeds": embeds,
            "attention_mask": xp.ones((batch, past + length), dtype=xp.int64, device=runtime.device)
            if mask is None else mask,
            "position_ids": positions,
            **dict(zip(runtime.past_names, self.past)),
        }
        outputs = runtime._run(runtime.specs["decoder"], inputs, {BATCH: batch, SEQUENCE: length, PAST: past})
        return outputs["logits"], ConcatCache([outputs[name] for name in runtime.present_names], self.pads)

    def select(self, index: Any) -> "ConcatCache":
        return ConcatCache(*padding.select(self.past, self.pads, index))

    def join(self, other: "ConcatCache") -> "ConcatCache":
        return ConcatCache(*padding.join(self.past, self.pads, other.past, other.pads))


@dataclass
class InPlaceCache:
    """The in-place decoder's cache: buffers of `capacity` positions that a step writes its new positions into.

    Each row has its own length (`lengths`): rows pad on the right, and the attention op reads and
    writes each row at its own positions (its `seqlens_k`), so rows of different lengths share a step."""

    buffers: list[Any]  # the decoder's caches in spec order, each (B, H, capacity, D); positions >= a row's length unset
    lengths: Any  # (B,) int64, positions filled per row
    binding: object | None = field(default=None, repr=False)  # onnxruntime IOBinding with `buffers` bound as past
    #   and present (made by the first step; one per buffer set, so per generation: never shared across threads)

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    @property
    def length(self) -> int:
        """The longest row's length."""
        return int(arrays.namespace(self.lengths).max(self.lengths)) if self.lengths.shape[0] else 0

    @classmethod
    def new(cls, runtime: "OnnxRuntime", batch_size: int) -> "InPlaceCache":
        """Room for a prefix and a default-length caption; `_reserve` grows it past that."""
        config, spec = runtime.config, runtime.specs["decoder"]
        capacity = min(config.gpt2.n_positions, config.mapper.prefix_length + config.max_tokens)
        sizes, xp = {BATCH: batch_size, CAPACITY: capacity}, runtime.xp
        return cls([xp.zeros(spec.shape(spec.tensor(name), sizes), dtype=getattr(xp, spec.tensor(name).dtype),
                             device=runtime.device) for name in runtime.past_names],
                   xp.zeros(batch_size, dtype=xp.int64, device=runtime.device))

    def step(self, runtime: "OnnxRuntime", embeds: Any) -> tuple[Any, "InPlaceCache"]:
        batch, length, _ = embeds.shape
        xp = runtime.xp
        if length > 1 and batch > 1 and bool(xp.any(self.lengths != 0)):
            # onnxruntime's GroupQueryAttention takes several new positions after a past at batch 1
            # only; one at a time is the same causal computation.
            cache = self
            for position in range(length):
                logits, cache = cache.step(runtime, embeds[:, position:position + 1])
            return logits, cache
        cache = self._reserve(self.length + length, runtime.config.gpt2.n_positions)
        spec, kept = runtime.specs["decoder"], []
        binding = cache.binding
        if binding is None:
            # The buffers themselves are bound (contiguous, the spec's dtype: no copy that could be freed), as
            # past inputs and as present outputs: aliases, the op writes each row's positions length..length+T.
            assert all(arrays.dtype_name(b) == spec.tensor(n).dtype for b, n in zip(cache.buffers, runtime.past_names))
            binding = runtime.sessions[spec.name].io_binding()
            runtime._bind(binding, spec, dict(zip(runtime.past_names, cache.buffers)),
                          dict(zip(runtime.present_names, cache.buffers)), kept)
        positions = cache.lengths[:, None] + xp.arange(length, dtype=xp.int64, device=runtime.device)
        inputs = {"inputs_embeds": embeds, "position_ids": positions}
        logits = runtime.empty(spec.tensor("logits"), {BATCH: batch, CAPACITY: cache.capacity})
        runtime._bind(binding, spec, inputs, {"logits": logits}, kept)
        runtime._run_bound(spec, binding)
        return logits, InPlaceCache(cache.buffers, cache.lengths + length, binding)

    def _reserve(self, needed: int, limit: int) -> "InPlaceCache":
        """Itself if it holds `needed` positions, else a copy with room (doubling, up to `limit`: GPT-2's positions)."""
        if needed <= self.capacity:
            return self
        return self._grown(min(limit, max(needed, 2 * self.capacity)))

    def _grown(self, capacity: int) -> "InPlaceCache":
        if capacity == self.capacity:
            return self
        used, xp = self.length, arrays.namespace(self.lengths)
        grown = []
        for buffer in self.buffers:
            bigger = xp.zeros((*buffer.shape[:2], capacity, buffer.shape[3]), dtype=buffer.dtype,
                              device=arrays.device(buffer))
            bigger[:, :, :used] = buffer[:, :, :used]
            grown.append(bigger)
        return InPlaceCache(grown, self.lengths)

    def select(self, index: Any) -> "InPlaceCache":
        xp = arrays.namespace(self.lengths)
        return InPlaceCache([xp.take(t, index, axis=0) for t in self.buffers], xp.take(self.lengths, index, axis=0))

    def join(self, other: "InPlaceCache") -> "InPlaceCache":
        capacity = max(self.capacity, other.capacity)
        first, second = self._grown(capacity), other._grown(capacity)
        xp = arrays.namespace(self.lengths)
        return InPlaceCache([xp.concat((a, b)) for a, b in zip(first.buffers, second.buffers)],
                            xp.concat((first.lengths, second.lengths)))


def execution_providers(device: str, engine_cache: Path | None = None) -> tuple[list, Any]:
    """onnxruntime providers for `device`: cpu | cuda[:N] (CUDA EP) | tensorrt[:N] (TensorRT EP, then CUDA EP),
    and the device the runtime's arrays live on: "cpu" (numpy) or a torch CUDA device (torch tensors).

    `engine_cache`: where the TensorRT EP keeps the engines it builds (else it rebuilds them per session).
    Raises RuntimeUnavailable naming what to install when the provider, torch or the GPU is missing.
    """
    import onnxruntime as ort

    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return ["CPUExecutionProvider"], "cpu"
    if kind not in ("cuda", "tensorrt") or (index and not index.isdigit()):
        raise RuntimeUnavailable(f"onnxruntime backend: unknown device {device!r}; use cpu, cuda[:N] or tensorrt[:N]")
    device_id = int(index or 0)
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider"] + (["TensorrtExecutionProvider"] if kind == "tensorrt" else [])
    missing = [p for p in wanted if p not in available]
    if missing:
        raise RuntimeUnavailable(f"onnxruntime {ort.__version__} here has no {', '.join(missing)} "
                                 f"(available: {', '.join(available)}); install onnxruntime-gpu "
                                 f"(pip uninstall onnxruntime && pip install onnxruntime-gpu) on a machine with a CUDA GPU")
    try:
        import torch  # the GPU's buffers are torch CUDA tensors
    except ImportError:
        raise RuntimeUnavailable(f"device {device!r}: the onnxruntime backend keeps GPU buffers as torch tensors; "
                                 "install the torch extra (pip install 'clipcap-deploy[torch]')") from None
    if not torch.cuda.is_available():
        raise RuntimeUnavailable(f"device {device!r} asked for, but torch sees no CUDA GPU on this machine")
    # onnxruntime computes on torch's current stream, so its kernels are ordered with the torch ops
    # that fill its inputs (positions, selected cache rows) and read its outputs.
    stream = {"device_id": device_id, "user_compute_stream": str(torch.cuda.current_stream(device_id).cuda_stream)}
    providers = [("CUDAExecutionProvider", dict(stream)), "CPUExecutionProvider"]
    if kind == "tensorrt":
        options = dict(stream)
        if engine_cache is not None:
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(engine_cache))
        providers.insert(0, ("TensorrtExecutionProvider", options))
    return providers, torch.device("cuda", device_id)


class OnnxRuntime:
    def __init__(self, path: Path, config: ClipCapConfig, manifest: ExportManifest, device: str = "cpu",
                 threads: int | None = None):
        """`threads`: intra-op threads per session; None: clipcap.runtimes.compute_threads() (None there:
        onnxruntime's default, one per physical core)."""
        import onnxruntime as ort

        providers, self.device = execution_providers(device, engine_cache=path / "ort-tensorrt-cache")
        if self.device == "cpu":
            self.xp = numpy_namespace
        else:
            import array_api_compat.torch as torch_namespace

            self.xp = torch_namespace
        self.config = config
        self.manifest = manifest
        self.cache_class = manifest.decoder.cache_class()
        self.specs = graph_specs(config, manifest.decoder)
        self.past_names, self.present_names = kv_names(self.specs["decoder"])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = (compute_threads() or 0) if threads is None else threads
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: exported graphs trigger harmless shape warnings
        self.sessions = {name: ort.InferenceSession(str(path / manifest.graphs[name].file), options,
                                                    providers=providers)
                         for name in self.specs if manifest.graphs[name].engine == "onnxruntime"}
        encoder = manifest.graphs["encoder"]
        # pixels -> the encoder's outputs by name: its onnxruntime session, or the OpenVINO IR
        self.encoder_graph = self._encoder_session if encoder.engine == "onnxruntime" else \
            OpenVinoEncoder(path / encoder.file, self.specs["encoder"].output_names, self.device, threads)
        self.token_table = self.asarray(load_token_table(path / manifest.token_embeddings), "float32")

    @classmethod
    def from_path(cls, path: Path, device: str = "cpu", threads: int | None = None,
                  config: ClipCapConfig | None = None) -> "OnnxRuntime":
        path = Path(path)
        config = config or load_config(path)
        return cls(path, config, load_manifest(path, config), device, threads)

    def encode(self, pixels: Any) -> Any:
        return self.encoder_graph(pixels)["prefix_embeds"]

    def encode_image(self, pixels: Any) -> Any:
        return self.encoder_graph(pixels)["clip_embeds"]

    def _encoder_session(self, pixels: Any) -> dict[str, Any]:
        return self._run(self.specs["encoder"], {"pixel_values": pixels}, {BATCH: pixels.shape[0]})

    def map_embeddings(self, clip_embeddings: Any) -> Any:
        spec = self.specs["mapper"]
        sizes = {BATCH: clip_embeddings.shape[0]}
        return self._run(spec, {"clip_embeddings": clip_embeddings}, sizes)["prefix_embeds"]

    def embed(self, token_ids: Any) -> Any:
        return self.token_table[self.asarray(token_ids, "int64")]  # (B, T) -> (B, T, E)

    def new_cache(self, batch_size: int) -> ConcatCache | InPlaceCache:
        return self.cache_class.new(self, batch_size)

    def step(self, embeds: Any, cache: ConcatCache | InPlaceCache) -> tuple[Any, ConcatCache | InPlaceCache]:
        return cache.step(self, embeds)

    def select(self, cache: ConcatCache | InPlaceCache, index: Any) -> ConcatCache | InPlaceCache:
        return cache.select(self.asarray(index, "int64"))

    def join(self, first: ConcatCache | InPlaceCache, second: ConcatCache | InPlaceCache) -> ConcatCache | InPlaceCache:
        return first.join(second)

    def asarray(self, x: Any, dtype: str) -> Any:
        """`x` (numpy or torch) as this runtime's contiguous `dtype` array on its device."""
        return arrays.as_buffer(x, self.xp, dtype, self.device)

    def empty(self, tensor: TensorSpec, sizes: dict[str, int]) -> Any:
        """An uninitialised array for `tensor` of the decoder spec at `sizes`."""
        spec = self.specs["decoder"]
        return self.xp.empty(spec.shape(tensor, sizes), dtype=getattr(self.xp, tensor.dtype), device=self.device)

    def _run(self, spec: GraphSpec, inputs: dict[str, Any], sizes: dict[str, int],
             bound_outputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Bind arrays as inputs and as outputs (`bound_outputs`, else freshly allocated), then run."""
        binding = self.sessions[spec.name].io_binding()  # per call: sessions may be shared across threads
        outputs = {tensor_spec.name: (bound_outputs or {}).get(tensor_spec.name) for tensor_spec in spec.outputs}
        for tensor_spec in spec.outputs:
            if outputs[tensor_spec.name] is None:
                outputs[tensor_spec.name] = self.xp.empty(spec.shape(tensor_spec, sizes),
                                                          dtype=getattr(self.xp, tensor_spec.dtype), device=self.device)
        kept = []
        self._bind(binding, spec, {t.name: inputs[t.name] for t in spec.inputs}, outputs, kept)
        self._run_bound(spec, binding)
        return outputs

    def _bind(self, binding, spec: GraphSpec, inputs: dict[str, Any], outputs: dict[str, Any], kept: list) -> None:
        """Bind `inputs` (as the spec's dtypes, contiguous: the copies go to `kept`, which must outlive the run)
        and `outputs` by name; a name bound before is rebound."""
        device_type = "cpu" if self.device == "cpu" else self.device.type
        device_id = 0 if self.device == "cpu" else self.device.index or 0
        for name, given in inputs.items():
            tensor = self.asarray(given, spec.tensor(name).dtype)
            kept.append(tensor)
            binding.bind_input(name, device_type, device_id, _ELEMENT_TYPES[arrays.dtype_name(tensor)],
                               tuple(tensor.shape), arrays.data_ptr(tensor))
        for name, tensor in outputs.items():
            binding.bind_output(name, device_type, device_id, _ELEMENT_TYPES[arrays.dtype_name(tensor)],
                                tuple(tensor.shape), arrays.data_ptr(tensor))

    def _run_bound(self, spec: GraphSpec, binding) -> None:
        binding.synchronize_inputs()
        self.sessions[spec.name].run_with_iobinding(binding)
        binding.synchronize_outputs()
