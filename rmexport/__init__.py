"""rmexport: training-free depth pruning (ReplaceMe) shipped as validated ONNX and GGUF."""

__version__ = "0.1.0"
