"""Export of the inference nets for other runtimes (ONNX + onnxruntime)."""
