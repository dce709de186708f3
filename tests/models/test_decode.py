"""Greedy decoding of a transformers Llama over a StaticCache, compiled with attnopt: every layer's
attention reads its own cache where it lies (GQA by head index, no repeat_kv copy) with per-batch
key lengths, every cache write stays an in-place ``index_put_``, and logits and caches equal
eager's step after step. Later layers write their caches after a layer's attention, which the
graph cannot tell apart from writing this layer's: without a backward that keeps the inputs, only
writes before the call matter."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from tests.conftest import Capture
from tests.models.graph_checks import attnopt_calls

LAYERS, BATCH, PROMPT, CACHE = 3, 2, 5, 16


def _model() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CACHE)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _prefilled(model, prompt) -> StaticCache:
    cache = StaticCache(config=model.config, max_cache_len=CACHE)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("target", ["auto", "op"])
def test_static_cache_decode_reads_every_cache_in_place(target):
    model = _model()
    prompt = torch.randint(0, 64, (BATCH, PROMPT))
    mine, theirs = _prefilled(model, prompt), _prefilled(model, prompt)
    capture = Capture("aot_eager", target=target)
    torch._dynamo.reset()
    step = torch.compile(lambda tok, c: model(tok, past_key_values=c, use_cache=True).logits[:, -1],
                         backend=capture.backend)
    tok = prompt[:, -1:].clone()
    with torch.no_grad():
        for _ in range(4):
            got, want = step(tok, mine), model(tok, past_key_values=theirs, use_cache=True).logits[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            tok = want.argmax(-1, keepdim=True)
    for a, b in zip(mine.layers, theirs.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)
    assert len(capture.graphs) == 1  # one graph serves every step
    before, after, result = capture.graphs[0]
    assert [(s.status, s.gqa_group, s.mask_action) for s in result.sites] == [("lowered", 2, "cache_lengths")] * LAYERS
    assert result.cache_writes == 2 * LAYERS
    cache_inputs = {n for n in after.graph.find_nodes(op="placeholder")}
    for call in attnopt_calls(after):
        key, value = call.args[1:3]
        assert key in cache_inputs and value in cache_inputs  # no repeat, no copy between cache and op
