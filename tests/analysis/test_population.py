"""A generation of pruning candidates scored in one layer-major pass (analysis/population.py):
the same fitness as a streaming pass per candidate, each block's weights read once per
generation, and a child's common layers taken from its parent's kept states."""

import re

import numpy as np
import pytest

from moecompile import frontend
from moecompile.analysis.calibration import build_calib
from moecompile.analysis.expert_plan import LayerPlan, apply_plans, keep_plan, moe_layers
from moecompile.analysis.fitness import StreamingFitness
from moecompile.analysis.population import PopulationFitness
from moecompile.analysis.shards import stream
from moecompile.distributed.engine import Engine
from moecompile.frontend.checkpoint import Checkpoint


def candidates(model, seed: int, n: int) -> list[dict]:
    """n candidates keeping half the experts of every MoE layer: one-hot ones, and merges
    whose router rows are mixed too (for the logits and exact router modes)."""
    rng = np.random.default_rng(seed)
    layers = moe_layers(model)
    n_experts = model.blocks[layers[0]].ffn.n_experts
    keep = n_experts // 2
    out = []
    for c in range(n):
        plans = {}
        for i in layers:
            plan = keep_plan(sorted(rng.choice(n_experts, keep, replace=False).tolist()), n_experts)
            if c % 2:
                merge = plan.merge + rng.uniform(0, 0.3, plan.merge.shape) * (rng.random(plan.merge.shape) < 0.3)
                merge /= merge.sum(1, keepdims=True)
                plan = LayerPlan(merge, merge.copy())
            plans[i] = plan
        out.append(plans)
    return out


def one_pass_each(model, calib, plans_list, router_mode, reference):
    values = []
    for plans in plans_list:
        _, fitness = stream(Engine(), apply_plans(model, plans, router_mode), calib, None,
                            StreamingFitness(calib, reference))
        values.append(fitness.value())
    return values


@pytest.mark.parametrize("arch,router_mode,calib_spec", [
    ("qwen2_moe", "logits", "add,rev,brackets"),  # shared experts; tasks, padded
    ("mixtral", "exact", "text"),
    ("olmoe", "onehot", "add,rev,brackets"),
])
def test_a_generation_scores_what_a_pass_per_candidate_gives(tiny_model, arch, router_mode,
                                                             calib_spec, tmp_path):
    model = frontend.load(tiny_model(arch))
    if calib_spec == "text":
        text = tmp_path / "notes.txt"
        text.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n"
                                  for i in range(40)))
        calib_spec = str(text)
    calib = build_calib(model, calib_spec, 3)
    reference = None
    if calib.kind == "text":
        _, reference = stream(Engine(), model, calib, None, StreamingFitness(calib))
    plans_list = candidates(model, 0, 6)
    if router_mode == "onehot":
        plans_list = [{i: keep_plan(p.kept, p.merge.shape[1]) if p.one_hot else
                       keep_plan(sorted(np.argsort(-p.merge.sum(0))[:p.merge.shape[0]].tolist()),
                                 p.merge.shape[1]) for i, p in c.items()} for c in plans_list]
    population = PopulationFitness(model, calib, router_mode, reference)
    got = population.score(plans_list)
    want = one_pass_each(model, calib, plans_list, router_mode, reference)
    assert got == pytest.approx(want, abs=1e-6)
    assert len(set(want)) > 1  # the candidates differ, so the comparison can fail
    assert population.generations == 1 and population.evaluations == len(plans_list)


def test_each_block_is_read_once_per_generation_and_children_start_from_kept_states(
        tiny_model, monkeypatch):
    model = frontend.load(tiny_model("qwen3_moe", num_hidden_layers=3))
    calib = build_calib(model, "add,rev,brackets", 3)
    layers = moe_layers(model)
    reads: list[tuple] = []
    read = Checkpoint.read

    def counted(self, key, index=None):
        reads.append((key, repr(index)))
        return read(self, key, index)

    monkeypatch.setattr(Checkpoint, "read", counted)
    population = PopulationFitness(model, calib, "onehot", None)
    parents = candidates(model, 1, 6)[::2]  # one-hot
    reads.clear()
    population.score(parents)
    assert reads and len(reads) == len(set(reads))  # nothing read twice in a generation
    first = set(reads)
    # children that differ from their parents only in the last MoE layer
    n_experts = model.blocks[layers[0]].ffn.n_experts
    children = [{**p, layers[-1]: keep_plan(list(range(n_experts // 2)), n_experts)}
                for p in parents]
    reads.clear()
    got = population.score(children)
    blocks_read = {int(re.search(r"layers\.(\d+)\.", k).group(1)) for k, _ in reads
                   if re.search(r"layers\.(\d+)\.", k)}
    assert blocks_read == {layers[-1]} and population.cache_hits == len(children)
    assert len(reads) == len(set(reads)) and set(reads) < first
    assert got == pytest.approx(one_pass_each(model, calib, children, "onehot", None), abs=1e-6)
    # a candidate scored before is not scored again
    reads.clear()
    assert population.score(children[:1]) == got[:1] and not reads
    # the kept states are files in the user's cache, removed at the end
    folder = population._states._folder
    assert folder is not None and any(folder.iterdir())
    population.close()
    assert not folder.exists()


def test_the_python_api_searches_in_generations_as_the_cli_does():
    """A generation is what a search at real size scores in one pass: the API's default
    batch is the CLI's (a batch of one would score a candidate per pass)."""
    from moecompile.analysis.eep import EEPConfig
    from moecompile.options import DEFAULT_SEARCH_BATCH

    assert EEPConfig().batch == DEFAULT_SEARCH_BATCH > 1
