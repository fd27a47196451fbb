"""Importance matrix from the reference executor, in the form llama.cpp's quantizer takes.

For every quantizable weight, the mean over calibration tokens of the squared input of each
column (x_j^2): llama.cpp weights the rounding error of column j by it, which is what makes
low-bit k-quants and i-quants usable. A layer's experts are one stacked GGUF tensor, so its
vector is the experts' vectors concatenated (ne[0] * E values), each averaged over the tokens
routed to that expert — an expert no calibration token reached gets uniform importance.

`write_dat` saves it in llama-imatrix's classic binary format, which llama-quantize reads with
`--imatrix FILE`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from moecompile import ir
from moecompile.runtime.executor import ReferenceExecutor

from .calib import CalibSet
from .quantize import slots


@torch.no_grad()
def collect(model: ir.Model, calib: CalibSet, device: str = "cpu") -> tuple[dict[str, np.ndarray], int]:
    """GGUF tensor name -> importance vector, and the number of calibration sequences used."""
    quantizable = [s for s in slots(model) if s.quantizable]
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    wanted = {id(part) for s in quantizable for part in s.parts}

    def record(weight: ir.Tensor, x: torch.Tensor) -> torch.Tensor:
        key = id(weight)
        if key in wanted and x.numel():
            flat = x.reshape(-1, x.shape[-1]).double()
            sums[key] = sums.get(key, 0) + flat.pow(2).sum(0)
            counts[key] = counts.get(key, 0) + flat.shape[0]
        return x

    ex = ReferenceExecutor(model, device, input_fn=record)
    for row in range(calib.n_examples):  # one sequence at a time: padding never counts
        n = int(calib.mask[row].sum())
        ex.logits(calib.ids[row:row + 1, :n])
    out = {}
    for s in quantizable:
        vectors = []
        for part in s.parts:
            columns = part.shape[-1]
            if counts.get(id(part)):
                vectors.append((sums[id(part)] / counts[id(part)]).float().cpu().numpy())
            else:
                vectors.append(np.ones(columns, dtype=np.float32))
        out[s.name] = np.concatenate(vectors).astype(np.float32)
    return out, calib.n_examples


def write_dat(path: Path, imatrix: dict[str, np.ndarray], n_calls: int,
              dataset: str = "moecompile calibration") -> None:
    """llama-imatrix's classic format: entries of (name, ncall, values * ncall), then the chunk
    count and the dataset name."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(imatrix)))
        for name, values in imatrix.items():
            encoded = name.encode()
            f.write(struct.pack("<i", len(encoded)))
            f.write(encoded)
            f.write(struct.pack("<ii", n_calls, values.size))
            (np.asarray(values, dtype=np.float32) * n_calls).astype("<f4").tofile(f)
        f.write(struct.pack("<i", n_calls))
        encoded = dataset.encode()
        f.write(struct.pack("<i", len(encoded)))
        f.write(encoded)


def read_dat(path: Path) -> dict[str, np.ndarray]:
    """Read the classic format back (mean values), e.g. to check a written file."""
    data = Path(path).read_bytes()
    (n,), pos = struct.unpack_from("<i", data), 4
    out = {}
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, pos)
        pos += 4
        name = data[pos:pos + length].decode()
        pos += length
        ncall, nval = struct.unpack_from("<ii", data, pos)
        pos += 8
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos)
        pos += 4 * nval
        out[name] = values / max(ncall, 1)
    return out
