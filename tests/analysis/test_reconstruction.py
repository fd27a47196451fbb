"""NAEE's subset errors through the experts' Gram matrices equal the errors of the outputs
themselves (what `reconstruct` scored before, and what the name means)."""

import pytest
import torch

from moecompile import ir
from moecompile.analysis.baselines import _subsets, subset_squares
from moecompile.runtime.executor import combine_experts, route


def _mix(moe, logits, kept, expert_out):
    """The routed output with only `kept` experts, computed from the outputs themselves: the
    kept router rows' softmax, top-k, and each token's weighted sum of its experts' outputs
    (`expert_out` (E, N, D): every expert on every token)."""
    idx, weights = route(moe, logits[:, kept], top_k=min(moe.top_k, len(kept)))
    return combine_experts(expert_out[0], idx, weights,
                           lambda slot, rows: expert_out[kept[slot], rows])


@pytest.mark.parametrize("renormalise", [False, True])
def test_gram_errors_equal_the_output_errors(renormalise):
    g = torch.Generator().manual_seed(0)
    e, n, d, k = 8, 50, 16, 2
    moe = ir.MoE(router=None, experts=(), top_k=k, norm_topk=renormalise)
    out = torch.randn(e, n, d, generator=g)
    logits = torch.randn(n, e, generator=g) * 2
    examples = torch.arange(n) % 5
    subsets = _subsets(e, 3, seed=0)
    got = subset_squares(moe, logits, out, examples, subsets, 5)
    y = _mix(moe, logits, list(range(e)), out)
    for i, kept in enumerate(subsets):
        err = (y - _mix(moe, logits, kept, out)).double().pow(2).sum(-1)
        want = torch.zeros(5, dtype=torch.float64).index_add_(0, examples, err)
        assert torch.allclose(got[i], want, rtol=1e-5, atol=1e-9), kept
    assert (got > 0).any()
