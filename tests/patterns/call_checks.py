"""Run a module whose attention is one op call (aten's fused kernels, torch's varlen, flash-attn)
through both entry points: forward and backward against a reference, and the graph around each
call rewritten.

Ops without a CPU kernel (aten's flash and efficient kernels, torch's varlen) cannot run eagerly
here: the reference is then the same module computing ``reference_attention`` instead.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node

import attnopt
from attnopt.patterns.calls import bind
from tests.conftest import Capture
from tests.models.graph_checks import attnopt_calls, overhead_around, sdpa_calls

CALLS = {"aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
         "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
         "aten::_flash_attention_forward", "torch_attn::_varlen_attn", "flash_attn::_flash_attn_forward",
         "flash_attn::_flash_attn_varlen_forward", "flash_attn_3::_flash_attn_forward"}
_AUTOGRAD_FUNCTION = torch.ops.higher_order.autograd_function_apply


def attention_calls(gm: GraphModule) -> list[Node]:
    """The attention op calls of ``gm`` (an autograd.Function around flash-attn counts as one)."""
    calls = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _AUTOGRAD_FUNCTION:
            calls.append(node)
        elif (bound := bind(node)) is not None and bound[0].name in CALLS:
            calls.append(node)
    return calls


def call_overhead(gm: GraphModule) -> set[str]:
    """Names of the copies, repetitions, pads and trims next to each attention call of ``gm``."""
    names = set()
    for call in attention_calls(gm):
        outputs = [u for u in call.users if u.target is operator.getitem and u.args[1] == 0]
        names |= overhead_around(call.all_input_nodes, [user for out in outputs for user in out.users])
    return names


def assert_lowered(before: GraphModule, after: GraphModule, target: str = "op") -> None:
    """Every attention call of ``before`` became one attnopt.attention call (plain SDPA for the
    portable target), nothing around it left."""
    n = len(attention_calls(before))
    assert n > 0
    lowered = attnopt_calls(after) if target == "op" else sdpa_calls(after)
    assert attention_calls(after) == [] and len(lowered) == n
    left = call_overhead(before) & {node.name for node in after.graph.nodes}
    assert not left, f"copies/repeats/pads left around attention: {sorted(left)}"


def _grads(out: torch.Tensor, inputs: tuple, params: dict, grad: torch.Tensor) -> list:
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] + list(params.values())
    return list(torch.autograd.grad(out, leaves, grad, allow_unused=True))


def _compare(run: Callable, module: nn.Module, reference: nn.Module, inputs: tuple, rtol: float, atol: float) -> None:
    """``run`` (the rewritten module) equals ``reference`` forward, and backward for the inputs and
    the parameters ``module`` shares with it by name."""
    out, ref = run(*inputs), reference(*inputs)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    grad = torch.randn_like(ref)
    mine = dict(module.named_parameters())
    theirs = {name: p for name, p in reference.named_parameters() if name in mine}
    assert theirs.keys() == mine.keys()
    for got, want in zip(_grads(out, inputs, mine, grad), _grads(ref, inputs, theirs, grad)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def check_compiled(model: nn.Module, inputs: tuple, reference: Optional[nn.Module] = None, lowered: bool = True,
                   rtol: float = 1e-6, atol: float = 1e-7, **compile_kw) -> list:
    """torch.compile with attnopt (strict, aot_eager) against ``reference`` (default: the model in
    eager mode); every attention call lowered when ``lowered``. Returns the site reports."""
    capture = Capture("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture.backend, **compile_kw)
    _compare(compiled, model, reference or model, inputs, rtol, atol)
    if lowered:
        for before, after, _ in capture.graphs:
            if attention_calls(before):
                assert_lowered(before, after)
    return [s for _, _, result in capture.graphs for s in result.sites]


def check_exported(model: nn.Module, inputs: tuple, reference: Optional[nn.Module] = None, lowered: bool = True,
                   rtol: float = 1e-6, atol: float = 1e-7, target: str = "op", **export_kw) -> tuple:
    """torch.export + attnopt.optimize (strict) against ``reference``; returns (program, site reports)."""
    ep = torch.export.export(model, inputs, **export_kw)
    new_ep, result = attnopt.optimize(ep, strict=True, return_result=True, target=target)
    if lowered:
        assert_lowered(ep.graph_module, new_ep.graph_module, target)
    module = new_ep.module()
    _compare(module, module, reference or model, inputs, rtol, atol)
    return new_ep, result.sites


def sites_of(model: nn.Module, inputs: tuple, **export_kw) -> list:
    """The site reports of the exported program, without running it (for calls left as written)."""
    ep = torch.export.export(model, inputs, **export_kw)
    return attnopt.optimize(ep, strict=True, return_result=True)[1].sites
