"""Run an exported ONNX decoder in ONNX Runtime: full-sequence logits and greedy generation with
the KV cache, through the same inputs and outputs a user's generation loop feeds it.

Positions follow the reference executor (and transformers): position = number of real tokens
before this one, so left-padded batches and the cache agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def providers(device: str | None = None) -> list[str]:
    """CUDA first when asked for (or when onnxruntime-gpu sees a GPU and nothing was asked)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in (None, "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxDecoder:
    def __init__(self, path: str | Path, device: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # ONNX Runtime plans a memory pattern for each set of input shapes it sees and keeps
        # every one (enable_mem_pattern, on by default); a decoder's inputs change shape every
        # step (the cache grows by a token), so the session grows with the longest context
        # decoded. Measured (ORT 1.32, CPU, OLMoE-shaped, 2 layers x 64 experts, portable int4,
        # 2047 steps): peak 375 MiB with patterns, 160-180 MiB without (~100 KiB a step); the
        # fused MoE form, 17x fewer nodes, 115 MiB either way. Patterns only pay where shapes
        # repeat. genai_config.json turns them off for onnxruntime-genai too.
        options.enable_mem_pattern = False
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers(device))
        self.past_names = [i.name for i in self.session.get_inputs()
                           if i.name.startswith("past_key_values.")]
        self.kv_shape = {i.name: (i.shape[1], i.shape[3]) for i in self.session.get_inputs()
                         if i.name in self.past_names}
        outputs = [o.name for o in self.session.get_outputs()]
        self.vocab = self.session.get_outputs()[0].shape[-1]
        # the output that continues each past input: past_key_values.N.key -> present.N.key
        self.present_of = {n: outputs.index(n.replace("past_key_values.", "present."))
                           for n in self.past_names}

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, h, 0, d), np.float32) for n, (h, d) in self.kv_shape.items()}

    def step(self, ids: np.ndarray, mask: np.ndarray, cache: dict[str, np.ndarray]):
        """Run `ids` [batch, seq] after `cache`; `mask` covers cache + ids. Returns logits
        [batch, seq, vocab] and the new cache."""
        seq = ids.shape[1]
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -seq:]
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                "position_ids": positions.astype(np.int64), **cache}
        out = self.session.run(None, feed)
        return out[0], {n: out[i] for n, i in self.present_of.items()}

    def sequence_logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits (len(ids), vocab) of one sequence from an empty cache."""
        batch = np.asarray([ids], dtype=np.int64)
        logits, _ = self.step(batch, np.ones_like(batch), self.empty_cache(1))
        return logits[0]

    def greedy(self, prompts: list[list[int]], max_new: int, eos: int | None = None,
               pad: int = 0) -> list[list[int]]:
        """Greedy continuations of left-padded prompts, one token per step through the cache."""
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), pad, np.int64)
        mask = np.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
        logits, cache = self.step(ids, mask, self.empty_cache(len(prompts)))
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        for _ in range(max_new):
            nxt = logits[:, -1].argmax(-1)
            for i, token in enumerate(nxt):
                if not done[i]:
                    if eos is not None and token == eos:
                        done[i] = True
                    else:
                        out[i].append(int(token))
            if done.all():
                break
            mask = np.concatenate([mask, (~done).astype(np.int64)[:, None]], axis=1)
            logits, cache = self.step(np.where(done, pad, nxt)[:, None], mask, cache)
        return out
