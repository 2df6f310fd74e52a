"""The onnxruntime backend: token-exact with the PyTorch runtime through the shared decoding code."""
import json

import numpy as np
import pytest
import torch

import clipcap.arrays as arrays
from clipcap.captioner import Captioner
from clipcap.cli import main
from clipcap.config import BundleError
from clipcap.decoding import DecodingOptions, generate
from clipcap.formats.model_bundle import load_bundle
from clipcap.runtimes import RuntimeUnavailable, open_runtime
from clipcap.runtimes.onnx_runtime import OnnxRuntime, execution_providers
from clipcap.runtimes.torch_runtime import TorchRuntime
from conftest import random_images


def max_diff(a, b) -> float:
    """max |a - b| of two arrays, numpy (onnxruntime on the CPU) or torch."""
    return float(np.abs(arrays.to_numpy(a) - arrays.to_numpy(b)).max())


@pytest.fixture(scope="module")
def captioners(tiny_bundle, tiny_export):
    return Captioner.from_path(tiny_bundle), Captioner.from_path(tiny_export, backend="onnxruntime")


def _token_ids(batch):
    return [c.token_ids for c in batch.captions]


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_seeded_nucleus_is_the_same_caption_on_torch_and_onnxruntime(captioners, temperature):
    """The same seeds give the same captions on both backends: the uniforms come from numpy's PCG64 on the
    host, whatever array library holds the logits (the two differ only where a uniform lands within fp32
    rounding of a token's boundary)."""
    reference, onnx = captioners
    images = random_images(8, seed=5)
    options = DecodingOptions(strategy="nucleus", top_p=0.95, temperature=temperature, seed=11)
    expected = _token_ids(reference.caption_images(images, options))
    assert _token_ids(onnx.caption_images(images, options)) == expected
    assert _token_ids(onnx.caption_images(images, options.replace(seed=12))) != expected  # the seed matters


@pytest.mark.parametrize("count", [1, 8])
def test_greedy_identical_to_torch(captioners, count):
    reference, onnx = captioners
    images = random_images(count, seed=3)
    expected = _token_ids(reference.caption_images(images))
    assert _token_ids(onnx.caption_images(images)) == expected
    if count == 8:  # rows stop at different steps, so finished rows leave the batch mid-way
        assert len({len(ids) for ids in expected}) >= 2, expected


@pytest.mark.parametrize("options", [
    DecodingOptions(strategy="beam", beam_size=5),
    DecodingOptions(strategy="beam", beam_size=3, temperature=0.7),
    DecodingOptions(strategy="nucleus", top_p=0.9, seed=11),
    DecodingOptions(use_cache=False),  # the paper's decoding: past 0, whole sequences, every step
], ids=["beam5", "beam3-t0.7", "nucleus", "no-cache"])
def test_other_decodings_identical_to_torch(captioners, options):
    reference, onnx = captioners
    images = random_images(8, seed=5)
    options = options.replace(max_tokens=12)
    assert _token_ids(onnx.caption_images(images, options)) == _token_ids(reference.caption_images(images, options))


def test_decoding_past_the_cache_s_first_capacity(captioners):
    """The in-place cache starts with room for the prefix and the bundle's max_tokens and grows past it:
    a decode to the model's whole token limit (no stop) keeps every earlier position through the growth."""
    reference, onnx = captioners
    limit = onnx.token_limit
    assert limit > onnx.config.max_tokens + 4  # the decode below goes well past the first capacity
    options = DecodingOptions(max_tokens=limit, ignore_stop=True)
    images = random_images(2, seed=9)
    expected = _token_ids(reference.caption_images(images, options))
    assert all(len(ids) == limit for ids in expected)
    assert _token_ids(onnx.caption_images(images, options)) == expected


def test_caption_embeddings_uses_the_mapper_graph(captioners):
    reference, onnx = captioners
    embeddings = np.random.default_rng(0).normal(size=(5, reference.config.clip.embed_dim)).astype(np.float32)
    assert _token_ids(onnx.caption_embeddings(embeddings)) == _token_ids(reference.caption_embeddings(embeddings))
    prefix = onnx.runtime.map_embeddings(torch.from_numpy(embeddings))
    expected = reference.runtime.map_embeddings(torch.from_numpy(embeddings))
    assert max_diff(prefix, expected) <= 1e-4


def test_encode_and_embed_match_torch(captioners):
    reference, onnx = captioners
    pixels = reference.preprocess(random_images(3))
    assert max_diff(onnx.runtime.encode(pixels), reference.runtime.encode(pixels)) <= 1e-4
    clip = onnx.runtime.encode_image(pixels)  # the encoder graph's second output: before the mapper
    assert clip.shape == (3, reference.config.clip.embed_dim)
    assert max_diff(clip, reference.runtime.encode_image(pixels)) <= 1e-4
    assert max_diff(onnx.runtime.map_embeddings(clip), onnx.runtime.encode(pixels)) <= 1e-4
    ids = torch.tensor([[1, 5, 7], [0, 2, 3]])
    assert np.array_equal(onnx.runtime.embed(ids), reference.runtime.embed(ids).numpy())


@pytest.mark.parametrize("kind", ["in-place", "concat"])
def test_cache_select_reorders_rows(tiny_export, tiny_concat_export, kind):
    export = tiny_export if kind == "in-place" else tiny_concat_export
    runtime = OnnxRuntime.from_path(export)
    prefix = runtime.encode(Captioner.from_path(export, "onnxruntime").preprocess(random_images(3)))
    _, cache = runtime.step(prefix, runtime.new_cache(3))
    picked = runtime.select(cache, torch.tensor([2, 0, 2, 1]))
    before, after = (c.buffers if kind == "in-place" else c.past for c in (cache, picked))
    assert picked.length == cache.length and after[0].shape[0] == 4
    assert np.array_equal(after[0][0], before[0][2]) and np.array_equal(after[0][2], before[0][2])
    assert np.array_equal(after[-1][3], before[-1][1])


def test_cli_caption_same_as_torch(tiny_bundle, tiny_export, tmp_path, capsys):
    paths = []
    for i, image in enumerate(random_images(6, seed=7)):
        paths.append(str(tmp_path / f"img{i}.png"))
        image.save(paths[-1])
    outputs = []
    for bundle, backend in ((tiny_bundle, "torch"), (tiny_export, "onnxruntime")):
        assert main(["caption", str(bundle), *paths, "--backend", backend, "--json", "--batch-size", "4"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]


def test_cli_caption_embeddings_on_export_bundle(tiny_bundle, tiny_export, tmp_path, capsys):
    path = tmp_path / "emb.npy"
    np.save(path, np.random.default_rng(1).normal(size=(3, 24)).astype(np.float32))
    outputs = []
    for bundle, backend in ((tiny_bundle, "torch"), (tiny_export, "onnxruntime")):
        assert main(["caption-embeddings", str(bundle), str(path), "--backend", backend, "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]


def test_session_threads_are_configurable(tiny_export):
    runtime = OnnxRuntime.from_path(tiny_export, threads=1)
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in runtime.sessions.values())


def test_model_bundle_is_not_an_export_bundle(tiny_bundle, capsys):
    with pytest.raises(BundleError, match="not an export bundle.*to_onnx.py"):
        open_runtime(tiny_bundle, "onnxruntime")
    assert main(["caption", str(tiny_bundle), "x.png", "--backend", "onnxruntime"]) == 2
    assert "not an export bundle" in capsys.readouterr().err


def test_device_choice():
    assert execution_providers("cpu") == (["CPUExecutionProvider"], "cpu")  # numpy arrays on the host
    with pytest.raises(RuntimeUnavailable, match="unknown device 'tpu'"):
        execution_providers("tpu")
    with pytest.raises(RuntimeUnavailable, match="unknown device"):
        execution_providers("cuda:x")


@pytest.mark.skipif(__import__("onnxruntime").get_device() == "GPU", reason="onnxruntime-gpu is installed here")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "tensorrt"])
def test_gpu_providers_missing_say_what_to_install(tiny_export, device):
    with pytest.raises(RuntimeUnavailable, match="install onnxruntime-gpu"):
        OnnxRuntime.from_path(tiny_export, device)


# ---------------------------------------------------------------------------------------------
# ViT-B-32 + GPT-2 small (random weights): the same equalities at full size.


def _full_size_inputs(full_size_bundle, count: int, max_tokens: int):
    """Pixels, and stop ids picked from the unstopped greedy output so that rows stop at different steps."""
    runtime = TorchRuntime(load_bundle(full_size_bundle).model)
    pixels = torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    free = generate(runtime, runtime.encode(pixels), DecodingOptions(ignore_stop=True), [], max_tokens)
    stops = sorted({row[min(i, max_tokens - 1)] for i, row in enumerate(free[:3])})
    return runtime, pixels, stops


@pytest.mark.slow
@pytest.mark.parametrize("count", [1, 8])
def test_full_size_greedy_identical(full_size_bundle, full_size_export, count):
    max_tokens = 10
    torch_runtime, pixels, stops = _full_size_inputs(full_size_bundle, count, max_tokens)
    onnx_runtime = OnnxRuntime.from_path(full_size_export)
    options = DecodingOptions(max_tokens=max_tokens)
    prefix = torch_runtime.encode(pixels)
    onnx_prefix = onnx_runtime.encode(pixels)
    assert max_diff(onnx_prefix, prefix) <= 1e-4
    expected = generate(torch_runtime, prefix, options, stops, max_tokens)
    assert generate(onnx_runtime, onnx_prefix, options, stops, max_tokens) == expected
    if count == 8:
        assert len({len(ids) for ids in expected}) >= 2, expected


@pytest.mark.slow
def test_full_size_beam_identical(full_size_bundle, full_size_export):
    max_tokens = 8
    torch_runtime, pixels, stops = _full_size_inputs(full_size_bundle, 3, max_tokens)
    onnx_runtime = OnnxRuntime.from_path(full_size_export)
    options = DecodingOptions(strategy="beam", beam_size=4, max_tokens=max_tokens)
    expected = generate(torch_runtime, torch_runtime.encode(pixels), options, stops, max_tokens)
    assert generate(onnx_runtime, onnx_runtime.encode(pixels), options, stops, max_tokens) == expected
