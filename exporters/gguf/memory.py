"""What a llama.cpp process will hold for a model: the GGUF target's memory model.

The prediction is the resident memory a process gains by loading the model with
llama-cpp-python 0.3.36's defaults (CPU, flash attention off, F16 KV cache, n_batch = n_ubatch =
min(512, context), memory-mapped weights) and decoding a full context. One term per allocation
llama.cpp makes (docs/memory_model.md derives each and gives the measurements that check them):

- weights: the GGUF's tensor bytes, exactly, counted once (see `memory`);
- KV cache: 2 bytes x (K and V) x cells x layers x KV heads x head size, the context rounded up
  to llama.cpp's 256 cells;
- compute buffer: the activations of the worst-case micro-batch, as llama.cpp reports it ("CPU
  compute buffer size"); a formula fitted to that report (`compute_bytes`);
- work buffer: ggml-cpu's scratch for converting matmul inputs, not part of that report
  (`work_bytes`);
- runtime: the graphs' metadata, the tokenizer's Unicode table, llama-cpp-python's batch, the
  vocabulary, and a measured constant for llama.cpp's code pages (`runtime_bytes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moecompile import ir
from moecompile.sizes import format_size

UBATCH = 512  # llama-cpp-python's n_batch and n_ubatch (capped at the context)
KV_BYTES = 2  # F16 cache entries, llama.cpp's default
KV_PAD = 256
PAGE = 4096
# ggml-cpu converts a matmul's F32 activations to the weights' dot-product type in its work
# buffer: F16/BF16 (2 bytes an element) for F16/BF16 and the F16 V cache, Q8_0/Q8_K (~1.1) for
# quantized weights, nothing for F32. The prediction takes the widest, 2.
CONVERT_BYTES = 2
MMID_ROW_BYTES = 8  # ggml-cpu's mmid_row_mapping: (expert slot, token) as two int32
# llama_context::graph_max_nodes: max(1024, 8 x the model's tensors); it keeps two graphs (the
# reserved one and the last one built), each with ggml_tensor_overhead() = 368 bytes per node
# plus the cgraph's node/leaf pointers (16) and a hash set of ~2 slots per node (2 x 12.125).
GRAPH_MIN_NODES = 1024
GRAPH_NODES_PER_TENSOR = 8
GRAPH_BYTES_PER_NODE = 368 + 16 + 25
GRAPHS = 2
UNICODE_FLAGS_BYTES = 0x110000 * 2  # unicode_cpt_flags_from_cpt's table: 2 bytes a code point
# Measured (docs/memory_model.md): resident bytes per vocabulary entry (llama.cpp's token and
# merge tables, the metadata strings llama-cpp-python reads back), and the rest of the process's
# growth that no allocation above explains (~2.9 MB of llama.cpp and libstdc++ code pages
# touched by a load and a decode, plus small heap and thread allocations).
VOCAB_ENTRY_BYTES = 200
RUNTIME_FIXED_BYTES = 3 * 2**20


@dataclass
class Memory:
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    work_bytes: int
    runtime_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.work_bytes
                + self.runtime_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}

    def describe(self, context: int) -> str:
        """The breakdown for messages: 'weights … + KV cache … for --ctx N + …'."""
        return (f"weights {format_size(self.weights_bytes)} + KV cache "
                f"{format_size(self.kv_cache_bytes)} for --ctx {context} + compute buffer "
                f"{format_size(self.compute_bytes)} + work buffer {format_size(self.work_bytes)}"
                f" + runtime {format_size(self.runtime_bytes)}")


def kv_cells(context: int) -> int:
    """llama.cpp rounds the KV cache up to a multiple of 256 cells."""
    return -(-context // KV_PAD) * KV_PAD


def ubatch(context: int) -> int:
    """Tokens in the largest micro-batch: llama-cpp-python caps n_batch and n_ubatch at n_ctx."""
    return min(UBATCH, context)


def kv_cache_bytes(model: ir.Model, context: int) -> int:
    cells = kv_cells(context)
    return sum(KV_BYTES * 2 * cells * b.attn.n_kv_heads * b.attn.head_dim for b in model.blocks)


def _ffn_width(block: ir.Block) -> int:
    """Active FFN rows per token: top-k experts' plus the shared expert's, or the dense MLP's."""
    if isinstance(block.ffn, ir.MoE):
        width = block.ffn.top_k * block.ffn.experts[0].gate.shape[0]
        if block.ffn.shared is not None:
            width += block.ffn.shared.mlp.gate.shape[0]
        return width
    return block.ffn.mlp.gate.shape[0] if block.ffn is not None else 0


def compute_bytes(model: ir.Model, context: int) -> int:
    """llama.cpp's reported CPU compute buffer, a fit to that report (flash attention off): the
    attention scores and mask, 4 bytes x ubatch x cells x (heads + 1), plus the widest per-token
    activation, 4 bytes x ubatch x max(vocab, 2 x (active FFN + hidden)). Within a few % of the
    report on Mixtral-like shapes; docs/memory_model.md lists where it is further off."""
    heads = max(b.attn.n_heads for b in model.blocks)
    widest = max([model.vocab] + [2 * (_ffn_width(b) + model.hidden) for b in model.blocks])
    return 4 * ubatch(context) * (kv_cells(context) * (heads + 1) + widest)


def _matmul_work(block: ir.Block, hidden: int, ub: int) -> int:
    """The largest work-buffer need of one FFN's matmuls (ggml_graph_plan): the converted input
    (the hidden state into gate/up, the FFN activations into down; top-k of them for the
    experts) and, for the experts' MUL_MAT_ID, one (slot, token) mapping per expert x slot x
    token."""
    ffn = block.ffn
    if ffn is None:
        return 0
    mlps = [ffn.mlp] if isinstance(ffn, ir.Dense) else [ffn.shared.mlp] if ffn.shared else []
    need = max((CONVERT_BYTES * ub * max(hidden, m.gate.shape[0]) for m in mlps), default=0)
    if isinstance(ffn, ir.MoE):
        width = max(hidden, ffn.top_k * ffn.experts[0].gate.shape[0])
        need = max(need, CONVERT_BYTES * ub * width
                   + MMID_ROW_BYTES * ffn.n_experts * ffn.top_k * ub)
    return need


def work_bytes(model: ir.Model, context: int) -> int:
    """ggml-cpu's work buffer, kept at its largest size since it is reallocated only to grow. It
    is the most any one node needs; with the F16 KV cache that is usually KQ·V, whose F32
    attention probabilities (ubatch x cells x heads) are converted to F16 to meet V. Not in
    llama.cpp's compute-buffer report, but resident once a full context has been decoded."""
    ub = ubatch(context)
    attention = max(CONVERT_BYTES * ub * kv_cells(context) * b.attn.n_heads for b in model.blocks)
    return max([attention] + [_matmul_work(b, model.hidden, ub) for b in model.blocks])


def gguf_tensor_count(model: ir.Model) -> int:
    """Tensors in the GGUF: the IR's, with each layer's experts stacked into three."""
    stacked = sum(3 * (b.ffn.n_experts - 1) for b in model.blocks if isinstance(b.ffn, ir.MoE))
    return len(model.tensors()) - stacked


def runtime_bytes(model: ir.Model, context: int) -> int:
    """Host memory beside the buffers: the two graphs' metadata, the Unicode flag table the
    tokenizer builds once per process, llama-cpp-python's llama_batch (n_batch sequence-id
    arrays of n_ctx int32, of which only the first element is written: at most a page each), the
    vocabulary, and the measured constant."""
    nodes = max(GRAPH_MIN_NODES, GRAPH_NODES_PER_TENSOR * gguf_tensor_count(model))
    batch = ubatch(context) * min(4 * context, PAGE)
    return (GRAPHS * GRAPH_BYTES_PER_NODE * nodes + UNICODE_FLAGS_BYTES + batch
            + VOCAB_ENTRY_BYTES * model.vocab + RUNTIME_FIXED_BYTES)


def memory(model: ir.Model, weights_bytes: int, context: int) -> Memory:
    """Weights are counted once. With memory-mapped weights (the default), tensors llama.cpp
    repacks for its CPU kernels (which types depends on the CPU: Q4_K, not Q8_0, on x86-64 with
    AVX2) are copied to anonymous memory and their file pages also stay mapped until the kernel
    reclaims them: clean page cache that is never read again, so not counted (use_mmap=False
    avoids it)."""
    return Memory(weights_bytes, kv_cache_bytes(model, context), compute_bytes(model, context),
                  work_bytes(model, context), runtime_bytes(model, context))


def context_bytes(model: ir.Model, context: int) -> int:
    """Everything but the weights: what a --budget must leave beside them."""
    return memory(model, 0, context).total_bytes
