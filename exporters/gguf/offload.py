"""Offload planning: which tensors live in GPU memory and which stay in system RAM.

llama.cpp places whole tensors, and a layer's routed experts are one stacked tensor per
projection, so the unit is a GGUF tensor. What matters for speed is how many of its bytes a
token reads for each byte it occupies: 1 for attention, router, shared expert, output head and
the KV cache (read whole every token); k/E for a layer's routed experts (a token reads k of E
experts). The GPU is filled in that order — everything dense first, then expert tensors from
the last layer down, so the experts left on the CPU are those of the first layers, which is
exactly what llama.cpp's `--n-cpu-moe N` expresses — after reserving the KV cache and the
compute buffer. The plan is printed as a ready `llama-server` command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moecompile import ir
from moecompile.errors import UserError
from moecompile.sizes import format_size

from .memory import compute_bytes, kv_cache_bytes, runtime_bytes, work_bytes


@dataclass
class OffloadPlan:
    gpu: list[str]
    cpu: list[str]
    gpu_bytes: int
    ram_bytes: int
    n_cpu_moe: int | None  # the --n-cpu-moe that expresses the same plan, if one does
    command: str
    python_args: dict
    python_note: str

    def to_dict(self) -> dict:
        return {"gpu_tensors": self.gpu, "cpu_tensors": self.cpu, "gpu_bytes": self.gpu_bytes,
                "ram_bytes": self.ram_bytes, "n_cpu_moe": self.n_cpu_moe,
                "command": self.command, "llama_cpp_python": self.python_args,
                "llama_cpp_python_note": self.python_note}


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def plan(model: ir.Model, tensors: list[tuple[str, int]], gguf_name: str, context: int,
         gpu_mem: int, ram: int) -> OffloadPlan:
    """`tensors`: (GGUF name, bytes) of the compiled file."""
    moes = [b.ffn for b in model.blocks if isinstance(b.ffn, ir.MoE)]
    ratio_exps = moes[0].top_k / moes[0].n_experts if moes else 1.0
    kv = kv_cache_bytes(model, context)
    compute = compute_bytes(model, context)
    reserve = kv + compute
    if reserve > gpu_mem:
        raise UserError(f"--gpu-mem {format_size(gpu_mem)} cannot hold even the KV cache and "
                        f"compute buffer for --ctx {context} ({format_size(reserve)})")

    def priority(item):
        name, _ = item
        exps = "_exps." in name
        # token_embd is read one row per token and llama.cpp keeps it on the CPU anyway
        ratio = 0.0 if name.startswith("token_embd") else (ratio_exps if exps else 1.0)
        return (-ratio, -_layer(name) if exps else _layer(name), name)

    gpu, cpu, used, on_cpu = [], [], reserve, 0
    for name, nbytes in sorted(tensors, key=priority):
        if not name.startswith("token_embd") and used + nbytes <= gpu_mem:
            gpu.append(name)
            used += nbytes
        else:
            cpu.append(name)
            on_cpu += nbytes
    # the host also keeps a compute buffer, ggml-cpu's work buffer and the runtime's own memory
    host = compute + work_bytes(model, context) + runtime_bytes(model, context)
    ram_bytes = on_cpu + host
    if ram_bytes > ram:
        raise UserError(f"the plan needs {format_size(ram_bytes)} of RAM beyond the GPU's "
                        f"{format_size(gpu_mem)}, more than --ram {format_size(ram)}")
    cpu_exps = sorted({_layer(n) for n in cpu if "_exps." in n})
    dense_on_cpu = [n for n in cpu if "_exps." not in n and not n.startswith("token_embd")]
    n_cpu_moe = None
    if not dense_on_cpu:
        whole = all(all(f"blk.{i}.ffn_{p}_exps.weight" in cpu for p in ("gate", "up", "down"))
                    for i in cpu_exps)
        if whole and cpu_exps == list(range(len(cpu_exps))):
            n_cpu_moe = len(cpu_exps)
    if n_cpu_moe is not None:
        placement = f" --n-cpu-moe {n_cpu_moe}" if n_cpu_moe else ""
    else:
        pattern = "|".join(re.escape(n) for n in cpu if not n.startswith("token_embd"))
        placement = f" -ot '({pattern})=CPU'" if pattern else ""
    command = f"llama-server -m {gguf_name} -ngl 999{placement} -c {context}"
    all_gpu = not cpu or cpu == ["token_embd.weight"]
    python_args = {"n_gpu_layers": -1 if all_gpu else 0, "n_ctx": context}
    note = ("the whole plan applies" if all_gpu else
            "llama-cpp-python's Llama() has no tensor overrides (-ot / --n-cpu-moe), so it "
            "cannot keep some experts in RAM: n_gpu_layers places whole layers; use "
            "llama-server for this plan, or n_gpu_layers=0 (all on CPU)")
    return OffloadPlan(gpu, cpu, used, ram_bytes, n_cpu_moe, command, python_args, note)
