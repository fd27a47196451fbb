"""The budget allocator over types, and over types and structure (--allow-prune): the least
predicted loss that fits, structures measured only when they could win."""

import pytest

from moecompile.analysis.allocate import BudgetError, Structure, choose, choose_structured

# two groups: "exps" (the stacked experts, whose bytes scale with count x width) and "attn"
SENS = {"exps": {"f16": 0.0, "q8": 0.001, "q4": 0.02, "q2": 0.3},
        "attn": {"f16": 0.0, "q8": 0.002, "q4": 0.01, "q2": 0.2}}
BYTES = {"f16": 16, "q8": 8, "q4": 4, "q2": 2}  # per unit of weights
FULL = Structure(8, 256)


def size_of(s: Structure):
    units = {"exps": 100 * s.experts * s.width / (FULL.experts * FULL.width), "attn": 20}
    return lambda g, t: int(units[g] * BYTES[t])


def run(budget, losses):
    asked = []

    def loss_of(s):
        asked.append(s)
        return losses[s]
    structures = [Structure(n, w) for n in (8, 6, 4) for w in (256, 192, 128)]
    return choose_structured(structures, FULL, SENS, size_of, lambda s: 0, budget, loss_of), asked


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
