"""Hand-written attention crosses a step only when it keeps values: casts that are exact (or the
fp32-softmax idiom's rounding back to the operands' dtype), constant scales; anything else leaves
the site as written, with the reason, instead of rewriting it into something else."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import Capture, assert_grads_match
from tests.models.helpers import check_exported

B, H, S, D = 2, 2, 6, 4


def _qkv(dtype=torch.float64):
    torch.manual_seed(0)
    return tuple(torch.randn(B, H, S, D, dtype=dtype, requires_grad=True) for _ in range(3))


def _compiled_site(fn, inputs, params=(), grads=True):
    capture = Capture()
    torch._dynamo.reset()
    if grads:
        assert_grads_match(torch.compile(fn, backend=capture.backend), inputs, list(params), fn)
    else:
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(fn, backend=capture.backend)(*inputs), fn(*inputs))
    (site,) = capture.result.sites
    return site


@pytest.mark.parametrize("scores,reason", [
    (lambda s, q: s.to(torch.int64).to(q.dtype), "to torch.int64 changes"),
    (lambda s, q: s.bfloat16().to(q.dtype), "to torch.bfloat16 changes"),
    (lambda s, q: s.float().double(), "to torch.float32 changes"),  # a float64 model's float32 round trip
    (lambda s, q: torch.div(s, 2.0, rounding_mode="floor"), "rounding_mode"),
], ids=["to_int", "bf16_round_trip", "fp32_round_trip", "floor_div"])
def test_steps_that_change_values_leave_the_site_as_written(scores, reason):
    def fn(q, k, v):
        return scores(q @ k.transpose(-2, -1), q).softmax(-1) @ v

    site = _compiled_site(fn, _qkv(), grads="int" not in reason)  # no gradient flows through an integer
    assert site.status == "skipped" and reason in site.reason


def test_fp32_softmax_idiom_is_lowered():
    """transformers' eager attention: scores in the model's dtype, softmax in float32, the
    probabilities rounded back to the model's dtype (as fused kernels round them too)."""
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) * D ** -0.5
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    site = _compiled_site(fn, _qkv(torch.float32))
    assert site.status == "lowered"


def test_an_op_between_softmax_and_the_product_is_reported():
    def fn(q, k, v):
        return ((q @ k.transpose(-2, -1)).softmax(-1) * 2) @ v

    site = _compiled_site(fn, _qkv())
    assert site.status == "skipped" and "changes the probabilities" in site.reason


class LearnedBias(torch.nn.Module):
    """T5-style: a learned additive bias on the scores."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(1, H, S, S, dtype=torch.float64))

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) + self.bias).softmax(-1) @ v


class RelativeScores(torch.nn.Module):
    """Transformer-XL style: a second, learned score term q @ rᵀ beside q @ kᵀ."""

    def __init__(self):
        super().__init__()
        self.r = torch.nn.Parameter(torch.randn(S, D, dtype=torch.float64))

    def forward(self, q, k, v):
        return (q @ self.r.T + q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_a_learned_bias_is_lowered_with_its_gradient():
    m = LearnedBias()
    inputs = _qkv()
    site = _compiled_site(m, inputs, m.parameters())
    assert site.status == "lowered" and site.has_mask
    _, sites = check_exported(m, inputs, rewritten=False)
    assert [s.status for s in sites] == ["lowered"]


def test_a_second_score_term_is_not_taken_for_the_product():
    """Transformer-XL's q @ rᵀ beside q @ kᵀ: the walk meets two products, and the one it takes
    for q @ kᵀ is not a [B, H, S, D] product: left as written, numerics untouched."""
    m = RelativeScores()
    site = _compiled_site(m, _qkv(), m.parameters())
    assert site.status == "skipped"
