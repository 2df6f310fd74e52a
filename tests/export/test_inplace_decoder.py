"""The in-place decoder (onnxruntime's fused GPT-2 step writing a preallocated cache): parity and cache handling.

tests/runtimes/test_onnx_runtime.py runs greedy (rows leaving the batch), beam, nucleus and no-cache decoding
on the same export bundle (in-place is the default) against PyTorch; these tests pin what is
particular to the in-place cache.
"""
import numpy as np
import onnx
import pytest
import torch

from clipcap.arrays import data_ptr
from clipcap.captioner import Captioner
from clipcap.formats.detect import detect
from clipcap.formats.model_bundle import load_bundle
from clipcap.decoding import DecodingOptions, generate
from clipcap.formats.graph_specs import BATCH, CAPACITY, PAST, SEQUENCE, inplace_decoder_spec
from clipcap.export.inplace_decoder import InPlaceDecoderStep
from clipcap.export.onnx import graph_max_diff, open_session
from clipcap.runtimes.onnx_runtime import InPlaceCache, OnnxRuntime
from clipcap.runtimes.torch_runtime import TorchRuntime
from conftest import max_diff


@pytest.fixture(scope="module")
def runtimes(tiny_bundle, tiny_export):
    return TorchRuntime(load_bundle(tiny_bundle).model), OnnxRuntime.from_path(tiny_export)


@pytest.mark.parametrize("sizes", [
    {BATCH: 1, SEQUENCE: 6, PAST: 0, CAPACITY: 30},  # a prefix step into a roomy cache
    {BATCH: 8, SEQUENCE: 1, PAST: 4, CAPACITY: 5},  # a token step filling the cache exactly
    {BATCH: 2, SEQUENCE: 1, PAST: 40, CAPACITY: 64},  # a long past
])
def test_graph_parity_at_shapes_not_traced(tiny_export, tiny_bundle, sizes):
    model = load_bundle(tiny_bundle).model
    spec = inplace_decoder_spec(model.config)
    module = InPlaceDecoderStep(model).eval()
    assert graph_max_diff(module, spec, open_session(tiny_export / spec.file), sizes) <= spec.atol


def test_graph_is_fused_with_symbolic_capacity(tiny_export):
    decoder = onnx.load(str(tiny_export / "decoder.onnx"), load_external_data=False)
    ops = {node.op_type for node in decoder.graph.node}
    assert {"GroupQueryAttention", "SkipLayerNormalization", "MatMul"} <= ops and "Gemm" not in ops
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.graph.input}
    assert dims["past_key_values.0.key"][0] == "batch_size" and dims["past_key_values.0.key"][2] == CAPACITY


def test_step_writes_in_place_and_select_copies(runtimes):
    _, onnx_runtime = runtimes
    prefix = torch.randn(3, 4, onnx_runtime.config.gpt2.n_embd, generator=torch.Generator().manual_seed(0))
    cache = onnx_runtime.new_cache(3)
    buffers = list(cache.buffers)
    _, cache = onnx_runtime.step(prefix, cache)
    assert isinstance(cache, InPlaceCache) and cache.length == 4
    assert [data_ptr(b) for b in cache.buffers] == [data_ptr(b) for b in buffers]  # no new cache memory
    assert all(np.abs(b[:, :, :4]).sum() > 0 and np.abs(b[:, :, 4:]).sum() == 0 for b in cache.buffers)
    before = [b.copy() for b in cache.buffers]
    chosen = onnx_runtime.select(cache, torch.tensor([2, 0, 0]))
    onnx_runtime.step(onnx_runtime.embed(torch.tensor([[5], [6], [7]])), chosen)
    assert all(np.array_equal(a, b) for a, b in zip(before, cache.buffers))  # the source rows stay intact
    assert all(np.array_equal(c[:, :, :4], b[[2, 0, 0], :, :4]) for c, b in zip(chosen.buffers, before))


def test_cache_grows_past_its_initial_capacity(runtimes, tiny_bundle):
    """The cache starts at prefix + the bundle's max_tokens; a longer caption grows it, same tokens."""
    torch_runtime, onnx_runtime = runtimes
    config = onnx_runtime.config
    assert onnx_runtime.new_cache(1).capacity == config.mapper.prefix_length + config.max_tokens
    tokens = config.gpt2.n_positions - config.mapper.prefix_length
    options = DecodingOptions(max_tokens=tokens, ignore_stop=True)
    pixels = torch.randn(2, 3, config.clip.image_size, config.clip.image_size, generator=torch.Generator().manual_seed(1))
    prefix = torch_runtime.encode(pixels)
    stops = config.tokenizer.stop_token_ids
    expected = generate(torch_runtime, prefix, options, stops, tokens)
    assert generate(onnx_runtime, prefix, options, stops, tokens) == expected
    assert len(expected[0]) == tokens


def test_several_positions_after_a_past_at_batch_above_one(runtimes):
    """onnxruntime's attention takes them only at batch 1; the runtime steps one position at a time."""
    torch_runtime, onnx_runtime = runtimes
    embeds = torch.randn(3, 7, onnx_runtime.config.gpt2.n_embd, generator=torch.Generator().manual_seed(2))
    results = []
    for runtime in (torch_runtime, onnx_runtime):
        _, cache = runtime.step(embeds[:, :4], runtime.new_cache(3))
        logits, _ = runtime.step(embeds[:, 4:], cache)
        results.append(logits)
    assert max_diff(results[0], results[1]) <= 1e-4


@pytest.mark.parametrize("method", ["int4-wo", "int8-wo"])
def test_weight_only_is_batch_invariant(tiny_export, tmp_path, method):
    """MatMulNBits quantises weights offline and each activation row on its own (per block), so a row's
    logits do not depend on its batch mates; what remains is fp32 accumulation order (kernels tile
    by batch size): bounded like the fp32 parity check, 1e-4 relative to the logits' scale."""
    from clipcap.export.quantize import QuantizeConfig, quantize_bundle

    out = quantize_bundle(QuantizeConfig(tiny_export, tmp_path / method, method=method, block_size=32))
    assert detect(out).name == f"onnx-{method}" and isinstance(Captioner.from_path(out).runtime, OnnxRuntime)
    runtime = OnnxRuntime.from_path(out)
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(out / f"decoder.{method}.onnx")).graph.node}
    embeds = torch.randn(6, 5, runtime.config.gpt2.n_embd, generator=torch.Generator().manual_seed(3)) * 3
    together, _ = runtime.step(embeds, runtime.new_cache(6))
    alone = np.concatenate([runtime.step(embeds[i:i + 1], runtime.new_cache(1))[0] for i in range(6)])
    assert max_diff(together, alone) <= 1e-4 * max(1.0, float(np.abs(alone).max()))
