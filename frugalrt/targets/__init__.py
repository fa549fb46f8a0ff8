"""Compile targets: registry, ONNX import, TVM kernels and artifacts (TVM is imported lazily)."""
