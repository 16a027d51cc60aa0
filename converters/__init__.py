"""Writers that turn an ordinary HF checkpoint into deployables (ONNX, GGUF)."""
