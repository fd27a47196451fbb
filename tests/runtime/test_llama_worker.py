"""llama.cpp as everything here runs it: weights in plain CPU buffers (runtime/llama_worker.py)."""

from __future__ import annotations

import llama_cpp
import numpy as np

from moecompile.cli import main
from moecompile.runtime.llama_worker import open_llama, sequence_logits


def test_weights_stay_in_plain_buffers_and_the_defaults_are_restored(tiny_model, tmp_path):
    """A Q8_0 file (a type llama.cpp repacks, or hands to AMX, where the CPU has it) loads with
    the extra buffer types off and runs; llama-cpp-python's own defaults are left as they were
    for anyone else in the process."""
    out = tmp_path / "m.gguf"
    assert main([str(tiny_model("olmoe")), "-o", str(out), "--dtype", "q8_0", "--no-verify",
                 "--quiet"]) == 0
    llm = open_llama(str(out), 16)
    assert llm.model_params.use_extra_bufts is False
    assert np.isfinite(sequence_logits(llm, [1, 2, 3, 4])).all()
    assert llama_cpp.llama.llama_cpp.llama_model_default_params().use_extra_bufts is True
