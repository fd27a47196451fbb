"""The importance matrix in llama.cpp's form: one vector per GGUF tensor, and the file.

A layer's experts are one stacked GGUF tensor, so its vector is the experts' vectors
concatenated (ne[0] * E values); an expert no calibration token reached gets uniform
importance. `write_dat` saves it in llama-imatrix's classic binary format, which
llama-quantize reads with `--imatrix FILE`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from moecompile.analysis.imatrix import Importance


def by_tensor(planned: list, importance: Importance) -> dict[str, np.ndarray]:
    """GGUF tensor name -> importance vector, for the quantizable tensors of `planned`
    (writer.plan entries)."""
    out = {}
    for t in planned:
        vectors = []
        for path, part in zip(t.paths, t.parts):
            mean = importance.mean(path)
            vectors.append(np.ones(part.shape[-1], dtype=np.float32) if mean is None else mean)
        out[t.name] = np.concatenate(vectors).astype(np.float32)
    return out


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
