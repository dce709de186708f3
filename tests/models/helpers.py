"""Run a module through both entry points and check numerics and the rewritten graph."""
from __future__ import annotations

import torch
from torch import nn

import attnopt
from tests.conftest import Capture, assert_grads_match

from .graph_checks import assert_rewritten, sdpa_calls


def _used_parameters(model: nn.Module, inputs: tuple) -> list:
    """The parameters the output depends on (a model called on embeddings skips its embedding)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(model(*inputs).sum(), params, allow_unused=True)
    return [p for p, g in zip(params, grads) if g is not None]


def check_compiled(model: nn.Module, inputs: tuple, target: str = "op", rewritten: bool = True, **tol) -> list:
    """torch.compile with attnopt (strict, aot_eager): forward and backward equal eager; returns
    the site reports of every graph."""
    capture = Capture("aot_eager", target=target)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture.backend)
    assert_grads_match(compiled, inputs, _used_parameters(model, inputs), model, **tol)
    if rewritten:
        for before, after, _ in capture.graphs:
            if sdpa_calls(before):
                assert_rewritten(before, after, target)
    return [s for _, _, result in capture.graphs for s in result.sites]


def _grads(out: torch.Tensor, inputs: tuple, params: dict, grad: torch.Tensor) -> list:
    leaves = [t for t in inputs if t.requires_grad] + list(params.values())
    return list(torch.autograd.grad(out, leaves, grad, allow_unused=True))


def check_exported(model: nn.Module, inputs: tuple, target: str = "op", rewritten: bool = True,
                   rtol: float = 1e-4, atol: float = 1e-5, **export_kw) -> tuple:
    """torch.export + attnopt.optimize (strict): forward, input and parameter gradients equal
    eager; returns (optimized program, site reports)."""
    ep = torch.export.export(model, inputs, **export_kw)
    new_ep, result = attnopt.optimize(ep, strict=True, target=target, return_result=True)
    if rewritten:
        assert_rewritten(ep.graph_module, new_ep.graph_module, target)
    module = new_ep.module()
    out, ref = module(*inputs), model(*inputs)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    grad = torch.randn_like(ref)
    mine = dict(module.named_parameters())
    theirs = {name: p for name, p in model.named_parameters() if name in mine}
    assert theirs.keys() == mine.keys()
    for got, want in zip(_grads(out, inputs, mine, grad), _grads(ref, inputs, theirs, grad)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return new_ep, result.sites
