"""Softcapped attention (Gemma 2): the op's ``softcap`` on CPU, and the hand-written chain lowered to it."""
from __future__ import annotations

import pytest
import torch

import attnopt.runtime_ops as R
from attnopt.fx.normalize import op_name
from attnopt.runtime_ops import kernels
from attnopt.runtime_ops.attention import spec_for
from tests.conftest import Capture, assert_grads_match
from tests.models.helpers import _used_parameters, check_exported
from tests.models.transformers_models import EmbedsToLogits
from tests.runtime_ops.variants import SOFTCAP_VARIANTS, Variant, make_inputs, reference, rel_err

ATTN = torch.ops.attnopt.attention.default
CAP = 20.0


def _gemma2() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """A tiny Gemma 2 (eager attention, attention and final logit softcapping, a sliding-window
    layer and a global one) called on embeddings, in float32 (its softmax runs in float32: in a
    float64 model that would be a rounding the op does not make)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                          sliding_window=4, attn_logit_softcapping=CAP, final_logit_softcapping=30.0,
                          query_pre_attn_scalar=16, attention_dropout=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = EmbedsToLogits(Gemma2ForCausalLM(config)).float()
    return model, (torch.randn(2, 10, 64, dtype=torch.float32, requires_grad=True),)


def _softcaps(gm: torch.fx.GraphModule) -> list:
    return [n.kwargs.get("softcap") for n in gm.graph.nodes if n.target is ATTN]


def test_gemma2_compiled_sites_lowered_with_softcap():
    model, inputs = _gemma2()
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(model, backend=capture.backend), inputs, _used_parameters(model, inputs), model)
    (_, after, result), = capture.graphs
    assert [(s.status, s.is_causal, s.has_mask) for s in result.sites] == [("lowered", True, False)] * 2
    assert _softcaps(after) == [CAP, CAP]
    ops = [op_name(n) for n in after.graph.nodes]
    assert "softmax" not in ops and ops.count("tanh") == 1  # the final logits' softcap stays


def test_gemma2_exported_sites_lowered_with_softcap():
    model, inputs = _gemma2()
    new_ep, sites = check_exported(model, inputs, rewritten=False)
    assert [s.status for s in sites] == ["lowered", "lowered"]
    assert _softcaps(new_ep.graph_module) == [CAP, CAP]


def test_gemma2_portable_target_leaves_softcapped_sites_as_written():
    model, inputs = _gemma2()
    new_ep, sites = check_exported(model, inputs, target="portable", rewritten=False)
    assert [s.status for s in sites] == ["skipped", "skipped"]
    assert all("softcap" in s.reason and "portable" in s.reason for s in sites)
    targets = [n.target for n in new_ep.graph.nodes]
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert targets.count(torch.ops.aten.softmax.int) == 2


def _capped(q, k, v, spelling: str):
    s = q @ k.transpose(-1, -2) * 0.25
    if spelling == "reciprocal":
        s = CAP * torch.tanh(s * (1 / CAP))
    elif spelling == "mask_first":  # capping after the mask caps masked scores at -CAP: not masking
        s = torch.tanh(s.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf")) / CAP) * CAP
    elif spelling == "scaled_after":  # a factor after the cap changes the cap
        s = torch.tanh(s / CAP) * CAP * 0.5
    else:
        s = (s / CAP).tanh() * CAP
    return s.softmax(-1) @ v


@pytest.mark.parametrize("spelling", ["divide", "reciprocal"])
def test_softcap_spellings_lowered(spelling):
    q, k, v = (torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    f = lambda q, k, v: _capped(q, k, v, spelling)
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(f, backend=capture.backend), (q, k, v), [], f)
    (site,) = capture.result.sites
    assert site.status == "lowered" and _softcaps(capture.after) == [pytest.approx(CAP)]


@pytest.mark.parametrize("spelling,reason", [("mask_first", "before softcapping"), ("scaled_after", "changes the cap")])
def test_softcap_out_of_order_stays_as_written(spelling, reason):
    q, k, v = (torch.randn(2, 3, 6, 8, dtype=torch.float64) for _ in range(3))
    f = lambda q, k, v: _capped(q, k, v, spelling)
    capture = Capture()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, backend=capture.backend)(q, k, v), f(q, k, v))
    (site,) = capture.result.sites
    assert site.status == "skipped" and reason in site.reason
    assert _softcaps(capture.after) == []


@pytest.mark.parametrize("variant", SOFTCAP_VARIANTS, ids=lambda v: v.name)
def test_math_kernel_softcap_matches_float64_reference(variant: Variant):
    q, k, v, kw = make_inputs(variant, torch.float32, "cpu")
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, **kw)
        ref = reference(q, k, v, kw)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref, (q, k, v), grad.double())
    assert [c.kernel for c in calls] == ["math", "math"]  # the policy passed cpu_flash over
    assert rel_err(out, ref) < 1e-5
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_softcap_gradients_by_finite_differences():
    q, k, v, kw = make_inputs(Variant("small", batch=1, heads_q=2, heads_kv=1, seqlen_q=3, seqlen_k=4, dim_qk=4,
                                      dim_v=4, is_causal=True, softcap=0.7), torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda q, k, v: R.attention(q, k, v, scale=2.0, **kw), (q, k, v))


@pytest.mark.parametrize("variant", SOFTCAP_VARIANTS[:2], ids=lambda v: v.name)
def test_opcheck_with_softcap(variant: Variant):
    q, k, v, kw = make_inputs(variant, torch.float32, "cpu")
    kwargs = {k_: (list(v_) if k_ == "window_size" else v_) for k_, v_ in kw.items()}
    torch.library.opcheck(ATTN, (q, k, v), kwargs)
    out, lse, rng = ATTN(*(t.detach() for t in (q, k, v)), **kwargs)
    torch.library.opcheck(torch.ops.attnopt.attention_backward.default,
                          (torch.randn_like(out), out, lse, rng, *(t.detach() for t in (q, k, v))), kwargs)


def test_cpu_flash_refuses_softcap_and_the_policy_falls_back_to_math():
    q, k, v, kw = make_inputs(SOFTCAP_VARIANTS[0], torch.float32, "cpu", requires_grad=False)
    spec = spec_for(q, k, v, **kw)
    assert kernels.KERNELS["cpu_flash"].unsupported(spec) == "no softcapping"
    assert kernels.explain(spec) == {"cpu_flash": "no softcapping", "math": "ok"}
    assert R.kernel_for(q, k, v, **kw) == "math"
    with pytest.raises(ValueError, match="no softcapping"):
        R.attention(q, k, v, kernel="cpu_flash", **kw)
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        R.attention(q, k, v, **{**kw, "softcap": -1.0})
