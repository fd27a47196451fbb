"""What an ONNX decoder file holds, read back for `moecompile verify`: its interface, and the
weight types of the IR tensors it quantizes. moecompile's blocked int8/int4 weights are named
by IR path (`<path>.q` behind a DequantizeLinear; `<layer>.fc1.q`/`.fc2.q` of a fused QMoE), so
their types map back to the checkpoint; a quantization this reader cannot map (another tool's
MatMulNBits, say) is refused, since the reference could not compute the file's numbers."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
from onnx import TensorProto

from moecompile import ir
from moecompile.errors import UserError

REQUIRED_INPUTS = ("input_ids", "attention_mask", "position_ids")
QUANTIZING_OPS = {"DequantizeLinear", "QMoE", "MatMulNBits", "MatMulInteger", "QLinearMatMul",
                  "DynamicQuantizeLinear", "GatherBlockQuantized"}
_FUSED = re.compile(r"(blocks\.\d+\.ffn)\.(fc1|fc2)\.q$")


def read_types(path: Path, model: ir.Model) -> dict[str, str]:
    """IR path -> "int4" | "int8" for every weight the file quantizes (others are float32);
    refused (UserError) when the file is not a decoder with the interface moecompile, optimum
    and onnxruntime-genai use, or quantizes weights it cannot map to the checkpoint."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx's parse errors have no common type
        raise UserError(f"{path.name}: not a readable ONNX file ({exc})") from None
    inputs = {i.name for i in proto.graph.input}
    missing = [n for n in REQUIRED_INPUTS if n not in inputs]
    if missing or not any(n.startswith("past_key_values.") for n in inputs) or \
            "logits" not in {o.name for o in proto.graph.output}:
        raise UserError(f"{path.name}: not a decoder with the input_ids, attention_mask, "
                        "position_ids, past_key_values.* -> logits interface")
    initializers = {t.name: t for t in proto.graph.initializer}
    paths = set(model.tensor_map())
    types: dict[str, str] = {}
    unmapped: list[str] = []
    for node in proto.graph.node:
        if node.op_type not in QUANTIZING_OPS:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0].endswith(".q") and \
                node.input[0][:-2] in paths and node.input[0] in initializers:
            kind = "int4" if initializers[node.input[0]].data_type == TensorProto.INT4 else "int8"
            types[node.input[0][:-2]] = kind
        elif node.op_type == "QMoE" and all(_FUSED.match(n) for n in node.input[2:6:3]):
            bits = next(a.i for a in node.attribute if a.name == "expert_weight_bits")
            layer = _FUSED.match(node.input[2]).group(1)
            for p in paths:
                if p.startswith(layer + ".experts."):
                    types[p] = f"int{bits}"
        else:
            unmapped.append(f"{node.op_type} {node.name or node.output[0]}")
    if unmapped:
        raise UserError(f"{path.name}: quantized weights this verifier cannot map to the "
                        f"checkpoint ({len(unmapped)}, e.g. {unmapped[0]}); it reads float "
                        "ONNX files and moecompile's int8/int4 layouts")
    return types
