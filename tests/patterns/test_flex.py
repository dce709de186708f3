"""flex_attention calls become attention sites at both IR levels: q/k/v traced through their layout
chains and K/V repetition like SDPA's operands, GQA by head count, the scale flex fills in, and the
mask handed over as the call's mask_mod, buffers and block mask; calls the op cannot stand for (a
score_mod that changes the scores, a log-sum-exp that is read) keep a reason."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnopt.fx import Writes
from attnopt.patterns import find_flex_sites
from tests.flex_support import QUIET, dynamo_graph, export_graph

pytestmark = QUIET
B, S, H, G, D = 2, 256, 4, 2, 16
R = H // G
IDS = torch.sort(torch.randint(0, 3, (B, S), generator=torch.Generator().manual_seed(0)), dim=1).values.int()


def block_causal(b, h, q, k):
    return (k <= q) & (IDS[b, q] == IDS[b, k])


MASK = create_block_mask(block_causal, B, None, S, S, device="cpu", BLOCK_SIZE=64)


def repeat_kv(x, n_rep):  # torchtitan's, on [B, S, Hkv, D]
    bs, slen, n_kv_heads, head_dim = x.shape
    return torch.unsqueeze(x, dim=3).expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, -1, head_dim)


class Attention(torch.nn.Module):
    """torchtitan's attention core: [B, S, H, D] projections, K/V repeated (``repeat``) or passed
    with fewer heads (``enable_gqa``), transposed to [B, H, S, D] for flex and back."""

    def __init__(self, gqa: str = "repeat", score_mod=None, lse: bool = False):
        super().__init__()
        self.gqa, self.score_mod, self.lse, self.mask = gqa, score_mod, lse, MASK

    def forward(self, x):
        q, k, v = x.split([H * D, G * D, G * D], dim=-1)
        q, k, v = q.view(B, S, H, D), k.view(B, S, G, D), v.view(B, S, G, D)
        if self.gqa == "repeat":
            k, v = repeat_kv(k, R), repeat_kv(v, R)
        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=self.score_mod,
                             block_mask=self.mask, enable_gqa=self.gqa == "enable_gqa", return_lse=self.lse)
        if self.lse:
            out, lse = out
            return out.transpose(1, 2).reshape(B, S, -1), lse
        return out.transpose(1, 2).contiguous().reshape(B, S, -1)


def _sites(module, level: str):
    x = torch.randn(B, S, (H + 2 * G) * D)
    gm = dynamo_graph(module, x) if level == "dynamo" else export_graph(module, x)
    return find_flex_sites(gm.graph, Writes(gm.graph, gm))


LEVELS = ["dynamo", "export"]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("gqa", ["repeat", "enable_gqa"])
def test_operands_and_mask_are_read(level, gqa):
    (site,) = _sites(Attention(gqa), level)
    assert site.skip_reason is None and site.kind == "flex"
    assert (site.query.dims, site.key.dims, site.value.dims, site.output.layout) == ("bshd",) * 4
    assert site.key.group == site.value.group == (R if gqa == "repeat" else 1)
    assert site.scale == pytest.approx(D ** -0.5)
    mm = site.mask_mod
    assert mm.sizes == (B, H, S, S) and mm.block_mask.block_size == (64, 64)
    assert mm.block_mask.seq_lengths == (S, S) and all(t is not None for t in mm.block_mask.tensors)
    (ids,) = mm.buffers
    assert tuple(ids.meta["val" if level == "export" else "example_value"].shape) == (B, S)


def _biased(score, b, h, q, k):
    return score + (q - k)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("module, reason", [
    (Attention(score_mod=_biased), "score_mod modifies the scores"),
    (Attention(score_mod=lambda score, b, h, q, k: score), None),
    (Attention(lse=True), "logsumexp output is read"),
], ids=["bias", "identity_score_mod", "lse_read"])
def test_calls_the_op_cannot_stand_for_keep_a_reason(level, module, reason):
    (site,) = _sites(module, level)
    if reason is None:
        assert site.skip_reason is None
    else:
        assert reason in site.skip_reason
