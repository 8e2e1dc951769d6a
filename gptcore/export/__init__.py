"""ONNX export: the LM and classifier graphs, parity with PyTorch, fusion and precision variants, the
model package."""
