"""moecompile: compile Hugging Face Mixture-of-Experts models into verified GGUF/ONNX files."""

__version__ = "0.1.0"
