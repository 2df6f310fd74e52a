"""TensorRT: profiles (pure Python), the fp16 graph conversion, CLI and errors here; engines where a GPU is.

Engine building and the runtime need the `tensorrt` package and a CUDA GPU; those tests are marked
`gpu` and skipped, with that reason, elsewhere.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcap.captioner import Captioner
from clipcap.cli import main
from clipcap.config import BundleError
from clipcap.decoding import DecodingOptions, generate
from clipcap.export.fp16 import convert_graph_fp16
from clipcap.export.tensorrt import TensorRTBuildConfig, build_engines, compute_profiles
from clipcap.formats.graph_specs import BATCH, PAST, SEQUENCE, graph_specs
from clipcap.formats.model_bundle import load_bundle, load_config
from clipcap.formats.tensorrt_profiles import TENSORRT_DECODER, Profile
from clipcap.runtimes import RuntimeUnavailable
from clipcap.runtimes.torch_runtime import TorchRuntime
from conftest import random_images

ROOT = Path(__file__).resolve().parents[2]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
_MISSING = [what for what, present in (("the tensorrt package", HAS_TENSORRT), ("a CUDA GPU", torch.cuda.is_available()))
            if not present]
needs_gpu = pytest.mark.skipif(bool(_MISSING), reason=f"needs tensorrt and a CUDA GPU; missing here: {', '.join(_MISSING)}")


class RecordingRuntime(TorchRuntime):
    """The torch runtime, noting (batch, new tokens, past) of every decoder call."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def step(self, embeds, cache):
        self.calls.append((embeds.shape[0], embeds.shape[1], cache.length))
        return super().step(embeds, cache)


@pytest.mark.parametrize("options", [
    DecodingOptions(ignore_stop=True),
    DecodingOptions(strategy="beam", beam_size=5),
    DecodingOptions(strategy="nucleus", seed=0, ignore_stop=True),
    DecodingOptions(use_cache=False, ignore_stop=True),
], ids=["greedy", "beam", "nucleus", "no-cache"])
def test_profiles_cover_every_decoder_call(tiny_bundle, options):
    """Run the real decoding loops at the limits and check each decoder call fits the profile it will use."""
    model = load_bundle(tiny_bundle).model
    config = model.config
    max_batch, max_tokens = 4, 9
    profiles = compute_profiles(config, max_batch=max_batch, max_tokens=max_tokens, max_beam=5)
    spec = graph_specs(config, TENSORRT_DECODER)["decoder"]
    runtime = RecordingRuntime(model)
    pixels = torch.randn(max_batch, 3, 32, 32)
    generate(runtime, runtime.encode(pixels), options.replace(max_tokens=max_tokens),
             config.tokenizer.stop_token_ids, max_tokens)
    assert runtime.calls
    by_name = {p.name: p for p in profiles["decoder"]}
    for batch, length, past in runtime.calls:
        shapes = {t.name: spec.shape(t, {BATCH: batch, SEQUENCE: length, PAST: past}) for t in spec.inputs}
        # The runtime asks for "prefix" when past is 0 and for "token" otherwise.
        assert by_name["prefix" if past == 0 else "token"].fits(shapes), (batch, length, past)
    if options.strategy == "greedy" and options.use_cache:
        longest = max(past + length for _, length, past in runtime.calls)
        token_max = by_name["token"].shapes["attention_mask"][2][1]
        assert longest == token_max  # tight: the profile is no larger than the loop needs


def test_profile_bounds_are_ordered_and_named(tiny_bundle):
    config = load_config(tiny_bundle)
    profiles = compute_profiles(config, max_batch=8, max_tokens=20, max_beam=3, opt_batch=2)
    prefix = config.mapper.prefix_length
    for graph, graph_profiles in profiles.items():
        names = graph_specs(config, TENSORRT_DECODER)[graph].input_names
        for profile in graph_profiles:
            assert list(profile.shapes) == names
            for low, opt, high in profile.shapes.values():
                assert all(a <= b <= c for a, b, c in zip(low, opt, high))
    prefix_profile, token_profile = profiles["decoder"]
    assert prefix_profile.shapes["past_key_values.0.key"][2][2] == 0  # past 0 only
    assert prefix_profile.shapes["inputs_embeds"][0][1] == prefix
    assert token_profile.shapes["inputs_embeds"][2][:2] == (24, 1)  # 8 images x beam 3, one token
    assert token_profile.shapes["past_key_values.0.key"][0][2] == prefix
    assert token_profile.shapes["past_key_values.0.key"][2][2] == prefix + 20 - 2
    assert profiles["encoder"][0].shapes["pixel_values"] == ((1, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32))
    assert Profile.from_dict(token_profile.to_dict()) == token_profile
    sizes = token_profile.max_sizes(graph_specs(config, TENSORRT_DECODER)["decoder"])
    assert sizes[BATCH] == 24 and sizes[PAST] == prefix + 18


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": 0}, "max_batch must be >= 1"),
    ({"max_batch": 2, "max_tokens": 61}, "max_tokens must be in 1..60"),
    ({"max_batch": 2, "opt_batch": 3}, "opt_batch must be in 1..max_batch"),
    ({"max_batch": 2, "max_beam": 0}, "max_beam must be >= 1"),
])
def test_profile_limits_refused(tiny_bundle, kwargs, message):
    with pytest.raises(BundleError, match=message):
        compute_profiles(load_config(tiny_bundle), **kwargs)


def test_fp16_graphs_keep_fp32_io_and_stay_close(tiny_concat_export, tmp_path):
    """The graphs a --fp16 build parses. onnxruntime's CPU graph optimiser crashes on the fp16 encoder
    (a known gap of its fp16 CPU kernels), so they run here with optimisations off.
    Measured max abs diff vs fp32: decoder 1.7e-3 (outputs up to 6), encoder 4.1e-3 (outputs up to 12)."""
    import onnxruntime as ort

    specs = graph_specs(load_config(tiny_concat_export), TENSORRT_DECODER)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for name, spec in specs.items():
        target = tmp_path / f"{name}.fp16.onnx"
        convert_graph_fp16(tiny_concat_export / spec.file, target)
        fp16 = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        fp32 = ort.InferenceSession(str(tiny_concat_export / spec.file), options, providers=["CPUExecutionProvider"])
        assert [i.type for i in fp16.get_inputs()] == [i.type for i in fp32.get_inputs()]
        feeds = {k: v.numpy() for k, v in spec.example_inputs().items()}
        for want, got in zip(fp32.run(None, feeds), fp16.run(None, feeds)):
            assert got.dtype == np.float32
            assert np.abs(want - got).max() <= 2e-2 * max(1.0, np.abs(want).max()), name


def test_print_profiles_without_tensorrt(tiny_concat_export):
    result = subprocess.run([sys.executable, str(ROOT / "export" / "to_tensorrt.py"), str(tiny_concat_export),
                             "--print-profiles", "--max-batch", "2", "--max-tokens", "5"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "decoder  token   past_key_values.0.key      min [1, 1, 4, 64] opt [2, 1, 5, 64] max [10, 1, 7, 64]" \
        in result.stdout


def test_script_needs_out(tiny_concat_export):
    result = subprocess.run([sys.executable, str(ROOT / "export" / "to_tensorrt.py"), str(tiny_concat_export)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "--out is required" in result.stderr


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here: the missing-package message cannot show")
def test_missing_tensorrt_is_a_clear_error(tiny_concat_export, tmp_path, capsys):
    with pytest.raises(RuntimeUnavailable, match="pip install tensorrt"):
        build_engines(TensorRTBuildConfig(tiny_concat_export, tmp_path / "trt"))
    with pytest.raises(RuntimeUnavailable, match="pip install tensorrt"):
        Captioner.from_path(tiny_concat_export, backend="tensorrt", device="cuda")
    assert main(["caption", str(tiny_concat_export), "x.png", "--backend", "tensorrt", "--device", "cuda"]) == 2
    assert "tensorrt Python package is not installed" in capsys.readouterr().err
    result = subprocess.run([sys.executable, str(ROOT / "export" / "to_tensorrt.py"), str(tiny_concat_export),
                             "--out", str(tmp_path / "trt")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "pip install tensorrt" in result.stderr
    assert not (tmp_path / "trt").exists()


# ---------------------------------------------------------------------------------------------
# Where tensorrt and a GPU exist.


@pytest.fixture(scope="module")
def tiny_engines(tiny_concat_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "tiny-trt"
    build_engines(TensorRTBuildConfig(tiny_concat_export, out, max_batch=8, max_tokens=24))
    return out


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("count", [1, 8])
def test_engines_greedy_identical_to_torch(tiny_bundle, tiny_engines, count):
    images = random_images(count, seed=3)
    expected = Captioner.from_path(tiny_bundle).caption_images(images).captions
    got = Captioner.from_path(tiny_engines, backend="tensorrt", device="cuda").caption_images(images).captions
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert (tiny_engines / "profiles.json").is_file() and (tiny_engines / "timing.cache").is_file()
    parity = json.loads((tiny_engines / "profiles.json").read_text())["decoding_parity"]
    assert parity["images"] == 4 and parity["greedy"]["identical"] and parity["beam"]["identical"]


@pytest.mark.gpu
@needs_gpu
def test_engines_beam_identical_to_torch(tiny_bundle, tiny_engines):
    images = random_images(8, seed=5)
    options = DecodingOptions(strategy="beam", beam_size=5, max_tokens=12)
    expected = Captioner.from_path(tiny_bundle).caption_images(images, options).captions
    got = Captioner.from_path(tiny_engines, backend="tensorrt", device="cuda").caption_images(images, options).captions
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]


@pytest.mark.gpu
@needs_gpu
def test_engines_refuse_shapes_outside_profiles(tiny_engines):
    captioner = Captioner.from_path(tiny_engines, backend="tensorrt", device="cuda")
    with pytest.raises(RuntimeUnavailable, match="rebuild with larger --max-batch"):
        captioner.caption_images(random_images(9))


@pytest.mark.gpu
@needs_gpu
def test_fp16_engines_caption(tiny_bundle, tiny_concat_export, tmp_path):
    out = tmp_path / "fp16"
    record = build_engines(TensorRTBuildConfig(tiny_bundle, out, fp16=True, max_batch=4, max_tokens=24))
    assert record["precision"] == "fp16" and record["decoding_parity"]["greedy"]["captions_identical"] >= 3
    images = random_images(4, seed=3)
    expected = Captioner.from_path(tiny_bundle).caption_images(images).captions
    got = Captioner.from_path(out, backend="tensorrt", device="cuda").caption_images(images).captions
    agreement = np.mean([a.token_ids == b.token_ids for a, b in zip(got, expected)])
    assert agreement >= 0.75, agreement  # fp16: near-ties may flip; report, don't demand exactness
