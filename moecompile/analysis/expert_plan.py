"""What an expert-pruning method decides, and how the IR is rewritten from it.

Every method (EEP and the baselines) produces, for each MoE layer, two E' x E matrices in the
EEP paper's notation:

- `merge` (W_EM): new expert j = sum_i merge[j, i] * old expert i, applied to gate, up and down
  alike. A one-hot row is plain pruning (the kept expert's tensors are reused untouched);
- `router` (W_RM): the new routing weights are softmax(router logits) @ router^T.

How the router matrix is applied is the `router_mode`:

- "onehot": it stays one-hot and means "keep these router rows" — exactly the paper's mapping
  when the top-k weights are renormalised; for routers that don't renormalise, slicing rows
  changes the softmax's denominator, and that sliced form is what llama.cpp runs, so it is what
  the search evaluates. Every runtime can hold it;
- "exact": the paper's mapping of the softmax probabilities, kept as `MoE.router_map` for
  targets that can compute it (not llama.cpp's fixed MoE graph);
- "logits": the matrix mixes the router's *rows* (new logits = R @ old logits), a router
  adjustment that stays a plain linear router, so GGUF can hold it. Used by the top-k search,
  where with every expert kept a one-hot router could change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moecompile import ir


@dataclass(frozen=True)
class LayerPlan:
    merge: np.ndarray  # (E', E)
    router: np.ndarray  # (E', E)

    @property
    def router_rows(self) -> list[int]:
        """The original router row behind each new expert (its one-hot projection)."""
        return [int(i) for i in self.router.argmax(axis=1)]

    @property
    def kept(self) -> list[int]:
        """The original expert that dominates each new expert."""
        return [int(i) for i in np.abs(self.merge).argmax(axis=1)]

    @property
    def one_hot(self) -> bool:
        return is_one_hot(self.merge) and is_one_hot(self.router)

    def to_dict(self) -> dict:
        out = {"kept": self.kept, "router_rows": self.router_rows}
        if not is_one_hot(self.merge):
            out["merge"] = np.round(self.merge, 5).tolist()
        if not is_one_hot(self.router):
            out["router"] = np.round(self.router, 5).tolist()
        return out


def is_one_hot(m: np.ndarray) -> bool:
    return bool(((m == 0) | (m == 1)).all() and (m.sum(axis=1) == 1).all())


def keep_plan(kept: list[int], n_experts: int) -> LayerPlan:
    """Plain pruning: keep these experts (in ascending order) with their router rows."""
    eye = np.eye(n_experts)[sorted(kept)]
    return LayerPlan(eye.copy(), eye.copy())


def moe_layers(model: ir.Model) -> list[int]:
    return [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, ir.MoE)]


ROUTER_MODES = ("onehot", "exact", "logits")


def apply_plans(model: ir.Model, plans: dict[int, LayerPlan], router_mode: str = "onehot") -> ir.Model:
    """The model with each planned MoE layer rebuilt from its merge and router matrices."""
    assert router_mode in ROUTER_MODES, router_mode
    blocks = list(model.blocks)
    for layer, plan in plans.items():
        moe = blocks[layer].ffn
        assert isinstance(moe, ir.MoE) and moe.router_map is None, "layer already pruned"
        experts = []
        for row in plan.merge:
            parts = {name: ir.combined([getattr(e, name) for e in moe.experts], row.tolist())
                     for name in ("gate", "up", "down")}
            experts.append(ir.Expert(**parts))
        matrix = tuple(tuple(float(v) for v in r) for r in plan.router)
        if router_mode == "exact" and not is_one_hot(plan.router):
            router, mapping = moe.router, matrix
        elif router_mode == "logits" and not is_one_hot(plan.router):
            w = moe.router.weight
            router = ir.Router(ir.Tensor((len(matrix), w.shape[1]), "f32", ir.MixRows(w, matrix)))
            mapping = None
        else:
            router, mapping = ir.Router(ir.rows_of(moe.router.weight, plan.router_rows)), None
        n = len(experts)
        new = replace(moe, experts=tuple(experts), router=router, router_map=mapping,
                      top_k=min(moe.top_k, n))
        blocks[layer] = replace(blocks[layer], ffn=new)
    return replace(model, blocks=tuple(blocks))
