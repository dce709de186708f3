"""Attention sinks (GPT-OSS): a learned logit per query head in every row's softmax denominator,
with no value attached: p_j = exp(s_j - m) / (sum_i exp(s_i - m) + exp(sink - m)).

With L the log-sum-exp of a row's scores and L' = logaddexp(L, sink) that of the scores and the
sink, the row's probabilities are exp(s_j - L') and its output is the sink-free output times
exp(L - L') = sigmoid(L - sink). A kernel whose backward reads the probabilities from lse and
rowsum(dO * O) from out therefore gets the exact dQ, dK and dV from (out, L'); the sink is one more
score column whose value is 0, so dS_sink = p_sink * (0 - rowsum(dO * O)), that is

    d loss / d sink[h] = -sum over the rows of head h of exp(sink[h] - L') * rowsum(dO * O).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .spec import per_row


def fold(out: Tensor, lse: Tensor, sinks: Tensor, thd: bool) -> tuple[Tensor, Tensor]:
    """(out, lse) of a forward without sinks -> with them. ``out`` is [B, Hq, Sq, Dv] (thd [T, Hq, Dv]),
    ``lse`` [B, Hq, Sq] (thd [Hq, T]); rows that kept no key (lse -inf, or +inf from FlashAttention)
    keep out 0 and get lse = sink."""
    plain = torch.where(lse == float("inf"), float("-inf"), lse)
    total = torch.logaddexp(plain, sinks.to(lse.dtype)[:, None])
    kept = torch.exp(plain - total)  # the share of each row's weight left on its keys
    return (out * per_row(kept, thd)).to(out.dtype), total


def grad(grad_out: Tensor, out: Tensor, lse: Tensor, sinks: Tensor, thd: bool) -> Tensor:
    """d loss / d sinks from the output's gradient, the output and the lse with the sinks folded in."""
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # [B, Hq, Sq]; thd [T, Hq]
    if thd:
        delta = delta.transpose(0, 1)
    p_sink = torch.exp(sinks.to(lse.dtype)[:, None] - lse)
    return (-(p_sink * delta).sum((1,) if thd else (0, 2))).to(sinks.dtype)
