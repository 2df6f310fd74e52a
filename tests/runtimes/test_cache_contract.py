"""The `Runtime` cache contract (clipcap/runtimes/base.py), the same checks against every backend.

torch (transformers' DynamicCache), onnxruntime with the in-place and the concat decoder, and TensorRT
(marked `gpu`: skipped, with the reason, where the tensorrt package or a CUDA GPU is missing). A
runtime is compared only with itself: a second decode of the same rows, where the contract says it
must not matter what else ran in between. Rows then differ only by batch composition, so the bound
is fp32 accumulation order (kernels tile by batch size), 1e-4 of the logits' scale, as in
tests/test_batch_invariance.py; breaking the contract (a cache aliased by another decode, rows
selected wrongly) moves logits by their own scale.
"""
import importlib.util

import pytest
import torch

from clipcap.formats.model_bundle import load_bundle
from clipcap.runtimes.onnx_runtime import OnnxRuntime
from clipcap.runtimes.torch_runtime import TorchRuntime

_MISSING = [what for what, present in (("the tensorrt package", importlib.util.find_spec("tensorrt") is not None),
                                       ("a CUDA GPU", torch.cuda.is_available())) if not present]
needs_gpu = pytest.mark.skipif(bool(_MISSING), reason=f"needs tensorrt and a CUDA GPU; missing: {', '.join(_MISSING)}")
TENSORRT = pytest.param("tensorrt", marks=[pytest.mark.gpu, needs_gpu])


class AsTorch:
    """A runtime whose logits and embeddings come back as torch tensors (onnxruntime's on the CPU are numpy
    arrays; torch.from_numpy shares their memory, so what the contract says of them is still what is checked)."""

    def __init__(self, inner):
        self.inner, self.config, self.device = inner, inner.config, inner.device

    def new_cache(self, batch_size):
        return self.inner.new_cache(batch_size)

    def embed(self, token_ids):
        return torch.as_tensor(self.inner.embed(token_ids))

    def step(self, embeds, cache):
        logits, cache = self.inner.step(embeds, cache)
        return torch.as_tensor(logits), cache

    def select(self, cache, index):
        return self.inner.select(cache, index)


@pytest.fixture(scope="module", params=["torch", "onnxruntime-in-place", "onnxruntime-concat", TENSORRT])
def runtime(request):
    return AsTorch(_runtime(request))


def _runtime(request):
    if request.param == "torch":
        return TorchRuntime(load_bundle(request.getfixturevalue("tiny_bundle")).model)
    if request.param == "onnxruntime-in-place":
        return OnnxRuntime.from_path(request.getfixturevalue("tiny_export"))
    if request.param == "onnxruntime-concat":
        return OnnxRuntime.from_path(request.getfixturevalue("tiny_concat_export"))
    from clipcap.export.tensorrt import TensorRTBuildConfig, build_engines
    from clipcap.runtimes.tensorrt_runtime import TensorRTRuntime

    out = request.getfixturevalue("tmp_path_factory").mktemp("trt") / "contract"
    build_engines(TensorRTBuildConfig(request.getfixturevalue("tiny_concat_export"), out, max_batch=4, max_tokens=12))
    return TensorRTRuntime.from_path(out)


def prefix(runtime, rows: int, seed: int) -> torch.Tensor:
    embed = runtime.config.gpt2.n_embd
    length = runtime.config.mapper.prefix_length
    return torch.randn(rows, length, embed, generator=torch.Generator().manual_seed(seed)).to(runtime.device)


def tokens(rows: int, seed: int, steps: int = 3) -> torch.Tensor:
    return torch.randint(0, 40, (rows, steps), generator=torch.Generator().manual_seed(seed))


def decode(runtime, start: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits of the prefix step and of one step per column of `ids`."""
    logits, cache = runtime.step(start, runtime.new_cache(start.shape[0]))
    out = [logits]
    for column in ids.T:
        logits, cache = runtime.step(runtime.embed(column[:, None]), cache)
        out.append(logits)
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


def test_two_decodes_interleaved_on_one_runtime(runtime):
    """Caches share no memory: decodes A and B alternating their calls get what each gets alone."""
    a_start, b_start = prefix(runtime, 3, seed=0), prefix(runtime, 3, seed=1)  # same shapes: any shared memory shows
    a_ids, b_ids = tokens(3, seed=2), tokens(3, seed=3)
    alone_a, alone_b = decode(runtime, a_start, a_ids), decode(runtime, b_start, b_ids)
    a_logits, a_cache = runtime.step(a_start, runtime.new_cache(3))
    b_logits, b_cache = runtime.step(b_start, runtime.new_cache(3))
    interleaved_a, interleaved_b = [a_logits], [b_logits]
    for a_column, b_column in zip(a_ids.T, b_ids.T):
        a_logits, a_cache = runtime.step(runtime.embed(a_column[:, None]), a_cache)
        b_cache = runtime.select(b_cache, torch.arange(3))  # a select in between, too
        b_logits, b_cache = runtime.step(runtime.embed(b_column[:, None]), b_cache)
        interleaved_a.append(a_logits)
        interleaved_b.append(b_logits)
    for got, want in zip(interleaved_a + interleaved_b, alone_a + alone_b):
        assert_close(got, want)


def test_logits_belong_to_the_caller(runtime):
    """No later call overwrites logits already returned (they are not views of a reused buffer)."""
    start, ids = prefix(runtime, 3, seed=4), tokens(3, seed=5)
    logits, cache = runtime.step(start, runtime.new_cache(3))
    held = [(logits, logits.clone())]
    for column in ids.T:
        cache = runtime.select(cache, torch.tensor([2, 0, 1]))
        logits, cache = runtime.step(runtime.embed(column[:, None]), cache)
        held.append((logits, logits.clone()))
    decode(runtime, prefix(runtime, 3, seed=6), ids)  # another decode on the same runtime
    assert all(torch.equal(tensor, copy) for tensor, copy in held)


@pytest.mark.parametrize("index", [[2, 0, 2, 1], [1], [0, 0, 0, 0, 0, 0], [2, 1, 0]],
                         ids=["repeat", "drop", "expand", "reverse"])
def test_select_keeps_the_rows_asked_for(runtime, index):
    """After select(cache, index), the decode goes on as the decode of rows `index` from the start (twice)."""
    start, ids = prefix(runtime, 3, seed=7), tokens(3, seed=8, steps=3)
    index = torch.tensor(index)
    _, cache = runtime.step(start, runtime.new_cache(3))
    _, cache = runtime.step(runtime.embed(ids[:, :1]), cache)
    cache = runtime.select(cache, index)
    selected, cache = runtime.step(runtime.embed(ids[index, 1:2]), cache)
    cache = runtime.select(cache, torch.arange(index.numel()).flip(0))
    reselected, _ = runtime.step(runtime.embed(ids[index.flip(0), 2:]), cache)
    fresh = decode(runtime, start[index.to(start.device)], ids[index])
    assert_close(selected, fresh[2])
    assert_close(reselected, fresh[3].flip(0))


def test_inputs_are_only_read(runtime):
    start, index = prefix(runtime, 3, seed=9), torch.tensor([1, 1, 0])
    start_copy, index_copy = start.clone(), index.clone()
    _, cache = runtime.step(start, runtime.new_cache(3))
    runtime.select(cache, index)
    assert torch.equal(start, start_copy) and torch.equal(index, index_copy)


def test_whole_sequence_at_past_zero_is_the_cached_decode(runtime):
    """The no-cache baseline's call (every position at once, past 0) ends where the cached decode does."""
    start, ids = prefix(runtime, 2, seed=10), tokens(2, seed=11)
    whole, _ = runtime.step(torch.cat((start, runtime.embed(ids)), dim=1), runtime.new_cache(2))
    assert_close(whole, decode(runtime, start, ids)[-1])
