"""The layer-local sensitivity's probes on a model with more experts per layer than it samples:
a probe rounds only what the sensitivity rounded already (at real size rounding the other
experts to the probe type took about 400 s of a 40-minute `--budget`), and its KL-per-error
factor is fitted against the error of exactly what it rounded."""

import pytest

from moecompile import frontend
from moecompile.analysis import sensitivity
from moecompile.analysis.calibration import build_calib, spread_rows
from moecompile.exporters.gguf.rounded import RoundedStore
from moecompile.exporters.gguf.target import GGUFTarget, group_units
from moecompile.runtime.streaming import StreamingExecutor

TYPES = ["q8_0", "q4_k"]
PROBE = "q4_k"


@pytest.fixture(scope="module")
def setup(tiny_model):
    experts = 2 * sensitivity.SAMPLED_EXPERTS
    model = frontend.load(tiny_model("mixtral", hidden_size=256, intermediate_size=64,
                                     num_local_experts=experts))
    units = group_units(GGUFTarget().groups(model))
    calib = build_calib(model, "add,sort", 4)
    return model, units, calib


def test_probes_round_nothing_the_sensitivity_did_not(setup):
    model, units, calib = setup
    alone, both = RoundedStore(), RoundedStore()
    try:
        local = sensitivity.measure_local(model, calib, units, TYPES,
                                          GGUFTarget()._rounding(model, None, alone),
                                          progress=False)
        sensitivity.local_losses(model, calib, units, TYPES,
                                 GGUFTarget()._rounding(model, None, both), PROBE,
                                 progress=False)
        assert both.misses == alone.misses > 0 and both.hits > alone.hits
    finally:
        alone.close()
        both.close()
    stacked = [u for u in units if sensitivity.unit_kind(units[u]) == "experts"]
    assert stacked and set(local["sampled"]) == set(stacked)
    for u in stacked:
        paths, factor = local["sampled"][u]
        assert len(paths) == sensitivity.SAMPLED_EXPERTS < len(units[u]) and factor > 1


@pytest.mark.parametrize("experts,shape,want", [
    (8, (64, 32), 8),  # small experts (the bundled model's): all of them
    (64, (1024, 2048), 4),  # OLMoE-1B-7B
    (128, (768, 2048), 5),  # Qwen3-30B-A3B
    (8, (14336, 4096), 2),  # Mixtral-8x7B: never fewer than two
])
def test_large_experts_are_sampled_fewer(experts, shape, want):
    """What the sensitivity rounds at every type is bounded by values, not experts: eight of
    OLMoE's experts at seven types were half of each block's time at real size."""
    assert sensitivity.sampled_count(experts, shape[0] * shape[1]) == want


def test_each_factor_is_its_probes_kl_over_the_error_of_what_it_rounded(setup):
    model, units, calib = setup
    rounding = GGUFTarget()._rounding(model, None)
    local = sensitivity.measure_local(model, calib, units, TYPES, rounding, progress=False)
    _, info, _ = sensitivity.local_losses(model, calib, units, TYPES, rounding, PROBE,
                                          progress=False)
    rows = spread_rows(calib, sensitivity.LOCAL_TOKENS)
    ids, mask = calib.ids[rows], calib.mask[rows]
    reference = sensitivity.StreamingKL()
    StreamingExecutor(model).run(ids, mask, reference.consume)
    group = next(g for g in info["probe_kl"] if g.startswith("experts"))
    members = sensitivity.probe_groups(units)[group]
    probed = {p for u in members for p in local["sampled"][u][0]}
    with rounding(PROBE) as value:
        kl = sensitivity.streaming_kl(model, ids, mask, reference,
                                      sensitivity.Replaced(probed, value))
    assert info["probe_kl"][group] == pytest.approx(kl, rel=1e-4) and kl > 0
    error = sum(local["error"][u][PROBE] / local["sampled"][u][1] for u in members)
    assert info["kl_per_error"][group] == pytest.approx(kl / error, rel=1e-4)


def test_the_time_estimate_counts_what_one_more_type_computes_again(tiny_model, monkeypatch):
    """recomputed_values (the ETA's share of the sensitivity that is not rounding) against
    the values × rows the products of measure_local go through for one more candidate type,
    on a model whose experts are all sampled (their routed rows add up to top_k a token): the
    same, once attention's padded positions are counted (the estimate counts tokens)."""
    from moecompile.runtime.executor import ReferenceExecutor

    model = frontend.load(tiny_model("mixtral", hidden_size=256, intermediate_size=64))
    units = group_units(GGUFTarget().groups(model))
    calib = build_calib(model, "add,sort", 4)
    numel = {p: t.numel for p, t in model.tensors()}
    counted = [0]
    for name in ("linear", "matmul"):
        original = getattr(ReferenceExecutor, name)

        def counting(self, x, path, *rest, _original=original):
            counted[0] += x.reshape(-1, x.shape[-1]).shape[0] * self.tensors[path].numel
            return _original(self, x, path, *rest)

        monkeypatch.setattr(ReferenceExecutor, name, counting)
    values = {}
    for types in (TYPES[:1], TYPES):
        counted[0] = 0
        local = sensitivity.measure_local(model, calib, units, types,
                                          GGUFTarget()._rounding(model, None), progress=False)
        values[len(types)] = counted[0]
    positions = calib.mask[spread_rows(calib, sensitivity.LOCAL_TOKENS)].numel()
    attention = {u: p for u, p in units.items() if sensitivity.unit_kind(p) == "attention"}
    per_token = sensitivity.recomputed_values(model, units, numel)
    in_attention = sensitivity.recomputed_values(model, attention, numel)
    assert 0 < in_attention < per_token
    # attention runs on the padded batch, the rest on the real tokens only
    assert values[2] - values[1] == pytest.approx(
        in_attention * positions + (per_token - in_attention) * local["tokens"], rel=1e-9)
