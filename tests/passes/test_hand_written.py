"""Hand-written softmax attention is recognised and lowered, forward and backward unchanged."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.demo_model import repeat_kv
from tests.conftest import Capture, assert_grads_match

ATTN = torch.ops.attnopt.attention.default


class NanoGPTAttention(torch.nn.Module):
    """nanoGPT's CausalSelfAttention, non-flash path (tril buffer + masked_fill)."""

    def __init__(self, n_embd=64, n_head=4, block_size=16, dropout=0.0):
        super().__init__()
        self.c_attn = torch.nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = torch.nn.Linear(n_embd, n_embd)
        self.attn_dropout = torch.nn.Dropout(dropout)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class EagerGQA(torch.nn.Module):
    """transformers' eager_attention_forward: repeat_kv, fp32 softmax cast back, causal mask
    built in the graph as an additive where(keep, 0, finfo.min)."""

    def __init__(self, heads=4, kv_heads=2, dim=16):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim

    def forward(self, q, k, v):
        b, s = q.shape[0], q.shape[1]
        q = q.view(b, s, self.heads, self.dim).transpose(1, 2)
        k = repeat_kv(k.view(b, s, self.kv_heads, self.dim).transpose(1, 2), self.heads // self.kv_heads)
        v = repeat_kv(v.view(b, s, self.kv_heads, self.dim).transpose(1, 2), self.heads // self.kv_heads)
        i = torch.arange(s, device=q.device)
        keep = i[None, None, None, :] <= i[None, None, :, None]
        mask = torch.where(keep, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
        w = torch.matmul(q, k.transpose(2, 3)) * self.dim**-0.5 + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=0.0, training=self.training)
        return torch.matmul(w, v).transpose(1, 2).contiguous().reshape(b, s, -1)


def test_nanogpt_attention_lowered_with_its_buffer_mask():
    torch.manual_seed(0)
    model = NanoGPTAttention().double()
    x = torch.randn(2, 16, 64, dtype=torch.float64, requires_grad=True)
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(model, backend=capture.backend), (x,), list(model.parameters()), model)
    (site,) = capture.result.sites
    assert site.kind == "hand_written" and site.status == "lowered" and site.has_mask
    assert site.mask.startswith("mask not recognised")  # a buffer's contents are data, not structure
    names = [str(n.target) for n in capture.after.graph.nodes]
    assert not any("softmax" in t or "matmul" in t for t in names)


def test_transformers_eager_gqa_fp32_softmax_becomes_causal_gqa():
    torch.manual_seed(0)
    model = EagerGQA()
    q, k, v = (torch.randn(2, 12, n * 16, requires_grad=True) for n in (4, 2, 2))
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(model, backend=capture.backend), (q, k, v), [], model)
    (site,) = capture.result.sites
    assert site.status == "lowered" and site.gqa_group == 2 and site.is_causal and not site.has_mask
    targets = [getattr(n.target, "__name__", str(n.target)) for n in capture.after.graph.nodes]
    assert not {"expand", "softmax", "matmul", "where"} & set(targets)
    assert targets.count("reshape") == 1  # only the output's [B, S, H*D] view remains


def test_transformers_eager_llama_export_and_compile():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    ids = torch.randint(0, 128, (2, 16))
    forward = lambda ids: model(input_ids=ids, use_cache=False).last_hidden_state
    capture = Capture()
    torch._dynamo.reset()
    out = torch.compile(forward, backend=capture.backend)(ids)
    torch.testing.assert_close(out, forward(ids), rtol=1e-4, atol=1e-4)
    assert [(s.kind, s.status, s.is_causal, s.has_mask) for s in capture.result.sites] == \
        [("hand_written", "lowered", True, False)] * 2

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, use_cache=False).last_hidden_state

    new_ep, result = attnopt.optimize(torch.export.export(Wrapper(), (ids,)), strict=True, return_result=True)
    torch.testing.assert_close(new_ep.module()(ids), forward(ids), rtol=1e-4, atol=1e-4)
    assert [s.status for s in result.sites] == ["lowered", "lowered"]


def test_attention_weights_read_elsewhere_stay_as_written():
    def f(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        return w @ v, w  # the weights are an output: the softmax must stay

    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    capture = Capture()
    torch._dynamo.reset()
    got = torch.compile(f, backend=capture.backend)(q, k, v)
    for g, w in zip(got, f(q, k, v)):
        torch.testing.assert_close(g, w)
    assert capture.result.sites == []


@pytest.mark.parametrize("scale_on", ["scores", "query", "divide"])
def test_scale_spellings(scale_on):
    def f(q, k, v):
        if scale_on == "query":
            s = (q * 0.125) @ k.transpose(-2, -1)
        elif scale_on == "divide":
            s = torch.matmul(q, k.transpose(-2, -1)).div(8.0)
        else:
            s = (q @ k.transpose(-2, -1)) * 0.125
        return s.softmax(dim=-1) @ v

    q, k, v = (torch.randn(2, 3, 7, 16, requires_grad=True) for _ in range(3))
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(f, backend=capture.backend), (q, k, v), [], f)
    (site,) = capture.result.sites
    assert site.status == "lowered"
    node = next(n for n in capture.after.graph.nodes if n.target is ATTN)
    assert node.kwargs["scale"] == pytest.approx(0.125)


def test_training_dropout_is_carried_to_the_op():
    model = NanoGPTAttention(dropout=0.1).train()
    capture = Capture()
    torch._dynamo.reset()
    torch.compile(model, backend=capture.backend)(torch.randn(2, 16, 64))
    (site,) = capture.result.sites
    assert site.status == "lowered" and site.dropout_p == pytest.approx(0.1)
