"""attnopt.optimize: the program's signature is preserved in every case (an attention output that is
itself a program output, a forward argument named like a Python builtin), a rewrite the verifier
rejects falls back like any pass failure, and optimizing emits no warnings."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._export.verifier import SpecViolationError

import attnopt
import attnopt.export
from tests.models.helpers import check_exported

ATTN = torch.ops.attnopt.attention.default
B, S, HQ, HKV, D = 2, 8, 4, 2, 16


class AttentionIsTheOutput(nn.Module):
    """Returns SDPA's result, or its BSHD copy, directly: the node a lowering replaces is the
    program output."""

    def __init__(self, bshd: bool):
        super().__init__()
        self.bshd = bshd
        self.q = nn.Linear(HQ * D, HQ * D, bias=False)
        self.kv = nn.Linear(HQ * D, 2 * HKV * D, bias=False)

    def forward(self, x):
        q = self.q(x).view(B, S, HQ, D).transpose(1, 2)
        k, v = self.kv(x).view(B, S, 2, HKV, D).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).contiguous() if self.bshd else out


class NamedInput(nn.Module):
    """``forward(self, input)`` like ``nn.Linear``: export names the placeholder ``input``, a
    Python builtin that torch.fx renames when it copies a graph."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HQ * D, HQ * D)

    def forward(self, input):
        q = self.proj(input).view(B, S, HQ, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(B, S, -1)


def _signature(ep: torch.export.ExportedProgram) -> tuple:
    sig = ep.graph_signature
    return (sig.input_specs, sig.output_specs, sig.user_inputs, sig.user_outputs)


def _x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(B, S, HQ * D, requires_grad=True)


@pytest.mark.parametrize("target", ["op", "portable"])
@pytest.mark.parametrize("bshd", [False, True], ids=["sdpa_out", "bshd_copy_out"])
def test_attention_output_that_is_a_program_output(target, bshd, tmp_path):
    torch.manual_seed(0)
    model = AttentionIsTheOutput(bshd)
    new_ep, sites = check_exported(model, (_x(),), target=target)
    assert [s.status for s in sites] == ["lowered"]
    ep = torch.export.export(model, (_x(),))
    assert _signature(new_ep) == _signature(ep)
    if target == "op":
        torch.export.save(new_ep, tmp_path / "p.pt2")
        loaded = torch.export.load(tmp_path / "p.pt2")
        assert sum(n.target is ATTN for n in loaded.graph.nodes) == 1 and _signature(loaded) == _signature(ep)


@pytest.mark.parametrize("model", [NamedInput(), nn.Sequential(nn.Linear(HQ * D, HQ * D), nn.ReLU())],
                         ids=["attention", "sequential"])
def test_forward_argument_named_input(model):
    ep = torch.export.export(model, (_x(),))
    assert ep.graph_signature.user_inputs == ("input",)
    new_ep, sites = check_exported(model, (_x(),), rewritten=isinstance(model, NamedInput))
    assert _signature(new_ep) == _signature(ep)
    assert [s.status for s in sites] == (["lowered"] if isinstance(model, NamedInput) else [])


def test_verifier_failure_falls_back_and_strict_raises(monkeypatch):
    """Without the output renaming, the program output's name no longer matches the signature:
    the verifier's error falls back to the unchanged program (strict raises it)."""
    model = AttentionIsTheOutput(bshd=False)
    ep = torch.export.export(model, (_x(),))
    monkeypatch.setattr(attnopt.export, "_keep_output_names", lambda gm, ep, result: None)
    with pytest.warns(UserWarning, match="failed verification, program left unchanged"):
        new_ep, result = attnopt.optimize(ep, return_result=True)
    assert result.error.startswith("SpecViolationError") and result.sites == []
    assert not any(n.target is ATTN for n in new_ep.graph.nodes) and _signature(new_ep) == _signature(ep)
    torch.testing.assert_close(new_ep.module()(_x()), model(_x()))
    with pytest.raises(SpecViolationError):
        attnopt.optimize(ep, strict=True)


def test_input_program_is_not_modified_and_parameters_are_shared():
    model = AttentionIsTheOutput(bshd=True)
    ep = torch.export.export(model, (_x(),))
    before = [(n.name, n.target) for n in ep.graph.nodes]
    new_ep = attnopt.optimize(ep)
    assert [(n.name, n.target) for n in ep.graph.nodes] == before
    assert new_ep.graph_module is not ep.graph_module
    assert all(new_ep.state_dict[k] is v for k, v in ep.state_dict.items())


def test_optimize_and_explain_emit_no_warnings():
    ep = torch.export.export(AttentionIsTheOutput(bshd=True), (_x(),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attnopt.optimize(ep)
        attnopt.explain(ep)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("options, message", [({"kernel": "bogus"}, "unknown kernel 'bogus'"),
                                              ({"target": "bogus"}, "target must be one of"),
                                              ({"target": "portable", "kernel": "math"}, "cannot force")])
def test_bad_options_fail_before_any_work(options, message, monkeypatch):
    ep = torch.export.export(AttentionIsTheOutput(bshd=False), (_x(),))
    monkeypatch.setattr(attnopt.export, "optimize_graph", lambda *a, **k: pytest.fail("passes ran"))
    with pytest.raises(ValueError, match=message):
        attnopt.optimize(ep, **options)
