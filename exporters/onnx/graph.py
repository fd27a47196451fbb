"""A small ONNX graph writer: uniquely named nodes, cached constants, and weights that are either
kept in the model or streamed to one external data file as they are produced.

Why not build the proto with `onnx.save_model(..., save_as_external_data=True)`: that needs
every weight in memory at once inside a ModelProto (and appends to a stale data file). Here each
weight is written to the data file the moment it is computed, at a 4 KiB-aligned offset so ONNX
Runtime can memory-map it, and the proto holds only its location.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # int4 DequantizeLinear with block_size, ScatterND add, axes as inputs
MS_OPSET = 1  # com.microsoft contrib ops (MoE, QMoE)
IR_VERSION = 10  # the newest IR that ONNX Runtime 1.20+ loads (onnx 1.23 would write 14)
ALIGN = 4096
INLINE_BELOW = 1024  # small tensors (shapes, axes) stay in the proto: ORT's shape inference
# cannot read them from external data


class Graph:
    def __init__(self, data: BinaryIO | None = None, location: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data, self.location = data, location
        self.written: list[dict] = []  # name, type, shape, bytes of every weight, for reports
        self._count: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    @property
    def weight_bytes(self) -> int:
        return sum(w["bytes"] for w in self.written)

    def fresh(self, hint: str) -> str:
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def op(self, op_type: str, *inputs: str, name: str | None = None, outputs: int | list[str] = 1,
           domain: str = "", **attrs):
        """Add a node; returns its output name (or names when there are several)."""
        base = name or op_type.lower()
        outs = ([self.fresh(base) for _ in range(outputs)] if isinstance(outputs, int)
                else list(outputs))
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{base}/op"),
                                           domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shape, axes, scalar), shared by every node that uses the same one."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, array: np.ndarray, data_type: int | None = None,
               shape: tuple[int, ...] | None = None) -> str:
        """A weight initializer. `data_type`/`shape` describe packed data (INT4: two values a
        byte, low nibble first) whose bytes are `array`; otherwise the array's own."""
        name = self.fresh(name)
        array = np.ascontiguousarray(array)
        external = self.data is not None and array.nbytes >= INLINE_BELOW
        if data_type is None and not external:
            tensor = numpy_helper.from_array(array, name)
        else:
            tensor = TensorProto(name=name, dims=list(array.shape if shape is None else shape),
                                 data_type=(helper.np_dtype_to_tensor_dtype(array.dtype)
                                            if data_type is None else data_type))
            if external:
                self._write_external(tensor, array)
            else:
                tensor.raw_data = array.tobytes()
        self.initializers.append(tensor)
        self.written.append({"name": name, "type": TensorProto.DataType.Name(tensor.data_type),
                             "shape": list(tensor.dims), "bytes": array.nbytes})
        return name

    def _write_external(self, tensor: TensorProto, array: np.ndarray) -> None:
        pad = -self.data.tell() % ALIGN
        self.data.write(b"\0" * pad)
        offset = self.data.tell()
        self.data.write(memoryview(array).cast("B"))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)

    def model(self, inputs, outputs, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "moecompile", inputs, outputs, self.initializers)
        model = helper.make_model(graph, producer_name="moecompile", doc_string=doc,
                                  opset_imports=[helper.make_opsetid("", OPSET),
                                                 helper.make_opsetid("com.microsoft", MS_OPSET)])
        model.ir_version = IR_VERSION
        return model
