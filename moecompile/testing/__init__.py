"""What tests and benchmarks build models and measurements with (not used by the compiler).

models: tiny random-weight checkpoints of every family, trained tokenizers, the bundled
model's location, transformers' own logits as the numerical reference.
"""
