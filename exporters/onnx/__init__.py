"""ONNX Runtime's ONNX: the target (target.py) and what it is made of."""
