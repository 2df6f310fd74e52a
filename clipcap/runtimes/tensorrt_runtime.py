"""The TensorRT backend: engines from export/to_tensorrt.py behind the `Runtime` protocol.

Buffers are torch CUDA tensors allocated once, at the largest shape each optimisation profile
allows, and handed to TensorRT with `set_tensor_address`; a call uses a contiguous view of the
size it needs. The KV cache never leaves the GPU: each cache owns two buffers per past/present
tensor, a step reads the past from one and writes the present into the other (double buffering),
and `select` is an index_select from one into the other; the spent cache's buffer is the next
write's target (the `Runtime` contract). Every call runs `execute_async_v3` on torch's current CUDA
stream, so it is ordered with the torch ops around it without extra synchronisation. Caches are
the caller's, so two decodes may interleave on one runtime; the execution contexts and I/O buffers
are the runtime's, so calls are made one at a time. Not verified on hardware here (no GPU, no
tensorrt package): see export/README.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import array_api_compat.torch as xp
import torch

from clipcap.config import BundleError, ClipCapConfig
from clipcap.formats.export_bundle import load_token_table
from clipcap.formats.graph_specs import BATCH, PAST, SEQUENCE, TOTAL, GraphSpec, graph_specs, kv_names
from clipcap.formats.model_bundle import load_config
from clipcap.formats.tensorrt_profiles import TENSORRT_DECODER, load_profiles
from clipcap.runtimes import padding
from clipcap.runtimes.base import RuntimeUnavailable


@dataclass
class TrtCache:
    buffers: list[list[torch.Tensor]]  # two sets of flat buffers, one per past tensor: this decode's own
    past: list[torch.Tensor]  # views into buffer set `slot`, each (B, H, past, D), spec order
    slot: int  # which of the two sets holds `past`; the next write goes to the other
    pads: torch.Tensor | None = None  # (B,) left padding per row (clipcap.runtimes.padding); None: none padded

    @property
    def length(self) -> int:
        return self.past[0].shape[2]


class _Engine:
    """One deserialized engine: an execution context and I/O buffers per optimisation profile."""

    def __init__(self, trt, runtime, engine_file: Path, spec: GraphSpec, profiles: list, device: torch.device,
                 skip: tuple[str, ...] = ()):
        self.spec = spec
        self.profiles = profiles
        self.device = device
        self.engine = runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise BundleError(f"{engine_file}: TensorRT could not deserialize it (built by another TensorRT "
                              "version or for another GPU? rebuild with export/to_tensorrt.py)")
        self.dtypes = {t.name: _torch_dtype(trt, self.engine.get_tensor_dtype(t.name))
                       for t in spec.inputs + spec.outputs}
        stream = torch.cuda.current_stream(device).cuda_stream
        self.contexts, self.buffers = [], []
        for index, profile in enumerate(profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, stream)
            self.contexts.append(context)
            # Flat buffers of the profile's largest size; `skip` names tensors the caller owns (the KV cache).
            sizes = profile.max_sizes(spec)
            self.buffers.append({t.name: torch.empty(_numel(spec.shape(t, sizes)), dtype=self.dtypes[t.name],
                                                     device=device)
                                 for t in spec.inputs + spec.outputs if t.name not in skip})

    def profile_for(self, shapes: dict[str, tuple[int, ...]], prefer: str | None = None) -> int:
        """Index of the profile named `prefer` if the shapes fit it, else of the first that fits."""
        order = sorted(range(len(self.profiles)), key=lambda i: self.profiles[i].name != prefer)
        for index in order:
            if self.profiles[index].fits(shapes):
                return index
        limits = {p.name: {k: v[2] for k, v in p.shapes.items()} for p in self.profiles}
        raise RuntimeUnavailable(f"{self.spec.name} engine: shapes {shapes} are outside its optimisation "
                                 f"profiles (max {limits}); rebuild with larger --max-batch / --max-tokens")

    def view(self, profile: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.buffers[profile][name][:_numel(shape)].view(shape)

    def execute(self, profile: int, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        context = self.contexts[profile]
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            if tuple(context.get_tensor_shape(name)) != tuple(tensor.shape):
                raise RuntimeError(f"{self.spec.name} engine: output {name} would be "
                                   f"{tuple(context.get_tensor_shape(name))}, buffer is {tuple(tensor.shape)}")
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.spec.name} engine: execute_async_v3 failed (see the TensorRT log)")


class TensorRTRuntime:
    def __init__(self, path: Path, config: ClipCapConfig, record: dict, device: str = "cuda"):
        trt = import_tensorrt()
        self.device = torch.device(device)
        self.config = config
        self.specs = graph_specs(config, TENSORRT_DECODER)
        self.past_names, self.present_names = kv_names(self.specs["decoder"])
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.trt_runtime = runtime = trt.Runtime(self.logger)  # must outlive its engines
        with torch.cuda.device(self.device):
            # The decoder binds the caller's embeddings and each cache's own KV buffers directly.
            caller_owned = ("inputs_embeds", *self.past_names, *self.present_names)
            self.engines = {name: _Engine(trt, runtime, path / entry["file"], self.specs[name], entry["profiles"],
                                          self.device, skip=caller_owned if name == "decoder" else ())
                            for name, entry in record["engines"].items()}
            self.token_table = torch.from_numpy(load_token_table(path / record["token_embeddings"])).to(self.device)
            # The most rows and positions a cache tensor may hold: the largest any decoder profile allows.
            decoder = self.engines["decoder"]
            limits = [profile.max_sizes(decoder.spec) for profile in decoder.profiles]
            self.kv_limits = {dim: max(limit[dim] for limit in limits) for dim in (BATCH, TOTAL)}

    @classmethod
    def from_path(cls, path: Path, device: str = "cuda", config: ClipCapConfig | None = None) -> "TensorRTRuntime":
        import_tensorrt()  # first: its error says what to install
        if not device.startswith("cuda"):
            raise RuntimeUnavailable(f"the tensorrt backend runs on a CUDA GPU: use --device cuda, not {device!r}")
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("the tensorrt backend needs a CUDA GPU, and torch sees none on this machine")
        path = Path(path)
        return cls(path, config or load_config(path), load_profiles(path), device)

    def _kv_views(self, cache_buffers: list[list[torch.Tensor]], slot: int,
                  shape: tuple[int, ...]) -> list[torch.Tensor]:
        """Views of `shape` (B, H, positions, D) into set `slot`, grown first when too small: room for these
        rows at the most positions any profile allows, so a decode allocates once per row count (prefix, beam)."""
        rows, _, positions, _ = shape
        if rows > self.kv_limits[BATCH] or positions > self.kv_limits[TOTAL]:
            raise RuntimeUnavailable(f"KV cache of shape {shape} exceeds what the engines were built for; "
                                     "rebuild with larger --max-batch / --max-beam / --max-tokens")
        if not cache_buffers[slot] or cache_buffers[slot][0].numel() < _numel(shape):
            room = _numel(self._kv_shape({BATCH: rows, PAST: self.kv_limits[TOTAL]}))
            dtype = self.engines["decoder"].dtypes[self.present_names[0]]
            cache_buffers[slot] = [torch.empty(room, dtype=dtype, device=self.device) for _ in self.past_names]
        return [buffer[:_numel(shape)].view(shape) for buffer in cache_buffers[slot]]

    def _run_single(self, graph: str, input_name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch through a single-input engine (encoder, mapper): every output, copied out of its buffer."""
        engine = self.engines[graph]
        spec = engine.spec
        sizes = {BATCH: value.shape[0]}
        shape = spec.shape(spec.inputs[0], sizes)
        profile = engine.profile_for({input_name: shape})
        source = engine.view(profile, input_name, shape)
        source.copy_(torch.as_tensor(value))  # host -> device (or a device copy): the engine reads its own buffer
        targets = {output.name: engine.view(profile, output.name, spec.shape(output, sizes)) for output in spec.outputs}
        engine.execute(profile, {input_name: source}, targets)
        return {name: target.float().clone() for name, target in targets.items()}  # buffers are reused by the next call

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run_single("encoder", "pixel_values", pixels)["prefix_embeds"]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run_single("encoder", "pixel_values", pixels)["clip_embeds"]

    def map_embeddings(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        return self._run_single("mapper", "clip_embeddings", clip_embeddings)["prefix_embeds"]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.token_table[torch.as_tensor(token_ids).to(self.device)]  # (B, T) -> (B, T, E)

    def _kv_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """(B, H, past, D) of every past tensor for `sizes` (a present has past + new tokens: pass that)."""
        spec = self.specs["decoder"]
        return spec.shape(spec.tensor(self.past_names[0]), sizes)

    def new_cache(self, batch_size: int) -> TrtCache:
        buffers = [[], []]  # allocated on first use (a real address even for the empty past of the prefix step)
        return TrtCache(buffers, self._kv_views(buffers, 0, self._kv_shape({BATCH: batch_size, PAST: 0})), slot=0)

    def step(self, embeds: torch.Tensor, cache: TrtCache) -> tuple[torch.Tensor, TrtCache]:
        engine = self.engines["decoder"]
        spec = engine.spec
        batch, length, _ = embeds.shape
        past = cache.length
        sizes = {BATCH: batch, SEQUENCE: length, PAST: past}
        shapes = {t.name: spec.shape(t, sizes) for t in spec.inputs}
        profile = engine.profile_for(shapes, prefer="prefix" if past == 0 else "token")  # see compute_profiles
        inputs = {
            "inputs_embeds": embeds.to(self.device, engine.dtypes["inputs_embeds"]).contiguous(),
            "attention_mask": engine.view(profile, "attention_mask", shapes["attention_mask"]),
            "position_ids": engine.view(profile, "position_ids", shapes["position_ids"]),
            **dict(zip(self.past_names, cache.past)),
        }
        mask, positions = padding.step_inputs(cache.pads, past, length, batch, xp, self.device)
        inputs["position_ids"].copy_(positions)
        if mask is None:
            inputs["attention_mask"].fill_(1)
        else:
            inputs["attention_mask"].copy_(mask)
        next_slot = 1 - cache.slot
        presents = self._kv_views(cache.buffers, next_slot, self._kv_shape({BATCH: batch, PAST: past + length}))
        logits = engine.view(profile, "logits", spec.shape(spec.tensor("logits"), sizes))
        engine.execute(profile, inputs, {"logits": logits, **dict(zip(self.present_names, presents))})
        return logits.float().clone(), TrtCache(cache.buffers, presents, next_slot, cache.pads)

    def select(self, cache: TrtCache, index: torch.Tensor) -> TrtCache:
        index = index.to(self.device)
        past, pads = padding.select(cache.past, cache.pads, index)  # new tensors: the copy below may not alias
        return self._stored(cache.buffers, 1 - cache.slot, past, pads)

    def join(self, first: TrtCache, second: TrtCache) -> TrtCache:
        """Unverified: no TensorRT in this workplace (the padding logic is the torch and concat runtimes', tested)."""
        past, pads = padding.join(first.past, first.pads, second.past, second.pads)
        return self._stored([[], []], 0, past, pads)

    def _stored(self, buffers: list[list[torch.Tensor]], slot: int, past: list[torch.Tensor],
                pads: torch.Tensor | None) -> TrtCache:
        """`past` copied into buffer set `slot` (the engines write presents only into these buffers)."""
        targets = self._kv_views(buffers, slot, tuple(past[0].shape))
        for source, target in zip(past, targets):
            target.copy_(source)
        return TrtCache(buffers, targets, slot, pads)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32}
    if dtype not in table:
        raise BundleError(f"engine tensor type {dtype} is not one this runtime binds")
    return table[dtype]


def import_tensorrt():
    """The tensorrt module, or RuntimeUnavailable saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise RuntimeUnavailable(
            "the tensorrt Python package is not installed: pip install tensorrt (TensorRT 10, the project's "
            "[tensorrt] extra: the versions whose ONNX parser the exported graphs are checked against) on a machine "
            "with a CUDA GPU and driver") from None
    return tensorrt
