"""Models: loading a backbone safely, the torch and ONNX embedders, export."""
