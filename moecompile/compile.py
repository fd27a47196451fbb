"""The compile job: IR → export under a temporary name → verify → rename → report.

The output path only ever holds a complete, verified file (or, with --no-verify, a complete
one). A failed verification keeps the file as `OUT.FAILED.gguf` for inspection. Any error or
Ctrl-C removes the temporary file, so nothing half-written is left behind.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, ir
from .errors import UserError
from .verify import VerifyResult, verify_gguf

log = logging.getLogger("moecompile")


@dataclass
class CompileResult:
    output: Path
    report_path: Path
    report: dict = field(default_factory=dict)
    verification: VerifyResult | None = None

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed

    def summary(self) -> str:
        r = self.report
        lines = [f"wrote {self.output} ({r['arch']}, {r['tensor_bytes'] / 2**20:.1f} MiB of "
                 f"tensors, {len(r['tensors'])} tensors)"]
        if self.verification is not None:
            lines.append("verify " + self.verification.summary())
        else:
            lines.append("verification skipped (--no-verify)")
        lines.append(f"report {self.report_path}")
        return "\n".join(lines)


def _temp_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = _temp_path(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def compile_gguf(model: ir.Model, out: Path, dtype: str = "f16", verify: bool = True,
                 device: str | None = None, progress: bool = True,
                 quant: dict | None = None, imatrix: dict | None = None,
                 extra_report: dict | None = None) -> CompileResult:
    """Export, verify, rename, report. `quant` (GGUF tensor name -> ggml type) re-quantizes an
    F32 export with llama.cpp's own quantizer (`dtype` is then ignored), with the optional
    importance matrix `imatrix` (GGUF name -> per-column importance)."""
    from moecompile.exporters import gguf as gguf_export
    from moecompile.exporters import gguf_quant

    ir.verify(model)
    tmp = _temp_path(out)
    source = tmp.with_name(tmp.name + ".f32")
    report_path = out.with_suffix(".report.json")
    try:
        try:
            result = gguf_export.export(model, source if quant else tmp,
                                        dtype="f32" if quant else dtype, progress=progress)
            if quant:
                log.info("quantizing with llama.cpp (%d tensors typed)", len(quant))
                gguf_quant.quantize_file(source, tmp, quant, imatrix)
                source.unlink()
        except OSError as exc:
            raise UserError(f"{out}: cannot write ({exc.strerror or exc})") from None
        # what the file holds: llama.cpp's quantizer chose the final types, our exporter knows its own
        written = (gguf_quant.read_tensors(tmp) if quant else
                   [(t.name, t.shape, t.qtype, t.nbytes) for t in result.tensors])
        verification = None
        if verify:
            log.info("verifying %s in llama.cpp against the reference executor", out.name)
            numerics = (gguf_quant.FileNumerics(tmp, result.tensors) if quant
                        else gguf_export.StoredNumerics(result.tensors))
            verification = verify_gguf(model, tmp, numerics, device=device)
        final = out if verification is None or verification.passed else out.with_suffix(
            ".FAILED.gguf")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        source.unlink(missing_ok=True)
    return finish(model, "gguf", final, report_path, {
        "arch": result.arch,
        "dtype": "mixed" if quant else dtype,
        "output": str(final),
        "passes": list(model.history),
        "tensor_bytes": sum(b for *_, b in written),
        "file_bytes": final.stat().st_size,
        "tensors": [{"name": name, "type": qtype.name, "shape": list(shape), "bytes": nbytes}
                    for name, shape, qtype, nbytes in written],
    }, extra_report, verification)


def finish(model: ir.Model, target: str, final: Path, report_path: Path, fields: dict,
           extra_report: dict | None, verification: VerifyResult | None) -> CompileResult:
    """Write OUT.report.json (the fields every target shares around its own) and return the
    result."""
    report = {"moecompile": __version__, "source": model.source, "family": model.family,
              "target": target, **fields, **(extra_report or {}),
              "verification": verification.to_dict() if verification else None}
    write_json_atomic(report_path, report)
    return CompileResult(final, report_path, report, verification)
