"""flex_attention both ways, forward and backward checked against eager.

flex calls whose mask_mod is proven run as the op (flags, chunks as batches, packed documents, key
padding), their block lists checked on the device against the mask_mod; near misses (strict bounds,
per head, read through a length, a mask_mod that leaves the block mask to decide) stay flex_attention
with the reason. The other way, a proven mask no flag expresses (a strict band, chunks with key
padding) runs as flex_attention over its structure where the device policy says flex is faster,
unless the original gives a row that keeps no key something flex does not (NaN) or flex lacks a
feature of the call (dropout)."""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, flex_attention

import attnopt
import attnopt.masks.plan as plan_module
from tests.conftest import Capture, assert_grads_match
from tests.flex_support import QUIET, flex_grad_on_cpu, flex_nodes  # noqa: F401 - a fixture

pytestmark = [QUIET, pytest.mark.usefixtures("flex_grad_on_cpu")]
B, H, G, S, D = 2, 4, 2, 128, 16
W, C = 24, 32
_gen = torch.Generator().manual_seed(0)
IDS = torch.sort(torch.randint(0, 4, (B, S), generator=_gen), dim=1).values.int()
KEEP = torch.rand(B, S, generator=_gen) > 0.3
LENGTHS = torch.tensor([100, 45])


def causal(b, h, q, k):
    return q >= k


def everything(b, h, q, k):
    return q >= 0


# name: (mask_mod, what becomes of the call: a plan action, or the reason it stays flex_attention)
CASES = {
    "no_block_mask": (None, "flags"),  # flex's own: one block of every key
    "causal": (causal, "flags"),
    "sliding_window": (lambda b, h, q, k: (k <= q) & (q - k < W), "flags"),
    "window_off_by_one": (lambda b, h, q, k: (k <= q) & (q - k <= W), "flags"),
    "fixed_block": (lambda b, h, q, k: q // C == k // C, "batches"),
    "chunked_causal": (lambda b, h, q, k: (q // C == k // C) & (k <= q), "batches"),
    "block_causal": (and_masks(causal, lambda b, h, q, k: IDS[b, q] == IDS[b, k]), "thd"),
    "padding_causal": (lambda b, h, q, k: KEEP[b, k] & (k <= q), "key_padding"),
    "strict": (lambda b, h, q, k: k < q, "band not expressible"),
    "per_head": (lambda b, h, q, k: (k <= q) | (h == 1), "mask_mod not recognised"),
    "key_length": (lambda b, h, q, k: k < LENGTHS[b], "mask_mod not recognised"),
    "block_mask_decides": (everything, "the block mask alone decides"),
}


def _block_mask(mask_mod) -> Optional[BlockMask]:
    if mask_mod is None:
        return None
    if mask_mod is everything:  # a block-sparse mask stated by its blocks alone: the diagonal blocks
        n = S // 32
        num = torch.ones(B, 1, n, dtype=torch.int32)
        rows = torch.arange(n, dtype=torch.int32)
        index = ((rows[:, None] + rows[None, :]) % n).expand(B, 1, n, n).contiguous()  # row i lists block i first
        return BlockMask.from_kv_blocks(num, index, BLOCK_SIZE=32, mask_mod=mask_mod, seq_lengths=(S, S))
    return create_block_mask(mask_mod, B, None, S, S, device="cpu", BLOCK_SIZE=32)


MASKS = {name: _block_mask(mm) for name, (mm, _) in CASES.items()}


def _flex_calls(x):
    """One torchtitan-style flex call per case on the same projections (GQA by head count)."""
    q, k, v = x.split([H * D, G * D, G * D], dim=-1)
    q, k, v = (t.view(B, S, -1, D).transpose(1, 2) for t in (q, k, v))
    return tuple(flex_attention(q, k, v, block_mask=bm, enable_gqa=True).transpose(1, 2).reshape(B, S, H * D)
                 for bm in MASKS.values())


def test_flex_calls_are_lowered_where_the_mask_mod_is_proven():
    x = torch.randn(B, S, (H + 2 * G) * D, dtype=torch.float64, requires_grad=True)
    capture = Capture()
    torch._dynamo.reset()
    outs = torch.compile(_flex_calls, backend=capture.backend)(x)
    refs = _flex_calls(x)
    grads = [torch.randn_like(r) for r in refs]
    got = torch.autograd.grad(outs, x, grads)[0]
    want = torch.autograd.grad(refs, x, grads)[0]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for site, (name, (_, expected)) in zip(capture.result.sites, CASES.items()):
        if expected in plan_module.ACTIONS:
            assert (site.status, site.mask_action) == ("lowered", expected), (name, site.reason)
        else:
            assert site.status == "skipped" and site.reason.startswith("left as flex_attention"), name
            assert expected in site.reason, (name, site.reason)
    left = sum(not isinstance(e, str) or e not in plan_module.ACTIONS for _, e in CASES.values())
    assert len(flex_nodes(capture.after)) == left


def _lowered_flex(mask: BlockMask):
    def f(q):
        return flex_attention(q, q, q, block_mask=mask)

    capture = Capture()
    torch._dynamo.reset()
    return torch.compile(f, backend=capture.backend), capture


@pytest.mark.parametrize("case", ["ids_in_two_runs", "blocks_of_another_mask"])
def test_inputs_the_lowering_does_not_hold_for_fail_loudly(case):
    """The two run-time checks: document ids must each be one run of their row, and the BlockMask's
    block lists must be those of its mask_mod (flex skips unlisted blocks)."""
    if case == "ids_in_two_runs":
        ids = IDS.clone()
        ids[:, -8:] = 0  # id 0 again at the end of each row: a document in two pieces
        mask = create_block_mask(lambda b, h, q, k: ids[b, q] == ids[b, k], B, None, S, S, device="cpu")
    else:
        window = create_block_mask(lambda b, h, q, k: (k <= q) & (q - k < W), B, None, S, S, device="cpu",
                                   BLOCK_SIZE=32)
        mask = BlockMask.from_kv_blocks(window.kv_num_blocks, window.kv_indices, window.full_kv_num_blocks,
                                        window.full_kv_indices, BLOCK_SIZE=32, mask_mod=causal)
    compiled, capture = _lowered_flex(mask)
    with pytest.raises(RuntimeError, match="does not hold for these inputs"):
        compiled(torch.randn(B, H, S, D, dtype=torch.float64))
    assert capture.result.sites[0].status == "lowered"


def test_portable_target_takes_what_sdpa_expresses():
    """target="portable": a causal mask_mod becomes SDPA's is_causal, packed documents stay flex."""
    def f(q):
        return flex_attention(q, q, q, block_mask=MASKS["causal"]) + flex_attention(q, q, q,
                                                                                    block_mask=MASKS["block_causal"])

    q = torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True)
    capture = Capture(target="portable")
    torch._dynamo.reset()
    assert_grads_match(torch.compile(f, backend=capture.backend), (q,), [], f, rtol=1e-9, atol=1e-12)
    causal_site, documents_site = capture.result.sites
    assert causal_site.status == "lowered" and documents_site.status == "skipped"
    assert "left as flex_attention for target='portable'" in documents_site.reason
    assert [n.kwargs.get("is_causal") for n in capture.after.graph.nodes
            if n.target is torch.ops.aten.scaled_dot_product_attention.default] == [True]


# --- flex as the target of a proven mask -----------------------------------------------------------
@pytest.fixture
def flex_on_cpu(monkeypatch):
    """The device policy, widened to CPU so that the flex target runs here."""
    monkeypatch.setattr(plan_module, "FLEX_DEVICES", frozenset({"cpu", "cuda"}))


def _sdpa(mask_fn, dropout: float = 0.0):
    def f(x, keep):
        q = x.view(B, S, H, D).transpose(1, 2)
        i = torch.arange(S, device=x.device)
        mask = mask_fn(i[:, None], i[None, :], keep)
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).reshape(B, S, -1)
    return f


def _hand_written(mask_fn):
    def f(x, keep):
        q = x.view(B, S, H, D).transpose(1, 2)
        i = torch.arange(S, device=x.device)
        scores = (q @ q.transpose(-2, -1)) / math.sqrt(D)
        scores = scores.masked_fill(~mask_fn(i[:, None], i[None, :], keep), float("-inf"))
        return (scores.softmax(-1) @ q).transpose(1, 2).reshape(B, S, -1)
    return f


def strict_band(q, k, keep):
    return k < q


def chunks_with_padding(q, k, keep):
    return (q // C == k // C) & (k <= q) & keep[:, None, None, :]


def chunks_with_window(q, k, keep):  # every row keeps its diagonal
    return (q // C == k // C) & (k <= q) & (q - k < W)


FLEX_TARGETS = {
    "sdpa_strict_band": (_sdpa(strict_band), "flex"),
    "sdpa_chunks_with_padding": (_sdpa(chunks_with_padding), "flex"),
    "hand_written_chunks_with_window": (_hand_written(chunks_with_window), "flex"),
    "hand_written_strict_band": (_hand_written(strict_band), "kept"),  # row 0 keeps no key: NaN there
}


def _compiled_site(f, x, keep):
    """The one site of ``f`` compiled; forward and backward checked against eager (forward only,
    NaN for NaN, where the original gives a row that keeps no key NaN: its gradients are NaN too)."""
    capture = Capture()
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=capture.backend)
    if f(x, keep).isnan().any():
        torch.testing.assert_close(compiled(x, keep), f(x, keep), rtol=1e-9, atol=1e-12, equal_nan=True)
    else:
        assert_grads_match(compiled, (x, keep), [], f, rtol=1e-9, atol=1e-12)
    (site,) = capture.result.sites
    return site, capture.after


@pytest.mark.usefixtures("flex_on_cpu")
@pytest.mark.parametrize("name", list(FLEX_TARGETS))
def test_proven_masks_no_flag_expresses_run_as_flex(name):
    f, action = FLEX_TARGETS[name]
    x = torch.randn(B, S, H * D, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, :3], keep[1, 50:] = False, False
    site, after = _compiled_site(f, x, keep)
    assert (site.status, site.mask_action) == ("lowered", action), site.mask
    assert len(flex_nodes(after)) == (action == "flex")


def test_flex_is_not_the_target_where_the_policy_or_the_call_says_no(monkeypatch):
    x = torch.randn(B, S, H * D, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(B, S, dtype=torch.bool)
    site, after = _compiled_site(_sdpa(strict_band), x, keep)  # CPU: the dense mask is faster
    assert site.mask_action == "kept" and not flex_nodes(after)
    monkeypatch.setattr(plan_module, "FLEX_DEVICES", frozenset({"cpu"}))
    capture = Capture()
    torch._dynamo.reset()
    torch.compile(_sdpa(strict_band, dropout=0.5), backend=capture.backend)(x, keep)
    (site,) = capture.result.sites
    assert site.mask_action == "kept" and "flex_attention has no dropout" in site.mask


@pytest.mark.usefixtures("flex_on_cpu")
def test_exported_programs_get_flex_too():
    class Band(torch.nn.Module):
        def forward(self, x, keep):
            return _sdpa(chunks_with_padding)(x, keep)

    x = torch.randn(B, S, H * D, dtype=torch.float64)
    keep = torch.rand(B, S, generator=_gen) > 0.2
    ep, result = attnopt.optimize(torch.export.export(Band(), (x, keep)), strict=True, return_result=True)
    assert [s.mask_action for s in result.sites] == ["flex"]
    assert len(flex_nodes(ep.graph_module)) == 1
    torch.testing.assert_close(ep.module()(x, keep), Band()(x, keep), rtol=1e-9, atol=1e-12)


# --- on the GPU: Inductor compiles flex ------------------------------------------------------------
def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def _assert_near(fn, ref_fn, inputs: tuple, tol: float = 2e-2) -> None:
    """bf16 forward and input gradients within ``tol`` of the reference, relative to its norm."""
    out, ref = fn(*inputs), ref_fn(*inputs)
    assert _relative_error(out, ref) < tol
    grad = torch.randn_like(ref)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    for got, want in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        assert _relative_error(got, want) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["block_causal", "sliding_window", "chunked_causal", "strict"])
def test_flex_calls_on_cuda_under_inductor(name):
    mask_mod, _ = CASES[name]
    ids = IDS.cuda()
    if name == "block_causal":
        mask_mod = and_masks(causal, lambda b, h, q, k: ids[b, q] == ids[b, k])
    mask = create_block_mask(mask_mod, B, None, S, S, device="cuda")
    q, k, v = (torch.randn(B, n, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (H, G, G))

    def f(q, k, v):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=True)

    capture = Capture("inductor")
    torch._dynamo.reset()
    _assert_near(torch.compile(f, backend=capture.backend), torch.compile(f), (q, k, v))
    assert capture.result.sites[0].status == ("skipped" if name == "strict" else "lowered")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mask_fn", [strict_band, chunks_with_padding], ids=["strict_band", "chunks_with_padding"])
def test_flex_target_on_cuda_under_inductor(mask_fn):
    """Against SDPA's math backend, which gives a row that keeps no key zeros (as the op and flex
    do; CUDA's fused masked kernels give such rows other values)."""
    x = torch.randn(B, S, H * 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    keep = torch.rand(B, S, device="cuda") > 0.2

    def f(x, keep):
        q = x.view(B, S, H, 64).transpose(1, 2)
        i = torch.arange(S, device=x.device)
        mask = mask_fn(i[:, None], i[None, :], keep)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).transpose(1, 2).reshape(B, S, -1)

    def math(x, keep):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return f(x, keep)

    capture = Capture("inductor")
    torch._dynamo.reset()
    _assert_near(torch.compile(f, backend=capture.backend), math, (x, keep))
    assert capture.result.sites[0].mask_action == "flex"
