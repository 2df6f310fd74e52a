"""Builders of deployment artefacts from a model bundle: ONNX graphs with parity checks (`onnx`),
int8 siblings (`int8`), TensorRT engines (`tensorrt`) and TorchServe archives (`mar`).

The stage scripts in export/ and serving/build_mar.py call these; the formats they write live in
clipcap.formats, which the runtimes read without importing anything from here.
"""
