"""fp16 graphs for GPU serving: one fp32 ONNX graph -> fp16 weights and compute, fp32 inputs and outputs.

`convert_graph_fp16` is onnxruntime's float16 converter with the graph's inputs and outputs kept
fp32 (casts inside), so the runtimes bind the same buffers as for fp32 (the decoder's in-place KV
cache included), and LayerNorm kept fp32: fp16 LayerNorm over 768 channels overflows (TensorRT
warns the same). It serves both the fp16 export sibling (`export/quantize.py --method fp16`, for
onnxruntime's CUDA provider) and TensorRT's `--fp16` build.
"""
from __future__ import annotations

from pathlib import Path

FP16_KEPT_FP32 = ["LayerNormalization"]  # op types left fp32 (besides the converter's own block list)


def convert_graph_fp16(source: Path, target: Path, external: bool = False) -> dict:
    """fp32 ONNX -> fp16 ONNX with fp32 inputs/outputs; returns what the manifest records of it.

    `external`: write the weights to `target.data` (graphs past protobuf's 2 GiB)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True,
                                     op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEPT_FP32)
    graph = OnnxModel(model)
    graph.topological_sort()  # the converter appends its input casts after their users
    onnx.save(graph.model, str(target), save_as_external_data=external,
              location=Path(target).name + ".data" if external else None)
    onnx.checker.check_model(str(target))
    weights = [w.data_type for w in graph.model.graph.initializer if w.data_type in (onnx.TensorProto.FLOAT,
                                                                                     onnx.TensorProto.FLOAT16)]
    return {"method": "onnxruntime float16 converter", "weights": "fp16", "io": "fp32",
            "kept_fp32": FP16_KEPT_FP32, "fp16_initializers": weights.count(onnx.TensorProto.FLOAT16),
            "fp32_initializers": weights.count(onnx.TensorProto.FLOAT)}
