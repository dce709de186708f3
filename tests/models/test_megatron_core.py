"""megatron-core's GPT with its local layer spec (``DotProductAttention``: ``repeat_interleave`` of the
query groups, ``baddbmm`` on [B*H, S, D], ``FusedScaleMaskSoftmax``'s torch fallback with a -10000.0
``masked_fill_``, ``bmm``, output back to [S, B, H*D]), in training mode, through torch.compile and
torch.export + attnopt.optimize: every attention site is lowered, and the logits and every parameter
gradient equal eager's.

The causal mask is either built inside the model (megatron's default for GPT) or handed in as megatron's
GPT data pipeline does ([1, 1, S, S] bool, True = masked).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core")

import attnopt  # noqa: E402
from tests.conftest import Capture  # noqa: E402

from . import megatron_core as mc  # noqa: E402

LAYERS = mc.config().num_layers


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    with mc.megatron_on_cpu():
        yield


def _param_grads(out: torch.Tensor, params: dict, grad: torch.Tensor) -> dict:
    return dict(zip(params, torch.autograd.grad(out, list(params.values()), grad)))


def _compiled(model: nn.Module, inputs: tuple) -> tuple[torch.Tensor, dict, list]:
    capture = Capture("aot_eager")
    torch._dynamo.reset()
    out = torch.compile(model, backend=capture.backend)(*inputs)
    sites = {(s.module, s.name): s for _, _, result in capture.graphs for s in result.sites}
    return out, dict(model.named_parameters()), list(sites.values())


def _exported(model: nn.Module, inputs: tuple) -> tuple[torch.Tensor, dict, list]:
    ep = torch.export.export(model, inputs)
    new_ep, result = attnopt.optimize(ep, strict=True, return_result=True)
    module = new_ep.module()
    return module(*inputs), dict(module.named_parameters()), result.sites


@pytest.mark.parametrize("mask_as_input", [False, True], ids=["mask_built", "mask_input"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("entry", ["compile", "export"])
def test_every_attention_site_is_lowered_and_matches_eager(entry, dtype, mask_as_input):
    model, inputs = mc.build(dtype, mask_as_input)
    ref = model(*inputs)
    grad = torch.randn_like(ref)
    want = _param_grads(ref, dict(model.named_parameters()), grad)
    out, params, sites = (_compiled if entry == "compile" else _exported)(model, inputs)
    rtol, scale = (1e-9, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=scale * ref.abs().max().item())
    got = _param_grads(out, params, grad)
    assert got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=rtol, atol=scale * want[name].abs().max().item(),
                                   msg=lambda m, n=name: f"grad of {n}: {m}")
    assert len(sites) == LAYERS, [(s.module, s.status, s.reason) for s in sites]
    assert all(s.status == "lowered" for s in sites), [(s.module, s.reason) for s in sites]
    # [S, B, H, D] tensors read in place, query groups of 2 read natively, output written as [S, B, H, D]
    assert {(s.kind, s.layout, s.gqa_group, s.out_layout) for s in sites} == {("hand_written", "sbhd", 2, "sbhd")}
