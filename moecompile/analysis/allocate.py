"""The cheapest weight types under a byte budget, from measured losses (`choose`).

Both targets use it: GGUF over its stacked tensor groups, ONNX over experts one by one. A unit
has one option per candidate type; losses of units are assumed to add up (the usual
first-order assumption; the job measures the chosen mix end to end where it can).
"""

from __future__ import annotations

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
                    is_expert, measure, factors=(4.0, 0.25)):
    """`choose` for a *predicted* sensitivity (layer-local errors turned into KL by one probe
    per kind of sub-layer), whose weakest part is how much one kind's errors cost next to
    another's. Beside its choice, the mixes it would choose with the experts' (`is_expert(g)`)
    predicted losses scaled by each of `factors` are measured end to end too
    (`measure(group -> type)` -> KL, one streaming pass each) and the lowest measured KL wins.
    Returns (group -> type, total bytes, predicted loss, measured KL, every measured KL)."""
    mixes = [choose(sens, size, fixed, weight_budget)]
    for factor in factors:
        scaled = {g: {n: v * (factor if is_expert(g) else 1.0) for n, v in row.items()}
                  for g, row in sens.items()}
        mix = choose(scaled, size, fixed, weight_budget)
        if all(mix[0] != m[0] for m in mixes):
            mixes.append(mix)
    measured = [measure(m[0]) for m in mixes]
    best = min(range(len(mixes)), key=measured.__getitem__)
    types, total, _ = mixes[best]
    return types, total, sum(sens[g][types[g]] for g in sens), measured[best], measured


class BudgetError(UserError):
    """Even the smallest types exceed the weight budget; `smallest_weights` is their size."""

    def __init__(self, smallest_weights: int):
        super().__init__(f"weights cannot be smaller than {smallest_weights} bytes")
        self.smallest_weights = smallest_weights
