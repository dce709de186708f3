"""Attention written on 3-D [B*H, S, D] tensors (Megatron's baddbmm/bmm, plain bmm, 3-D matmul) is
lowered to the op where its operands provably are reshapes of 4-D tensors, and left as written
(with the reason) where not."""
from __future__ import annotations

import math

import pytest
import torch

import attnopt
from attnopt.fx.normalize import op_name
from tests.conftest import Capture, assert_grads_match
from tests.models.helpers import check_exported

ATTN = torch.ops.attnopt.attention.default
WRITTEN = {"baddbmm", "bmm", "matmul", "softmax"}


class CoreAttention(torch.nn.Module):
    """Megatron's CoreAttention with FusedScaleMaskSoftmax's torch path: q/k/v [S, B, H, D] viewed
    as [S, B*H, D] and transposed to [B*H, S, D]; scores by baddbmm into a fresh buffer, viewed as
    [B, H, Sq, Sk], scaled (the layer-number coefficient), causally masked, softmax, dropout;
    context by bmm, viewed as [B, H, Sq, D] and permuted back to [S, B, H*D]."""

    def __init__(self, dim: int, mask: str = "masked_fill", fill: float = float("-inf"), softcap: float = 0.0,
                 coeff: float = 2.0):
        super().__init__()
        self.norm_factor = math.sqrt(dim) * coeff  # apply_query_key_layer_scaling
        self.coeff, self.mask, self.fill, self.softcap = coeff, mask, fill, softcap
        self.dropout = torch.nn.Dropout(0.0)

    def _masked(self, scores: torch.Tensor, attention_mask) -> torch.Tensor:
        if attention_mask is None:
            i = torch.arange(scores.shape[-1], device=scores.device)
            attention_mask = i[None, None, None, :] > i[None, None, :, None]  # True = masked (Megatron)
        if self.mask == "additive":
            return scores + torch.where(~attention_mask, 0.0, float("-inf"))
        return scores.masked_fill(attention_mask, self.fill)

    def forward(self, query, key, value, attention_mask=None):
        sq, b, h, d = query.shape
        sk = key.shape[0]
        q3 = query.reshape(sq, b * h, d)
        k3 = key.view(sk, b * h, d)
        buffer = torch.empty(b * h, sq, sk, dtype=query.dtype, device=query.device)
        scores = torch.baddbmm(buffer, q3.transpose(0, 1), k3.transpose(0, 1).transpose(1, 2), beta=0.0,
                               alpha=1.0 / self.norm_factor)
        scores = scores.view(b, h, sq, sk).float() * self.coeff
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = torch.softmax(self._masked(scores, attention_mask), dim=-1).to(query.dtype)
        probs = self.dropout(probs)
        context = torch.bmm(probs.view(b * h, sq, sk), value.view(sk, b * h, d).transpose(0, 1))
        context = context.view(b, h, sq, d).permute(2, 0, 1, 3).contiguous()
        return context.view(sq, b, h * d)


def _sbhd(dtype=torch.float32, seq=8, batch=2, heads=4, dim=8):
    """[S, B, H, D] inputs; float32, where CoreAttention's ``.float()`` softmax keeps every value."""
    torch.manual_seed(0)
    return tuple(torch.randn(seq, batch, heads, dim, dtype=dtype, requires_grad=True) for _ in range(3))


def _compile(model, inputs, **compile_kw) -> Capture:
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(model, backend=capture.backend, **compile_kw), inputs, [], model)
    return capture


def _written(gm: torch.fx.GraphModule) -> set[str]:
    return WRITTEN & {op_name(n) for n in gm.graph.nodes}


@pytest.mark.parametrize("mask", ["masked_fill", "additive"])
def test_megatron_core_attention_compiled(mask):
    capture = _compile(CoreAttention(8, mask).train(), _sbhd())
    (site,) = capture.result.sites
    assert (site.status, site.layout, site.kv_layout, site.out_layout) == ("lowered", "sbhd", "sbhd", "sbhd")
    assert site.is_causal and not site.has_mask
    assert not _written(capture.after)
    (call,) = [n for n in capture.after.graph.nodes if n.target is ATTN]
    assert call.kwargs["scale"] == pytest.approx(1 / math.sqrt(8))


def test_megatron_core_attention_exported():
    new_ep, sites = check_exported(CoreAttention(8).train(), _sbhd(), rewritten=False)
    assert [(s.status, s.layout, s.out_layout, s.is_causal) for s in sites] == [("lowered", "sbhd", "sbhd", True)]
    assert not _written(new_ep.graph_module)


def test_megatron_with_a_mask_input_and_dynamic_batch_and_sequence():
    model, capture = CoreAttention(8).train(), Capture()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture.backend)
    for seq, batch in ((8, 2), (12, 3), (6, 4)):
        q, k, v = _sbhd(seq=seq, batch=batch)
        mask = torch.rand(batch, 1, seq, seq) > 0.7
        mask[..., 0] = False  # no fully masked row (there -inf gives NaN, the op 0)
        for t, dims in ((q, (0, 1)), (k, (0, 1)), (v, (0, 1)), (mask, (0, 2, 3))):
            for d in dims:
                torch._dynamo.mark_dynamic(t, d)
        assert_grads_match(compiled, (q, k, v, mask), [], model)
    (_, after, result), = capture.graphs  # one graph for every shape: no recompiles
    assert [(s.status, s.has_mask, s.is_causal) for s in result.sites] == [("lowered", True, False)]
    assert not _written(after)


def _bhsd_bmm(q, k, v):
    """[B, H, S, D] tensors reshaped to [B*H, S, D]; the output is read as [B*H, S, D]."""
    b, h, s, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
    i = torch.arange(s)
    w = (torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(d)).masked_fill(i[None, :] > i[:, None], float("-inf"))
    return torch.bmm(w.softmax(-1), v3) * 2.0


def _matmul_3d(q, k, v):
    """3-D matmul, q pre-scaled, the output viewed back to [B, H, S, D] and then to [B, S, H*D]."""
    b, h, s, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
    w = torch.matmul(q3 * d ** -0.5, k3.transpose(-1, -2))
    return torch.matmul(torch.softmax(w, dim=-1), v3).view(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)


@pytest.mark.parametrize("f,out_layout", [(_bhsd_bmm, "bhsd"), (_matmul_3d, "bshd")], ids=["bmm", "matmul"])
def test_plain_3d_spellings_lowered(f, out_layout):
    q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    capture = _compile(f, (q, k, v))
    (site,) = capture.result.sites
    assert (site.status, site.layout, site.out_layout) == ("lowered", "bhsd", out_layout)
    assert not _written(capture.after)


def test_a_finite_fill_is_lowered_with_the_fill():
    """Megatron masks with -10000.0: the op takes the fill and decides per call whether it acts as
    -inf (scores bounded well above it, every row keeps a key: any kernel) or not (the math kernel
    with the fill, as masked_fill computes it: here a mask input that leaves a row no key)."""
    q, k, v = _sbhd()
    mask = torch.rand(2, 1, 8, 8) > 0.5
    mask[0, 0, 3] = True  # a row with every key masked
    cases = [(CoreAttention(8, fill=-10000.0), (q, k, v), "cpu_flash"),
             (CoreAttention(8, fill=-10000.0, softcap=30.0), (q, k, v, mask), "math")]
    for model, inputs, kernel in cases:
        with attnopt.runtime_ops.trace_kernels() as calls:
            capture = _compile(model.train(), inputs)
        (site,) = capture.result.sites
        assert site.status == "lowered" and {c.kernel for c in calls} == {kernel}
        (call,) = [n for n in capture.after.graph.nodes if n.target is ATTN]
        assert call.kwargs["mask_fill"] == -10000.0


def _bad_split(q, k, v):
    """q split as [2, 4] heads, k as [4, 2]: the same 8 bmm rows, paired differently."""
    return torch.bmm(torch.bmm(q.reshape(8, 6, 8), k.reshape(8, 6, 8).transpose(1, 2)).softmax(-1), v.reshape(8, 6, 8))


def _not_reshaped(q, k, v):
    return torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)


@pytest.mark.parametrize("f,shapes,reason", [
    (_bad_split, [(2, 4, 6, 8), (4, 2, 6, 8), (2, 4, 6, 8)], "differ in batch or heads"),
    (_not_reshaped, [(8, 6, 8)] * 3, "not provably a reshape"),
], ids=["split_differs", "not_reshaped"])
def test_3d_operands_not_proven_stay_as_written(f, shapes, reason):
    inputs = tuple(torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes)
    capture = _compile(f, inputs)
    (site,) = capture.result.sites
    assert site.status == "skipped" and reason in site.reason
    assert _written(capture.after) == {"bmm", "softmax"}
