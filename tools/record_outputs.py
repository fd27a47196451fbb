"""Record what the compiler writes for a fixed set of commands, and compare two recordings.

A refactor must not change what the compiler writes. Before it:

    python tools/record_outputs.py record before.json

after it:

    python tools/record_outputs.py record after.json
    python tools/record_outputs.py compare before.json after.json

Each command runs `moecompile` on the bundled model in a fresh folder. What is recorded per
command: the exit code, stdout with the folder's path replaced, and a fingerprint of every file
written. A GGUF is fingerprinted by its metadata (each key's value) and each tensor's type,
shape and bytes; an ONNX model by its graph with the doc string cleared (the data file by its
bytes); a report by its JSON. Values that change from run to run without any change of code
(wall-clock seconds, absolute paths) are left out, so two recordings of the same code agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "moe-tiny"
QUANT_MAP = {"attn_.*": "q8_0", "ffn_down_exps": "q6_k", "ffn_(gate|up)_exps": "q4_k",
             "output": "q6_k", "token_embd": "q8_0"}
ONNX_MAP = {r"blocks\.0\.ffn\.experts\.3\.": "int8", r"\.experts\.": "int4", ".": "f32"}

# name -> arguments after MODEL; every flag of the CLI appears at least once
COMMANDS: dict[str, list[str]] = {
    "default": ["-o", "{out}/"],
    "f32": ["--dtype", "f32", "-o", "{out}/m.gguf"],
    "bf16": ["--dtype", "bf16", "-o", "{out}/m.gguf"],
    "q8_0-dtype": ["--dtype", "q8_0", "-o", "{out}/"],
    "print-ir": ["--print-ir"],
    "no-verify": ["--no-verify", "--quiet", "-o", "{out}/m.gguf"],
    "quant-q4_k": ["--quant", "q4_k", "-o", "{out}/"],
    "quant-q8_0-imatrix": ["--quant", "q8_0", "--calib", "add", "--calib-n", "4", "-o", "{out}/"],
    "quant-map": ["--quant-map", "{out}/map.json", "-o", "{out}/m.gguf"],
    "quant-auto": ["--quant", "auto", "--budget", "17MB", "--calib", "all", "--calib-n", "2",
                   "--ctx", "256", "-o", "{out}/"],
    "quant-auto-prune": ["--quant", "auto", "--budget", "10.7MB", "--allow-prune",
                         "--prune-method", "frequency", "--calib", "add", "--calib-n", "4",
                         "--ctx", "128", "-o", "{out}/"],
    "quant-auto-local": ["--quant", "auto", "--budget", "17MB", "--sensitivity", "local",
                         "--calib", "all", "--calib-n", "2", "--ctx", "256", "-o", "{out}/"],
    "budget-check": ["--budget", "1GB", "-o", "{out}/m.gguf"],
    "offload": ["--quant", "q8_0", "--gpu-mem", "16MB", "--ram", "1GB", "--ctx", "512",
                "-o", "{out}/m.gguf"],
    "prune-eep": ["--experts", "4", "--calib", "add,sort", "--calib-n", "4",
                  "--search-budget", "40", "--seed", "1", "-o", "{out}/m.gguf"],
    "prune-frequency": ["--experts", "4", "--prune-method", "frequency", "--calib", "add",
                        "--calib-n", "4", "-o", "{out}/m.gguf"],
    "prune-mass": ["--experts", "3", "--prune-method", "mass", "--calib", "sort",
                   "--calib-n", "4", "-o", "{out}/m.gguf"],
    "prune-random": ["--experts", "4", "--prune-method", "random", "--calib", "add",
                     "--calib-n", "4", "--seed", "3", "-o", "{out}/m.gguf"],
    "prune-reconstruct": ["--experts", "6", "--prune-method", "reconstruct", "--calib", "add",
                          "--calib-n", "4", "-o", "{out}/m.gguf"],
    "slim": ["--expert-width", "0.75", "--calib", "add,sort", "--calib-n", "4", "-o",
             "{out}/m.gguf"],
    "slim-calib-only": ["--expert-width", "128", "--width-method", "activation",
                        "--width-refit", "none", "--width-data", "calib", "--calib", "add",
                        "--calib-n", "4", "-o", "{out}/m.gguf"],
    "topk-plain": ["--top-k", "1", "--topk-method", "plain", "-o", "{out}/m.gguf"],
    "topk-search": ["--top-k", "1", "--calib", "add", "--calib-n", "4", "--search-budget", "20",
                    "-o", "{out}/m.gguf"],
    "drop-blocks": ["--drop-blocks", "1", "--calib", "add", "--calib-n", "4", "-o",
                    "{out}/m.gguf"],
    "combined": ["--experts", "6", "--prune-method", "mass", "--top-k", "1", "--topk-method",
                 "plain", "--drop-blocks", "1", "--calib", "rev", "--calib-n", "4",
                 "--quant", "q5_k", "-o", "{out}/m.gguf"],
    "onnx-default": ["--target", "onnx", "-o", "{out}/"],
    "onnx-portable": ["--target", "onnx", "--onnx-moe", "portable", "-o", "{out}/m.onnx"],
    "onnx-int8": ["--target", "onnx", "--quant", "int8", "-o", "{out}/"],
    "onnx-int4-ort": ["--target", "onnx", "--quant", "int4", "--onnx-moe", "ort", "-o",
                      "{out}/m.onnx"],
    "onnx-quant-map": ["--target", "onnx", "--quant-map", "{out}/onnx_map.json", "-o",
                       "{out}/m.onnx"],
    "onnx-quant-auto": ["--target", "onnx", "--quant", "auto", "--budget", "9MB", "--calib",
                        "add", "--calib-n", "2", "--ctx", "256", "-o", "{out}/"],
    "onnx-quant-auto-local": ["--target", "onnx", "--quant", "auto", "--budget", "9MB",
                              "--sensitivity", "local", "--calib", "add", "--calib-n", "2",
                              "--ctx", "256", "-o", "{out}/"],
    "onnx-drop-moe": ["--target", "onnx", "--drop-moe-layers", "1", "--calib", "add",
                      "--calib-n", "4", "-o", "{out}/m.onnx"],
    "onnx-prune-exact": ["--target", "onnx", "--experts", "4", "--calib", "add", "--calib-n",
                         "4", "--search-budget", "150", "-o", "{out}/m.onnx"],
    "refused": ["--drop-moe-layers", "1", "--calib", "add", "-o", "{out}/m.gguf"],
}

VOLATILE_KEYS = {"seconds"}  # wall-clock time inside reports and GGUF history


def _normalise(value, out: str):
    """JSON value with the run's folder, the model's path and wall-clock times taken out."""
    if isinstance(value, dict):
        return {k: _normalise(v, out) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_normalise(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(out, "<out>").replace(str(MODEL), "<model>")
    return value


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _gguf_fingerprint(path: Path, out: str) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == "moecompile.history":
            value = _normalise(json.loads(value), out)
        elif isinstance(value, list) and len(value) > 16:
            value = _digest(json.dumps(value, default=str).encode())
        meta[field.name] = _normalise(value, out) if isinstance(value, str) else value
    tensors = {t.name: [t.tensor_type.name, [int(d) for d in t.shape], _digest(t.data.tobytes())]
               for t in reader.tensors}
    return {"metadata": meta, "tensors": tensors}


def _onnx_fingerprint(path: Path) -> str:
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)
    proto.doc_string = ""
    return _digest(proto.SerializeToString(deterministic=True))


def fingerprint(folder: Path) -> dict:
    out = str(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.endswith("map.json"):
            continue
        name = str(path.relative_to(folder))
        if path.suffix == ".gguf":
            files[name] = _gguf_fingerprint(path, out)
        elif path.suffix == ".onnx":
            files[name] = _onnx_fingerprint(path)
        elif name.endswith(".report.json"):
            files[name] = _normalise(json.loads(path.read_text()), out)
        else:
            files[name] = _digest(path.read_bytes())
    return files


def run_command(name: str, args: list[str], work: Path) -> dict:
    folder = work / name
    folder.mkdir()
    (folder / "map.json").write_text(json.dumps(QUANT_MAP))
    (folder / "onnx_map.json").write_text(json.dumps(ONNX_MAP))
    argv = [a.replace("{out}", str(folder)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "moecompile.cli", str(MODEL), *argv],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    stdout = proc.stdout.replace(str(folder), "<out>").replace(str(MODEL), "<model>")
    stdout = re.sub(r"\d+(\.\d+)? s\b", "<s>", stdout)
    stderr = proc.stderr.strip().splitlines()
    return {"args": args, "exit": proc.returncode, "stdout": stdout,
            "stderr_last": re.sub(r"\d+(\.\d+)? s\b", "<s>", stderr[-1]) if stderr else "",
            "files": fingerprint(folder)}


def record(path: Path, only: list[str] | None) -> None:
    results = {}
    with tempfile.TemporaryDirectory(prefix="moecompile-record-") as tmp:
        for name, args in COMMANDS.items():
            if only and name not in only:
                continue
            print(f"{name} ...", flush=True)
            results[name] = run_command(name, args, Path(tmp))
            print(f"  exit {results[name]['exit']}, {len(results[name]['files'])} files",
                  flush=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def _diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out)
    elif a != b:
        out.append(f"{where}: {json.dumps(a)[:200]} -> {json.dumps(b)[:200]}")


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differences: list[str] = []
    _diff(a, b, "", differences)
    for line in differences:
        print(line)
    print(f"{len(differences)} difference(s) over {len(set(a) | set(b))} commands")
    return 1 if differences else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("record")
    r.add_argument("output")
    r.add_argument("--only", nargs="*", help="command names to run (default: all)")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    args = p.parse_args(argv)
    if args.verb == "record":
        record(Path(args.output), args.only)
        return 0
    return compare(Path(args.before), Path(args.after))


if __name__ == "__main__":
    sys.exit(main())
