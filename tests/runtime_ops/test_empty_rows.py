"""Rows that keep no key: ``empty_rows="nan"`` and ``"nan_additive"`` reproduce eager's NaNs exactly,
forward and backward, against the hand-written chains they stand for (float64 eager autograd)."""
from __future__ import annotations

from typing import Optional

import pytest
import torch

import attnopt.runtime_ops as R

CPU_KERNELS = ("cpu_flash", "math")
NEG = float("-inf")


def _band(sq: int, sk: int, causal: bool, window: tuple[int, int], align: str) -> torch.Tensor:
    i = torch.arange(sq)[:, None] + (sk - sq if align == "bottom_right" else 0)
    j = torch.arange(sk)[None]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    left, right = window[0], 0 if causal else window[1]
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def eager(q, k, v, keep: torch.Tensor, mode: str, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The hand-written chain on [B, H, S, D]: repeat_kv, scores, the exclusions as masked_fill ("nan")
    or as a -inf bias added to the scores ("nan_additive"), softmax, @ v."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mode == "nan":
        s = (s if bias is None else s + bias).masked_fill(~keep, NEG)
    else:
        s = s + (bias if bias is not None else 0) + torch.zeros(keep.shape, dtype=s.dtype).masked_fill(~keep, NEG)
    return torch.softmax(s, -1) @ v


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """NaN exactly where ``want`` has NaN, equal elsewhere."""
    assert torch.equal(got.isnan(), want.isnan()), (got.isnan().sum(), want.isnan().sum())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-10, atol=1e-12)


def _qkv(b=3, hq=4, hkv=2, sq=5, sk=6, d=8):
    torch.manual_seed(0)
    make = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    return make(b, hq, sq, d), make(b, hkv, sk, d), make(b, hkv, sk, d)


def _keep(b, sq, sk, heads=1) -> torch.Tensor:
    keep = torch.rand(b, heads, sq, sk, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[0, 0, 2] = False  # batch 0, (head 0,) row 2 keeps no key
    keep[-1] = True  # the last batch has none empty
    return keep


CASES = {  # name: (mask heads, causal, window, align)
    "gqa": (1, False, (-1, -1), "top_left"),
    "gqa_per_head_mask": (4, False, (-1, -1), "top_left"),
    "causal_bottom_right": (1, True, (-1, -1), "bottom_right"),  # Sq < Sk: the band alone empties no row
    "window": (1, False, (1, 0), "top_left"),
}


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("mode", ["nan", "nan_additive"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_nan_rows_match_eager_forward_and_backward(case, mode, kernel):
    heads, causal, window, align = case
    q, k, v = _qkv()
    keep = _keep(3, 5, 6, heads)
    band = _band(5, 6, causal, window, align)
    ref = eager(q, k, v, keep & band, mode)
    mask = keep if mode == "nan" else torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, NEG)
    out = R.attention(q, k, v, mask, is_causal=causal, window_size=window, causal_align=align, empty_rows=mode,
                      kernel=kernel)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    assert ref.isnan().any() and want[2].isnan().any()  # the case has an empty row
    assert_same(out, ref)
    for g, w in zip(got, want):
        assert_same(g, w)


def test_the_two_spellings_differ_as_derived():
    """One empty row (batch 0, query head 0, row 2). masked_fill: only dV is NaN, over every key of
    batch 0's key/value head 0 (query heads 0 and 1 read it); additive: also dQ of that row and dK
    over the same batch and key/value head."""
    q, k, v = _qkv()
    keep = torch.ones(3, 4, 5, 6, dtype=torch.bool)
    keep[0, 0, 2] = False
    keep[1, :, :, 3] = False
    grad = torch.ones(3, 4, 5, 8, dtype=torch.float64)
    for mode in ("nan", "nan_additive"):
        mask = keep if mode == "nan" else torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, NEG)
        out = R.attention(q, k, v, mask, empty_rows=mode)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        assert out[0, 0, 2].isnan().all() and out.isnan().sum() == 8
        assert dv[0, 0].isnan().all() and dv.isnan().sum() == dv[0, 0].numel()
        additive = mode == "nan_additive"
        assert dq.isnan().sum() == (8 if additive else 0) and dq[0, 0, 2].isnan().all() == additive
        assert dk.isnan().sum() == (dk[0, 0].numel() if additive else 0) and dk[0, 0].isnan().all() == additive


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_rows_emptied_by_the_band_alone(kernel):
    """Bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key."""
    q, k, v = _qkv(sq=7, sk=4)
    ref = eager(q, k, v, _band(7, 4, True, (-1, -1), "bottom_right").expand(3, 1, 7, 4), "nan")
    out = R.attention(q, k, v, is_causal=True, causal_align="bottom_right", empty_rows="nan", kernel=kernel)
    grad = torch.randn_like(ref)
    assert out[:, :, :3].isnan().all() and not out[:, :, 3:].isnan().any()
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert_same(g, w)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_a_learned_bias_gets_the_rows_nan_only_when_additive(kernel):
    q, k, v = _qkv()
    keep = _keep(3, 5, 6)
    bias = torch.randn(1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    for mode in ("nan", "nan_additive"):
        ref = eager(q, k, v, keep, mode, bias)
        mask = bias + torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, NEG)
        if mode == "nan":  # (s + bias).masked_fill(...): the op sees the filled bias; no NaN reaches it
            mask = bias.masked_fill(~keep, NEG)
        out = R.attention(q, k, v, mask, empty_rows=mode, kernel=kernel if kernel == "math" else "auto")
        grad = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k, v, bias), grad)
        want = torch.autograd.grad(ref, (q, k, v, bias), grad)
        assert_same(out, ref)
        for g, w in zip(got, want):
            assert_same(g, w)
        assert want[3].isnan().any() == (mode == "nan_additive")


@pytest.mark.parametrize("mode", ["nan", "nan_additive"])
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_packed_sequences_keep_their_nans_to_themselves(kernel, mode):
    """Each packed sequence is its own attention: rows that run out of keys (bottom-right causal with
    more queries than keys) are NaN, and so are the dV rows of their own sequence only; a sequence
    with no keys at all gives 0, as eager's softmax over no scores does."""
    torch.manual_seed(0)
    cu_q = torch.tensor([0, 4, 7, 9, 12], dtype=torch.int32)  # query lengths 4, 3, 2, 3
    cu_k = torch.tensor([0, 4, 5, 5, 8], dtype=torch.int32)  # key lengths 4, 1, 0, 3
    q = torch.randn(12, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(8, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = R.attention(q, k, v, layout="thd", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=4,
                      is_causal=True, causal_align="bottom_right", empty_rows=mode, kernel=kernel)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    refs = []
    for (a, b), (c, d) in zip(zip(cu_q.tolist(), cu_q[1:].tolist()), zip(cu_k.tolist(), cu_k[1:].tolist())):
        dense = lambda t, lo, hi: t[lo:hi].transpose(0, 1).unsqueeze(0)
        band = _band(b - a, d - c, True, (-1, -1), "bottom_right")
        refs.append(eager(dense(q, a, b), dense(k, c, d), dense(v, c, d), band, mode)[0].transpose(0, 1))
    ref = torch.cat(refs)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    assert out[4:6].isnan().all() and (out[7:9] == 0).all() and out.isnan().any(-1).sum() == 2 * 4
    assert_same(out, ref)
    for g, w in zip(got, want):
        assert_same(g, w)


def test_zero_is_the_default_and_sdpa_convention():
    q, k, v = _qkv()
    keep = _keep(3, 5, 6)
    out = R.attention(q, k, v, keep)
    assert not out.isnan().any() and (out[0, :2, 2] == 0).all()
    assert not any(g.isnan().any() for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_sinks_leave_no_row_empty():
    q, k, v = _qkv()
    keep = _keep(3, 5, 6)
    sinks = torch.zeros(4, dtype=torch.float64)
    out = R.attention(q, k, v, keep, sinks=sinks, empty_rows="nan")
    assert not out.isnan().any() and (out[0, :2, 2] == 0).all()


@pytest.mark.parametrize("mode", ["nan", "nan_additive"])
def test_opcheck_with_nan_rows_requested(mode):
    """opcheck compares outputs without equal_nan, so its call keeps a key in every row; the NaNs
    themselves go through torch.compile below."""
    q, k, v = _qkv()
    keep = _keep(3, 5, 6)
    keep[..., 0] = True
    kwargs = {"empty_rows": mode, "is_causal": True, "causal_align": "bottom_right"}
    torch.library.opcheck(torch.ops.attnopt.attention.default, (q, k, v, keep), kwargs)
    args = tuple(t.detach() for t in (q, k, v))
    out, lse, rng = torch.ops.attnopt.attention.default(*args, keep, **kwargs)
    torch.library.opcheck(torch.ops.attnopt.attention_backward.default,
                          (torch.randn_like(out), out, lse, rng, *args, keep), kwargs)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_nan_rows_through_torch_compile(backend):
    q, k, v = _qkv()
    keep = _keep(3, 5, 6)
    bias = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, NEG)
    ref = eager(q, k, v, keep, "nan_additive")
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, m: R.attention(q, k, v, m, empty_rows="nan_additive"), backend=backend,
                      fullgraph=True)
    out = f(q, k, v, bias)
    assert_same(out, ref)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), want):
        assert_same(g, w)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("mode", ["nan", "nan_additive"])
def test_a_nan_query_spreads_as_in_eager(kernel, mode):
    """A query row holding a NaN (an earlier attention's row that kept no key): its output row is
    NaN, and backward spreads NaN over dQ's row, dV of its key/value head, and dK wherever the row's
    NaN scores reach or the query itself is NaN (0 * NaN is NaN)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 8, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    q[0, 1, 3, :4] = float("nan")  # half of one query's components
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    keep = torch.arange(6)[None, :] <= torch.arange(6)[:, None]
    args = (q, k, v)
    mask = keep if mode == "nan" else torch.zeros(6, 6, dtype=torch.float64).masked_fill(~keep, NEG)
    out = R.attention(*args, mask, kernel=kernel, empty_rows=mode)
    ref = eager(*args, keep, mode)
    torch.testing.assert_close(out, ref, equal_nan=True)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad)):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("mode", ["nan", "nan_additive"])
@pytest.mark.parametrize("operand", ["key", "value"])
def test_a_nan_key_or_value_spreads_as_in_eager(mode, operand):
    """A key or value row holding a NaN reaches the rows and gradients the written chain's own ops
    take it to (a filled score drops a NaN key; 0 * NaN in the product with V does not): the op
    runs the math kernel, which repeats those ops."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    (k if operand == "key" else v)[0, 0, 4, 1] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    keep = torch.arange(6)[None, :] <= torch.arange(6)[:, None]
    mask = keep if mode == "nan" else torch.zeros(6, 6, dtype=torch.float64).masked_fill(~keep, NEG)
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, mask, empty_rows=mode)
        ref = eager(q, k, v, keep, mode)
        torch.testing.assert_close(out, ref, equal_nan=True)
        grad = torch.randn_like(ref)
        for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(got, want, equal_nan=True)
    assert {c.kernel for c in calls} == {"math"}
