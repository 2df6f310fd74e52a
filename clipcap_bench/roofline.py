"""Roofline: what a decoder step and the image encoder must move and compute, against what this machine
measurably does (its fastest fp32 matmul and memory traffic, measured with the libraries the runtimes use)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from clipcap_bench.backends import BACKENDS, OpenBackend
from clipcap.config import ClipConfig, GPT2Config


@dataclass(frozen=True)
class StepCost:
    flops: float  # multiply-adds x 2
    weight_bytes: float  # every decoder weight read once
    kv_bytes: float  # KV cache read (past) + written (new positions)

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes


def gpt2_parameter_count(gpt2: GPT2Config) -> dict:
    """Parameters a decoder step reads: transformer blocks, final LayerNorm, LM head (tied to wte)."""
    e = gpt2.n_embd
    # c_attn (E x 3E), attn c_proj (E x E), c_fc (E x 4E), mlp c_proj (4E x E): 12 E^2 weights and 9 E
    # biases; two LayerNorms: 4 E.
    block = 12 * e * e + 9 * e + 4 * e
    return {"blocks": gpt2.n_layer * block, "final_norm": 2 * e, "lm_head": e * gpt2.vocab_size}


def decode_step_cost(gpt2: GPT2Config, batch: int, past: int, new: int, weight_bytes: float,
                     kv_dtype_bytes: int = 4) -> StepCost:
    """One GPT-2 step over `new` positions after `past` cached ones, logits for the last position only.

    `weight_bytes`: the decoder's weights as stored (fp32 ~4 B/parameter, dynamic int8 ~1 B).
    """
    e, layers = gpt2.n_embd, gpt2.n_layer
    total = past + new
    matmul = 2 * batch * new * layers * 12 * e * e  # QKV, projection, MLP
    attention = 2 * 2 * batch * layers * new * total * e  # QK^T and AV over every head
    lm_head = 2 * batch * e * gpt2.vocab_size  # one row of logits per image
    kv = 2 * layers * batch * (past + new) * e * kv_dtype_bytes  # keys and values: read the past, write the new
    return StepCost(matmul + attention + lm_head, weight_bytes, kv)


def decoder_weight_bytes(backend: OpenBackend) -> float:
    """Bytes of weights a decoder step reads: the decoder graph on disk (ONNX, int8 included), else
    GPT-2's parameters at fp32 (torch; TensorRT engines do not expose theirs)."""
    return graph_bytes(backend, "decoder") or 4.0 * sum(gpt2_parameter_count(backend.timed.config.gpt2).values())


def graph_bytes(backend: OpenBackend, graph: str) -> float | None:
    """Size on disk of an onnxruntime backend's `graph` (its weights as stored), None for other backends."""
    from clipcap.runtimes.onnx_runtime import OnnxRuntime

    runtime = backend.timed.inner
    if not isinstance(runtime, OnnxRuntime):
        return None
    path = backend.path / runtime.manifest.graphs[graph].file
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def vit_image_cost(clip: ClipConfig) -> StepCost | None:
    """What the CLIP ViT tower computes per image (patch embedding, every block, the projection) and the
    fp32 weights it reads; None for towers that are not open_clip ViTs (ResNets, timm models). The
    mapper is not counted (an MLP mapper adds under 1% at ViT-B-32)."""
    import open_clip

    config = clip.model_config or open_clip.get_model_config(clip.model_name) or {}
    vision = config.get("vision_cfg", {})
    if not isinstance(vision.get("layers"), int) or "patch_size" not in vision or vision.get("timm_model_name"):
        return None
    width, layers, patch = vision.get("width", 768), vision["layers"], vision["patch_size"]
    grid = clip.image_size // patch
    tokens = grid * grid + 1  # patches + the class token
    mlp = int(width * vision.get("mlp_ratio", 4.0))
    # Per block: Q, K, V and output projections (4 W^2) and the MLP (2 W M) per token; Q K^T and A V.
    block = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    patches = 2 * grid * grid * 3 * patch * patch * width
    projection = 2 * width * config.get("embed_dim", clip.embed_dim)
    # Block weights, biases (Q K V, output, MLP in and out) and two LayerNorms; then the patch kernel, class
    # token, positions, ln_pre, ln_post and the projection.
    per_block = 4 * width * width + 2 * width * mlp + 9 * width + mlp
    parameters = layers * per_block + 3 * patch * patch * width + (tokens + 5) * width + \
        width * config.get("embed_dim", clip.embed_dim)
    return StepCost(layers * block + patches + projection, 4.0 * parameters, 0.0)


def encoder_roofline(cells: list[dict], clip: ClipConfig, weight_bytes: dict[str, float | None], peaks: dict) -> list[dict]:
    """Per backend and batch size: the encode stage's p50 against the ViT's compute and weight traffic
    (`weight_bytes`: the encoder graph as stored, None: the tower's fp32 parameters) at this machine's
    ceilings; `x_floor` is the measured time over the slower of the two. Empty for non-ViT towers."""
    image = vit_image_cost(clip)
    if image is None:
        return []
    rows, seen = [], set()
    for cell in cells:
        key = (cell["backend"], cell["batch_size"])
        if key in seen:
            continue
        seen.add(key)
        batch = cell["batch_size"]
        cost = StepCost(batch * image.flops, weight_bytes.get(cell["backend"]) or image.weight_bytes, 0.0)
        seconds = cell["stages_ms"]["encode"]["p50"] / 1e3
        floor = cost_floor_s(cost, peaks)
        rows.append({"backend": cell["backend"], "batch_size": batch, "encode_ms": seconds * 1e3,
                     "gflop": cost.flops / 1e9, "weight_mb": cost.weight_bytes / 1e6,
                     "gflops": cost.flops / seconds / 1e9, "matmul_fraction": cost.flops / seconds / 1e9 / peaks["matmul_gflops"],
                     "floor_ms": floor * 1e3, "x_floor": seconds / floor})
    return rows


def roofline(cells: list[dict], gpt2: GPT2Config, prefix_length: int, weight_bytes: dict[str, float],
             peaks: dict) -> dict:
    """Per cached backend and batch size (longest caption measured): the token step's cost at mid-caption,
    and the share of the measured matmul rate and copy bandwidth its p50 time (every token step pooled)
    reaches; plus the KV-cache speed-up these ceilings allow at all."""
    longest: dict[tuple[str, int], dict] = {}
    for cell in cells:
        key = (cell["backend"], cell["batch_size"])
        if BACKENDS[cell["backend"]].use_cache and "token_step" in cell["stages_ms"] and \
                (key not in longest or cell["tokens"] > longest[key]["tokens"]):
            longest[key] = cell
    rows = []
    for (backend, batch), cell in longest.items():
        token = cell["tokens"] // 2 + 1
        cost = token_step_cost(gpt2, prefix_length, token, batch, weight_bytes[backend])
        seconds = cell["stages_ms"]["token_step"]["p50"] / 1e3
        rows.append({"backend": backend, "batch_size": batch, "tokens": cell["tokens"], "token": token,
                     "step_ms": seconds * 1e3, "gflop": cost.flops / 1e9, "weight_mb": cost.weight_bytes / 1e6,
                     "kv_mb": cost.kv_bytes / 1e6, "gflops": cost.flops / seconds / 1e9,
                     "gbps": cost.bytes / seconds / 1e9,
                     "matmul_fraction": cost.flops / seconds / 1e9 / peaks["matmul_gflops"],
                     "bandwidth_fraction": cost.bytes / seconds / 1e9 / peaks["bandwidth_gbps"],
                     "floor_ms": 1e3 * cost_floor_s(cost, peaks)})
    fp32 = 4.0 * sum(gpt2_parameter_count(gpt2).values())
    bounds = [{"batch_size": batch, "tokens": tokens,
               "speedup": kv_cache_speedup_bound(gpt2, prefix_length, tokens, batch, fp32, peaks)}
              for batch, tokens in sorted({(c["batch_size"], c["tokens"]) for c in cells})]
    return {"model": {"n_layer": gpt2.n_layer, "n_embd": gpt2.n_embd, "vocab_size": gpt2.vocab_size,
                      "parameters_read_per_step": sum(gpt2_parameter_count(gpt2).values()),
                      "prefix_length": prefix_length},
            "step_costs_fp32": step_cost_table(gpt2, prefix_length), "rows": rows, "kv_cache_bound": bounds}


def cost_floor_s(cost: StepCost, peaks: dict) -> float:
    """The least time a step can take on this machine: the slower of its compute and its memory traffic."""
    return max(cost.flops / 1e9 / peaks["matmul_gflops"], cost.bytes / 1e9 / peaks["bandwidth_gbps"])


def kv_cache_speedup_bound(gpt2: GPT2Config, prefix_length: int, tokens: int, batch: int, weight_bytes: float,
                           peaks: dict) -> float:
    """Decode time without a cache over decode time with one, both at this machine's ceilings (fp32,
    last-position logits as the runtimes compute): the speed-up a perfect implementation would show."""
    cached = sum(cost_floor_s(token_step_cost(gpt2, prefix_length, k, batch, weight_bytes), peaks)
                 for k in range(1, tokens + 1))
    # Without a cache, the step producing token k runs the whole sequence: prefix + k - 1 positions.
    recomputed = sum(cost_floor_s(decode_step_cost(gpt2, batch, 0, prefix_length + k - 1, weight_bytes), peaks)
                     for k in range(1, tokens + 1))
    return recomputed / cached


def token_step_cost(gpt2: GPT2Config, prefix_length: int, token: int, batch: int, weight_bytes: float) -> StepCost:
    """The step that produces generated token `token` (1: the prefix step, past 0; k >= 2: one new
    position after prefix_length + k - 2 cached ones)."""
    if token == 1:
        return decode_step_cost(gpt2, batch, 0, prefix_length, weight_bytes)
    return decode_step_cost(gpt2, batch, prefix_length + token - 2, 1, weight_bytes)


def step_cost_table(gpt2: GPT2Config, prefix_length: int, tokens: tuple[int, ...] = (1, 5, 30, 60, 67),
                    batches: tuple[int, ...] = (1, 8), weight_bytes_per_parameter: float = 4.0) -> list[dict]:
    """What a decoder step must compute and move, by token and batch size (arithmetic, no measurement)."""
    weights = weight_bytes_per_parameter * sum(gpt2_parameter_count(gpt2).values())
    rows = []
    for batch in batches:
        for token in tokens:
            cost = token_step_cost(gpt2, prefix_length, token, batch, weights)
            rows.append({"batch_size": batch, "token": token, "gflop": cost.flops / 1e9,
                         "weight_mb": cost.weight_bytes / 1e6, "kv_mb": cost.kv_bytes / 1e6,
                         "flop_per_byte": cost.flops / cost.bytes})
    return rows


def measure_peaks(device: str = "cpu", matmul_sizes: tuple[int, ...] = (512, 1024, 2048), read_mb: int = 256,
                  repeats: int = 5, thread_clock: bool = False) -> dict:
    """This machine's ceilings at the current thread count (best of `repeats`, the least disturbed by
    neighbours): the fastest fp32 square matmul of `matmul_sizes` among the libraries the runtimes use
    (torch; on CPU also onnxruntime's MLAS, up to twice torch's rate on one thread), and the fastest
    sustained memory traffic (a read-only reduction, or a copy counting its read and its write).

    `thread_clock`: time the calling thread's CPU instead of the wall (CPU, 1 thread only, where every
    kernel runs in that thread): the rate of the core while it runs, for figures timed the same way."""
    target = torch.device(device)
    if thread_clock and (target.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("thread_clock times one thread's CPU: it needs device cpu and torch.get_num_threads() == 1")
    clock = time.thread_time if thread_clock else time.perf_counter

    def best_seconds(work: Callable[[], Any]) -> float:
        work()  # warm-up: allocation, kernel selection
        times = []
        for _ in range(repeats):
            start = clock()
            work()
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            times.append(clock() - start)
        return min(times)

    rates: dict[str, dict[int, float]] = {}  # library -> size -> GFLOP/s
    for size in matmul_sizes:
        a, b = (torch.randn(size, size, device=target) for _ in range(2))
        out = torch.empty_like(a)
        rates.setdefault("torch", {})[size] = 2 * size**3 / best_seconds(lambda: torch.matmul(a, b, out=out)) / 1e9
        if target.type == "cpu":
            mlas = _mlas_matmul(a.numpy(), b.numpy())
            rates.setdefault("onnxruntime-mlas", {})[size] = 2 * size**3 / best_seconds(mlas) / 1e9
    library, size = max(((lib, n) for lib, by_size in rates.items() for n in by_size), key=lambda k: rates[k[0]][k[1]])
    source = torch.empty(read_mb * 2**20 // 4, device=target).normal_()
    copy = torch.empty_like(source)
    read_gbps = source.numel() * 4 / best_seconds(lambda: source.sum()) / 1e9
    copy_gbps = 2 * source.numel() * 4 / best_seconds(lambda: copy.copy_(source)) / 1e9
    return {"matmul_gflops": rates[library][size], "matmul_library": library, "matmul_size": size,
            "matmul_gflops_by_library": rates, "bandwidth_gbps": max(read_gbps, copy_gbps), "read_gbps": read_gbps,
            "copy_gbps": copy_gbps, "bandwidth_mb": read_mb, "threads": torch.get_num_threads(), "device": device,
            "clock": "thread CPU" if thread_clock else "wall"}


def _mlas_matmul(a, b) -> Callable[[], Any]:
    """onnxruntime's CPU MatMul (MLAS) of `a` by the constant `b` at torch's thread count, bound in place."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [a.shape[0], b.shape[1]])],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = np.empty((a.shape[0], b.shape[1]), np.float32)  # kept alive by the closure below
    binding = session.io_binding()
    binding.bind_cpu_input("a", a)
    binding.bind_output("c", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    return lambda: (session.run_with_iobinding(binding), out)
