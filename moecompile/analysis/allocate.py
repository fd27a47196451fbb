"""The cheapest weight types under a byte budget, from measured losses (`choose`), and the
same with structural options besides types (`choose_structured`: fewer experts, narrower
experts, for --allow-prune).

Both targets use it: GGUF over its stacked tensor groups, ONNX over experts one by one. A unit
has one option per candidate type; losses of units (and of a structure) are assumed to add up
(the usual first-order assumption; the job measures the chosen mix end to end where it can).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from moecompile.errors import UserError


def choose(sens: dict[str, dict[str, float]], size, fixed: int,
           weight_budget: int) -> tuple[dict[str, str], int, float]:
    """Cheapest predicted loss under a byte budget: start every group at its best type, then
    repeatedly take the downgrade that saves bytes at the least added loss per byte.
    `size(group, type)` is bytes; `fixed` the bytes no choice changes. Returns (group -> type,
    total bytes, predicted loss). Raises BudgetError when even the smallest types exceed the
    budget."""
    # per group: one option per distinct size (the lower-loss type where a fallback makes two
    # types the same size), biggest first; start from the lowest-loss option
    order: dict[str, list[str]] = {}
    for g in sens:
        best_at: dict[int, str] = {}
        for name in sens[g]:
            n = size(g, name)
            if n not in best_at or sens[g][name] < sens[g][best_at[n]]:
                best_at[n] = name
        order[g] = [best_at[n] for n in sorted(best_at, reverse=True)]
    choice = {g: min(range(len(order[g])), key=lambda i: (sens[g][order[g][i]], -i)) for g in sens}
    total = fixed + sum(size(g, order[g][choice[g]]) for g in sens)
    smallest = fixed + sum(size(g, order[g][-1]) for g in sens)
    if smallest > weight_budget:
        raise BudgetError(smallest)
    while total > weight_budget:
        best = None
        for g, i in choice.items():
            if i + 1 >= len(order[g]):
                continue
            a, b = order[g][i], order[g][i + 1]
            cost = (sens[g][b] - sens[g][a]) / (size(g, a) - size(g, b))
            if best is None or cost < best[0]:
                best = (cost, g)
        g = best[1]
        total -= size(g, order[g][choice[g]]) - size(g, order[g][choice[g] + 1])
        choice[g] += 1
    group_types = {g: order[g][i] for g, i in choice.items()}
    return group_types, total, sum(sens[g][group_types[g]] for g in sens)


def choose_measured(sens: dict[str, dict[str, float]], size, fixed: int, weight_budget: int,
                    is_expert, measure, factors=(4.0, 0.25), announce=None):
    """`choose` for a *predicted* sensitivity (layer-local errors turned into KL by one probe
    per kind of sub-layer and depth band), whose weakest part is how much one kind's errors
    cost next to another's. Beside its choice, the mixes it would choose with the experts'
    (`is_expert(g)`) predicted losses scaled by each of `factors` are measured end to end too
    (`measure(group -> type)` -> KL, one streaming pass each) and the lowest measured KL wins;
    `announce(mixes)`, given, is told them first (what they will cost is known only now).
    Returns (group -> type, total bytes, predicted loss, measured KL, every measured KL)."""
    mixes = [choose(sens, size, fixed, weight_budget)]
    for factor in factors:
        scaled = {g: {n: v * (factor if is_expert(g) else 1.0) for n, v in row.items()}
                  for g, row in sens.items()}
        mix = choose(scaled, size, fixed, weight_budget)
        if all(mix[0] != m[0] for m in mixes):
            mixes.append(mix)
    if announce is not None:
        announce([m[0] for m in mixes])
    measured = [measure(m[0]) for m in mixes]
    best = min(range(len(mixes)), key=measured.__getitem__)
    types, total, _ = mixes[best]
    return types, total, sum(sens[g][types[g]] for g in sens), measured[best], measured


def choose_reported(sens: dict[str, dict[str, float]], size, fixed: int, weight_budget: int,
                    local=None, announce=None):
    """What both targets' `--quant auto` does with a sensitivity: `choose`, or, for a
    layer-local one (`local` = (is_expert, measure, info) as `choose_measured` takes them, and
    the sensitivity's own description), `choose_measured` (told `announce`). Returns (group ->
    type, total bytes, predicted loss, the report's extra fields, the summary line's tail)."""
    if local is None:
        return (*choose(sens, size, fixed, weight_budget), {}, "")
    is_expert, measure, info = local
    types, total, predicted, measured, tried = choose_measured(sens, size, fixed, weight_budget,
                                                               is_expert, measure,
                                                               announce=announce)
    return (types, total, predicted,
            {"measured_kl": measured, "mixes_measured": tried, "sensitivity_method": info},
            f", measured {measured:.4f} end to end (layer-local sensitivity on "
            f"{info['tokens']} tokens; the best of {len(tried)} mixes measured"
            + (f" there and on {info['held_out_tokens']} held-out tokens"
               if info.get("held_out_tokens") else "") + ")")


class BudgetError(UserError):
    """Even the smallest types exceed the weight budget; `smallest_weights` is their size."""

    def __init__(self, smallest_weights: int):
        super().__init__(f"weights cannot be smaller than {smallest_weights} bytes")
        self.smallest_weights = smallest_weights


@dataclass(frozen=True)
class Structure:
    """A structural option a budget may take besides types (--allow-prune): routed experts
    per MoE layer and neurons per routed expert, one each for the whole model."""

    experts: int
    width: int

    def describe(self, full: "Structure") -> str:
        parts = []
        if self.experts != full.experts:
            parts.append(f"{self.experts} of {full.experts} experts")
        if self.width != full.width:
            parts.append(f"width {self.width} of {full.width}")
        return ", ".join(parts) or "every expert at full width"


@dataclass
class StructuredChoice:
    structure: Structure
    group_types: dict[str, str]
    total: int  # predicted weight bytes
    predicted: float  # structure loss + summed type loss
    structure_loss: float
    options: list[dict]  # every structure considered: its fate and figures
    # each feasible structure's greedy types: (group -> type, weight bytes, summed type loss)
    plans: dict[Structure, tuple[dict[str, str], int, float]] = field(default_factory=dict)
    measured: float | None = None  # the chosen structure with its types, end to end


# structures settled end to end: at most this many, predicted within this factor of the best.
# The summed type losses under-predict a file's KL (bundled model, types alone at the Q6_K and
# Q5_K files' sizes: predicted 0.0004 and 0.0011, test prompts 0.0013 and 0.0031) while a
# structure's loss is measured, so by prediction types alone won where width 224 with its types
# was 2.3x closer to the original on the test prompts.
CONTENDERS = 3
CONTEND_RATIO = 4.0


def choose_structured(structures: list[Structure], full: Structure,
                      sens: dict[str, dict[str, float]],
                      size_of: Callable[[Structure], Callable[[str, str], int]],
                      fixed_of: Callable[[Structure], int], weight_budget: int,
                      loss_of: Callable[[Structure], float],
                      sens_at: Callable[[Structure], dict] | None = None) -> StructuredChoice:
    """The least predicted loss over structures and types under the budget.

    A per-model structure (one expert count, one width: what a GGUF can hold) changes the
    bytes of every expert group at once, and how many bytes it saves depends on the types
    those groups take; so rather than one greedy step that would have to guess the types, each
    of the few structures gets the greedy type allocation (`choose`) with its own sizes, and
    predicted loss = the structure's measured loss (KL on the calibration data with that change
    alone, `loss_of`) + its types' summed loss.

    Measuring a structure costs a pruning or slimming pass, so structures are measured from
    the least to the most drastic (most experts and width first), and one is skipped when it
    cannot beat the best found: its bound is its types' loss plus the largest measured loss of
    a structure it is at least as drastic as (fewer or as many experts, as narrow or narrower)
    — the assumption that cutting more never costs less.

    `sens_at(structure)`: the types' losses at a structure, where they differ from `sens`
    (a type whose rows fall back to another there costs that one's loss)."""
    options, feasible = [], []
    for s in structures:
        try:
            group_types, total, type_loss = choose(sens if sens_at is None else sens_at(s),
                                                   size_of(s), fixed_of(s), weight_budget)
        except BudgetError as exc:
            options.append({"experts": s.experts, "width": s.width, "fits": False,
                            "smallest_bytes": exc.smallest_weights})
            continue
        feasible.append((s, group_types, total, type_loss))
    plans = {s: (group_types, total, type_loss) for s, group_types, total, type_loss in feasible}
    if not feasible:
        raise BudgetError(min(o["smallest_bytes"] for o in options))
    feasible.sort(key=lambda f: (-f[0].experts, -f[0].width))
    measured: dict[Structure, float] = {}
    best: StructuredChoice | None = None
    for s, group_types, total, type_loss in feasible:
        entry = {"experts": s.experts, "width": s.width, "fits": True, "weights_bytes": total,
                 "type_loss": type_loss}
        options.append(entry)
        floor = max([v for m, v in measured.items()
                     if m.experts >= s.experts and m.width >= s.width], default=0.0)
        if best is not None and floor + type_loss >= best.predicted:
            entry.update(measured=False, bound=floor + type_loss)
            continue
        loss = 0.0 if s == full else loss_of(s)
        measured[s] = loss
        entry.update(measured=True, structure_loss=loss, predicted=loss + type_loss)
        if best is None or loss + type_loss < best.predicted:
            best = StructuredChoice(s, group_types, total, loss + type_loss, loss, options,
                                    plans)
    return best


def settle_end_to_end(choice: StructuredChoice,
                      measure: Callable[[Structure, dict[str, str]], float],
                      ratio: float | None = None, most: int | None = None
                      ) -> StructuredChoice:
    """Among the measured structures predicted within `ratio` of the best (at most `most`,
    best predicted first), the one whose file is measured closest to the original:
    `measure(structure, group -> type)` is its KL with those types, end to end, on the data
    structures are judged on. Each measured option records it (`with_types`). A single
    contender is taken as it is, unmeasured. (Defaults: CONTEND_RATIO, CONTENDERS.)"""
    ratio = CONTEND_RATIO if ratio is None else ratio
    most = CONTENDERS if most is None else most
    near = sorted((o for o in choice.options if o.get("measured")
                   and o["predicted"] <= ratio * choice.predicted),
                  key=lambda o: o["predicted"])[:most]
    if len(near) < 2:
        return choice
    for o in near:
        st = Structure(o["experts"], o["width"])
        o["with_types"] = measure(st, choice.plans[st][0])
    best = min(near, key=lambda o: o["with_types"])
    st = Structure(best["experts"], best["width"])
    group_types, total, _ = choice.plans[st]
    return StructuredChoice(st, group_types, total, best["predicted"], best["structure_loss"],
                            choice.options, choice.plans, best["with_types"])
