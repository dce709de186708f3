"""torchtitan's Llama 3 / Qwen 3 with the flex attention backend and its masks (causal AND same
document, documents cut at EOS tokens; sliding windows; fixed blocks; the packed [T] format) through
torch.compile and torch.export + attnopt.optimize: every flex call becomes the op (packed documents,
a causal/window band, chunks as batches), with the block mask checked on the device, and the
logits and every parameter gradient equal eager's (float64, CPU)."""
from __future__ import annotations

import pytest
import torch

import attnopt
from tests.conftest import Capture
from tests.flex_support import QUIET, flex_grad_on_cpu, flex_nodes  # noqa: F401 - a fixture

from . import torchtitan_flex as tt

pytestmark = [QUIET, pytest.mark.usefixtures("flex_grad_on_cpu")]
B, S = 2, 256
ACTION = {"block_causal": "thd", "causal": "flags", "sliding_window": "flags", "fixed_block": "batches"}


def _model(qwen: bool, mask: str, dtype=torch.float64) -> tuple[tt.Transformer, tt.Args]:
    torch.manual_seed(0)
    args = tt.Args(qwen=qwen, mask=mask)
    return tt.Transformer(args, S, dtype), args


def _grads(out: torch.Tensor, params: dict, grad: torch.Tensor) -> dict:
    return dict(zip(params, torch.autograd.grad(out, list(params.values()), grad)))


def _check(out, ref, params, model, grad) -> None:
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    want = _grads(ref, dict(model.named_parameters()), grad)
    got = _grads(out, params, grad)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


def _lowered(sites, n: int, action: str) -> None:
    assert len(sites) == n
    for s in sites:
        assert (s.status, s.mask_action) == ("lowered", action), (s.name, s.reason, s.mask)
        assert s.module.endswith("inner_attention"), s.module


@pytest.mark.parametrize("qwen, mask", [
    (False, "block_causal"),
    (True, "sliding_window"),
    pytest.param(True, "block_causal", marks=pytest.mark.slow),
    pytest.param(False, "fixed_block", marks=pytest.mark.slow),
    pytest.param(False, "causal", marks=pytest.mark.slow),
    pytest.param(True, "fixed_block", marks=pytest.mark.slow),
], ids=lambda v: {True: "qwen3", False: "llama3"}.get(v, v))
def test_compiled_training_matches_eager(qwen, mask):
    model, args = _model(qwen, mask)
    tokens = tt.tokens(B, S)
    block_mask = tt.attention_masks(args, tokens)
    ref = model(tokens, block_mask)
    capture = Capture()
    torch._dynamo.reset()
    out = torch.compile(model, backend=capture.backend)(tokens, block_mask)
    _check(out, ref, dict(model.named_parameters()), model, torch.randn_like(ref))
    _lowered([s for _, _, result in capture.graphs for s in result.sites], args.n_layers, ACTION[mask])
    assert not any(flex_nodes(after) for _, after, _ in capture.graphs)


def test_exported_program_matches_eager():
    """The mask made inside the program (export takes no BlockMask input), EOS cuts included."""
    model, args = _model(False, "block_causal")
    masking = tt.MaskingTransformer(model)
    tokens = tt.tokens(B, S, seed=1)
    with torch.no_grad():
        ep = torch.export.export(masking, (tokens,))
    new_ep, result = attnopt.optimize(ep, strict=True, return_result=True)
    _lowered(result.sites, args.n_layers, "thd")
    assert not flex_nodes(new_ep.graph_module)
    module = new_ep.module()
    ref = masking(tokens)
    _check(module(tokens), ref, dict(module.named_parameters()), masking, torch.randn_like(ref))


def test_packed_documents_from_positions():
    """torchtitan's packed format: one row of T tokens, documents where positions restart at 0,
    ``doc_ids[q_idx] == doc_ids[kv_idx]`` over [T] ids."""
    model, args = _model(True, "causal")
    tokens = tt.tokens(1, S)
    positions = torch.cat([torch.arange(n) for n in (70, 100, 86)])
    block_mask = tt.packed_attention_masks(positions)
    ref = model(tokens, block_mask)
    capture = Capture()
    torch._dynamo.reset()
    out = torch.compile(model, backend=capture.backend)(tokens, block_mask)
    _check(out, ref, dict(model.named_parameters()), model, torch.randn_like(ref))
    _lowered(capture.result.sites, args.n_layers, "thd")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qwen, mask", [(False, "block_causal"), (True, "sliding_window")], ids=["llama3", "qwen3"])
def test_training_on_cuda_under_inductor(qwen, mask):
    torch.manual_seed(0)
    args = tt.Args(qwen=qwen, mask=mask, dim=512, n_heads=8, n_kv_heads=2)
    model = tt.Transformer(args, 2048, torch.bfloat16).cuda()
    tokens = tt.tokens(2, 2048).cuda()
    block_mask = tt.attention_masks(args, tokens)
    ref = torch.compile(model)(tokens, block_mask)
    capture = Capture("inductor")
    torch._dynamo.reset()
    out = torch.compile(model, backend=capture.backend)(tokens, block_mask)
    relative = lambda got, want: float((got.float() - want.float()).norm() / want.float().norm())  # noqa: E731
    assert relative(out, ref) < 2e-2
    params = dict(model.named_parameters())
    grad = torch.randn_like(ref)
    for name, got, want in zip(params, *(torch.autograd.grad(o, list(params.values()), grad) for o in (out, ref))):
        assert relative(got, want) < 3e-2, name
    _lowered([s for _, _, result in capture.graphs for s in result.sites], args.n_layers, ACTION[mask])
