"""llama.cpp's GGUF: the target (target.py) and what it is made of."""
