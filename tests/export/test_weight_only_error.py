"""Weight-only quantisation (MatMulNBits) moves a linear's outputs by no more than its rounding allows.

The mechanism, per output n of y = x @ W (reduction over k, blocks b of `block_size` rows of W):
- weights: each block of a column has one scale s[b, n] (read from the quantised graph); symmetric
  rounding to the nearest level moves a weight by <= s/2, and the one level lost to the signed range
  (int4: -8..7, int8: -128..127) by <= s: |dW[k, n]| <= s[b(k), n];
- activations (accuracy_level 4 only): the kernel rounds x to int8 per block with scale
  max|x_block| / 127, so |dx[k]| <= max|x| / 254 (the whole row's max bounds every block's);
- fp32 accumulation of the rest: K * 2^-23 relative to sum |x| |W|, doubled for the rescaling.
So |dy[n]| <= sum_k |x_k| s[b(k), n] + (max|x| / 254) sum_k (|W[k, n]| + s[b(k), n]) + 2 K eps sum_k |x_k| |W[k, n]|.
Nothing here depends on the CPU's int8 kernels (VNNI, AMX, AVX2) or on the thread count: every kernel
computes this arithmetic, exactly in integers then rescaled in fp32.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from clipcap.export.quantize import QuantizeConfig, quantize_weight_only

FP32_EPS = 2.0 ** -23


def _linear_graph(weight: np.ndarray, path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", weight.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", weight.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "linear", [x], [y],
                              [numpy_helper.from_array(weight, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _block_scales(path, rows: int, block_size: int) -> np.ndarray:
    """|scale| per weight, (K, N), from the MatMulNBits node's scales initializer ((N, K blocks) or flat)."""
    model = onnx.load(str(path))
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    columns = next(a.i for a in node.attribute if a.name == "N")
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = np.abs(initializers[node.input[2]].astype(np.float64)).reshape(columns, -1)  # (N, K blocks)
    return np.repeat(scales.T, block_size, axis=0)[:rows]  # (K, N)


def logit_error_bound(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, int8_activations: bool) -> np.ndarray:
    """Per output bound (rows, N) on |quantised - fp32| for y = x @ weight; see the module docstring."""
    x, weight = np.abs(x.astype(np.float64)), np.abs(weight.astype(np.float64))
    bound = x @ scales
    if int8_activations:
        bound += x.max(axis=1, keepdims=True) / 254 * (weight + scales).sum(axis=0)
    return bound + 2 * weight.shape[0] * FP32_EPS * (x @ (weight + scales))


@pytest.mark.parametrize("threads", [1, 2])
@settings(max_examples=12, deadline=None)
@given(bits=st.sampled_from([4, 8]), block_size=st.sampled_from([16, 32, 128]),
       accuracy_level=st.sampled_from([0, 4]), blocks=st.integers(1, 4), columns=st.integers(2, 48),
       x_scale=st.sampled_from([0.1, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_weight_only_logits_within_rounding_bound(tmp_path_factory, threads, bits, block_size, accuracy_level,
                                                  blocks, columns, x_scale, seed):
    rng = np.random.default_rng(seed)
    rows = blocks * block_size - int(rng.integers(0, 8))  # a ragged last block too
    weight = (rng.standard_normal((rows, columns)) * rng.uniform(0.01, 0.5, columns)).astype(np.float32)
    x = (rng.standard_normal((5, rows)) * x_scale).astype(np.float32)
    x[0, : rows // 3] *= 40  # an outlier run: one block's activation scale far above the others
    folder = tmp_path_factory.mktemp("wo")
    _linear_graph(weight, folder / "fp32.onnx")
    config = QuantizeConfig(folder, method=f"int{bits}-wo", block_size=block_size, accuracy_level=accuracy_level)
    record = quantize_weight_only(folder / "fp32.onnx", folder / "q.onnx", config)
    assert record["matmuls_quantized"] == 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "q.onnx"), options, providers=["CPUExecutionProvider"])
    quantized = session.run(None, {"x": x})[0].astype(np.float64)
    exact = x.astype(np.float64) @ weight.astype(np.float64)
    bound = logit_error_bound(x, weight, _block_scales(folder / "q.onnx", rows, block_size), accuracy_level == 4)
    assert np.all(np.abs(quantized - exact) <= bound), float((np.abs(quantized - exact) / bound).max())
    # The top-1 output survives wherever fp32's margin exceeds twice the largest bound in the row.
    ordered = np.sort(exact, axis=1)
    safe = ordered[:, -1] - ordered[:, -2] > 2 * bound.max(axis=1)
    assert np.array_equal(quantized.argmax(axis=1)[safe], exact.argmax(axis=1)[safe])


def test_bound_is_tight_for_single_weights(tmp_path):
    """The bound is not vacuous: one-hot rows read single dequantised weights, whose rounding errors
    reach close to s/2 somewhere (a kernel with a wrong scale or a lost level would exceed s)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    x = np.eye(64, dtype=np.float32)
    _linear_graph(weight, tmp_path / "fp32.onnx")
    config = QuantizeConfig(tmp_path, method="int4-wo", block_size=32, accuracy_level=0)
    quantize_weight_only(tmp_path / "fp32.onnx", tmp_path / "q.onnx", config)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    error = np.abs(session.run(None, {"x": x})[0].astype(np.float64) - weight)  # |dW| itself
    scales = _block_scales(tmp_path / "q.onnx", 64, 32)
    assert np.all(error <= scales * (1 + 1e-6)) and (error / scales).max() > 0.4
