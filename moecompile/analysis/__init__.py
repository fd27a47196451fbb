"""What the passes and targets measure on calibration data, kept apart from the IR rewrites.

calibration (the token batch every measurement runs on, built once per job), fitness (one
batched forward per expert-pruning candidate), eep (the evolutionary search), baselines (the
simple pruning methods' statistics), expert_plan (a pruning decision and the IR it rewrites
to), neurons (importance of an expert's neurons and the least-squares refit of what it
keeps), similarity (block and MoE-sublayer cosines), imatrix (mean squared matmul inputs),
sensitivity (KL of the output when some weights change) and allocate (the cheapest types, and
expert count and width, under a byte budget). None of them writes a file or knows a file
format.
"""
