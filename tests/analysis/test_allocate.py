"""The budget allocator over types, and over types and structure (--allow-prune): the least
predicted loss that fits, structures measured only when they could win."""

import pytest

from moecompile.analysis.allocate import (CONTEND_RATIO, BudgetError, Structure, choose,
                                          choose_structured, settle_end_to_end)

# two groups: "exps" (the stacked experts, whose bytes scale with count x width) and "attn"
SENS = {"exps": {"f16": 0.0, "q8": 0.001, "q4": 0.02, "q2": 0.3},
        "attn": {"f16": 0.0, "q8": 0.002, "q4": 0.01, "q2": 0.2}}
BYTES = {"f16": 16, "q8": 8, "q4": 4, "q2": 2}  # per unit of weights
FULL = Structure(8, 256)


def size_of(s: Structure):
    units = {"exps": 100 * s.experts * s.width / (FULL.experts * FULL.width), "attn": 20}
    return lambda g, t: int(units[g] * BYTES[t])


def run(budget, losses, sens_at=None):
    asked = []

    def loss_of(s):
        asked.append(s)
        return losses[s]
    structures = [Structure(n, w) for n in (8, 6, 4) for w in (256, 192, 128)]
    return choose_structured(structures, FULL, SENS, size_of, lambda s: 0, budget, loss_of,
                             sens_at), asked


def test_types_alone_when_no_structure_is_cheaper_per_byte():
    losses = {Structure(n, w): 1.0 for n in (8, 6, 4) for w in (256, 192, 128)}
    choice, asked = run(2000, losses)
    assert choice.structure == FULL and choice.predicted == 0.0 and not asked
    assert choice.group_types == {"exps": "f16", "attn": "f16"}


def test_a_narrow_width_wins_where_it_beats_lower_bits():
    # at 760 bytes: full width needs exps at q4 (0.02); width 192 fits exps at q8 (0.001)
    losses = {Structure(n, w): (0.0 if w == 256 else 0.005 if w == 192 else 0.05) + (8 - n)
              for n in (8, 6, 4) for w in (256, 192, 128)}
    losses[FULL] = 0.0
    choice, asked = run(760, losses)
    assert choice.structure == Structure(8, 192)
    assert choice.predicted == pytest.approx(0.005 + 0.001 + 0.002)
    # what types alone reach at this budget
    _, _, loss = choose(SENS, size_of(FULL), 0, 760)
    assert choice.predicted < loss
    # fewer experts cost >= 2 here: 6 experts was measured, then every structure at or
    # beyond it is bounded by that and never built
    assert Structure(6, 256) in asked and not [s for s in asked if s.experts == 4]
    assert not [s for s in asked if s.experts == 6 and s.width < 256]
    skipped = [o for o in choice.options if o.get("measured") is False]
    assert all(o["bound"] >= choice.predicted for o in skipped)


def test_nothing_fits_names_the_smallest_size():
    with pytest.raises(BudgetError) as err:
        run(10, {})
    # the smallest structure (4 experts, width 128) at the smallest type
    assert err.value.smallest_weights == size_of(Structure(4, 128))("exps", "q2") + 40


# width 192 at 760 bytes: measured 0.005, its types (exps q8, attn q8) 0.003; full width's
# types 0.022; width 128 measured 0.05
WIDTHS = {Structure(n, w): (0.0 if w == 256 else 0.005 if w == 192 else 0.05) + (8 - n)
          for n in (8, 6, 4) for w in (256, 192, 128)}


def test_a_type_is_priced_at_the_type_its_rows_fall_back_to():
    """sens_at: where a narrower width's rows hold another type than the one asked, its loss
    is that type's. Priced as if q4 kept its own damage at width 192, the narrow width
    loses (0.005 + exps q4 0.02 + attn f16 against exps q4 + attn q8, 0.022); so it does at
    a worse fallback (q4 held as something costing 0.1), and at a better one (0.001) it
    wins."""
    losses = dict(WIDTHS)
    losses[FULL] = 0.0

    def held(fallback_loss):
        def sens_at(s):
            if s.width == 256:
                return SENS
            return {**SENS, "exps": {**SENS["exps"], "q4": fallback_loss}}
        return sens_at

    plain, _ = run(640, losses)
    worse, _ = run(640, losses, held(0.1))
    better, _ = run(640, losses, held(0.001))
    assert plain.structure == FULL and worse.structure == FULL
    assert better.structure == Structure(8, 192)
    assert plain.predicted == pytest.approx(0.022)
    assert better.predicted == pytest.approx(0.005 + 0.001 + 0.0)


def test_settling_end_to_end_takes_the_structure_measured_closest():
    """Predicted, width 192 wins (0.008 against types alone 0.022); measured with their types
    end to end, types alone are closer, so they are taken. Only structures predicted within
    CONTEND_RATIO of the best are measured, and each records what it measured."""
    losses = dict(WIDTHS)
    losses[FULL] = 0.0
    choice, _ = run(760, losses)
    assert choice.structure == Structure(8, 192)
    e2e = {FULL: 0.01, Structure(8, 192): 0.02}
    asked = []

    def measure(st, types):
        asked.append(st)
        assert types == choice.plans[st][0]
        return e2e[st]
    settled = settle_end_to_end(choice, measure)
    near = {Structure(o["experts"], o["width"]) for o in choice.options if o.get("measured")
            and o["predicted"] <= CONTEND_RATIO * choice.predicted}
    assert set(asked) == near == {FULL, Structure(8, 192)}
    assert settled.structure == FULL and settled.measured == 0.01
    assert settled.group_types == choice.plans[FULL][0]
    assert {o["width"]: o["with_types"] for o in settled.options if "with_types" in o} == {
        256: 0.01, 192: 0.02}


def test_a_single_contender_is_taken_unmeasured():
    losses = {s: 1.0 for s in WIDTHS}
    choice, _ = run(2000, losses)

    def measure(st, types):
        raise AssertionError("one contender: nothing to settle")
    assert settle_end_to_end(choice, measure) is choice
