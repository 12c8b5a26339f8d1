"""Deployable integer models: a fake-quantized dg-quant model as an ONNX QDQ graph.

``qdq`` turns the LSQ quantizers of a model into explicit integer weights and
quantize/dequantize steps (torch only); ``onnx`` writes, folds and verifies the ONNX file
(needs the ``onnx`` extra: ``pip install dg-quant[onnx]``).
"""
