"""Mask plans: in-graph masks proven to be bands, chunks, documents, padding or key limits are
replaced by flags, batches, packed sequences, a padding vector or key lengths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.masks import Unproven, interpret, structure_of
from attnopt.fx.normalize import meta, sdpa_args
from tests.conftest import Capture, assert_grads_match

B, H, S, D = 2, 4, 12, 8


def _calls(gm) -> list:
    """The attnopt.attention calls in ``gm``, in graph order."""
    return [n for n in gm.graph.nodes if n.target is torch.ops.attnopt.attention.default]


def _idx(s, device):
    q = torch.arange(s, device=device)[None, None, :, None]
    k = torch.arange(s, device=device)[None, None, None, :]
    return q, k


MASKS = {
    # name: (mask builder over (q_idx, kv_idx), expected description, expected (is_causal, align, window))
    "causal": (lambda q, k: k <= q, "k - q <= 0", (True, "top_left", (-1, -1))),
    "causal_via_ge": (lambda q, k: q >= k, "k - q <= 0", (True, "top_left", (-1, -1))),
    "sliding_window": (lambda q, k: (k <= q) & (k > q - 4), "k - q <= 0 & k - q >= -3", (True, "top_left", (3, 0))),
    "two_sided": (lambda q, k: (k - q <= 2) & (q - k <= 3), "k - q <= 2 & k - q >= -3", (False, "top_left", (3, 2))),
    "all_true": (lambda q, k: q.new_ones((), dtype=torch.bool) & (k >= 0), "all true", (False, "top_left", (-1, -1))),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_band_masks_are_recognised_and_removed(name):
    build, described, band = MASKS[name]

    def f(x):
        qi, ki = _idx(S, x.device)
        mask = build(qi, ki)
        q = x.view(B, S, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).transpose(1, 2)

    x = torch.randn(B, S, H * D, requires_grad=True)
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(f, backend=capture.backend), (x,), [], f)
    (site,) = capture.result.sites
    assert site.status == "lowered" and not site.has_mask, site.mask
    assert site.mask == f"{described}: mask removed"
    node = _calls(capture.after)[0]
    assert node.kwargs.get("is_causal", False) == band[0]
    assert node.kwargs.get("window_size", [-1, -1]) == list(band[2])


def test_bottom_right_causal_from_offset_positions():
    sq, sk = 4, 12

    def f(q, kv):
        qi = torch.arange(sk - sq, sk, device=q.device)[:, None]  # query i sits at position sk - sq + i
        ki = torch.arange(sk, device=q.device)[None, :]
        return F.scaled_dot_product_attention(q, kv, kv, attn_mask=ki <= qi)

    q = torch.randn(B, H, sq, D, requires_grad=True)
    kv = torch.randn(B, H, sk, D, requires_grad=True)
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(f, backend=capture.backend), (q, kv), [], f)
    node = _calls(capture.after)[0]
    assert node.kwargs["causal_align"] == "bottom_right" and node.kwargs["is_causal"]


def test_padding_and_chunks_are_described_and_kept():
    def f(x, keep):
        qi, ki = _idx(S, x.device)
        mask = (qi // 4 == ki // 4) & (ki <= qi) & keep[:, None, None, :].bool()
        q = x.view(B, S, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    x = torch.randn(B, S, H * D, requires_grad=True)
    keep = torch.ones(B, S, dtype=torch.long)
    keep[0, :3] = 0
    capture = Capture()
    torch._dynamo.reset()
    out = torch.compile(f, backend=capture.backend)(x, keep)
    torch.testing.assert_close(out, f(x, keep))
    (site,) = capture.result.sites
    assert site.status == "lowered" and site.has_mask
    assert "q // 4 == k // 4" in site.mask and "k - q <= 0" in site.mask and "key padding" in site.mask
    assert "kept as an explicit mask (no lowering combines" in site.mask


def test_unknown_mask_is_kept_with_the_reason():
    def f(x, m):
        q = x.view(B, S, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=m > 0.5)

    x, m = torch.randn(B, S, H * D), torch.rand(B, 1, S, S)
    capture = Capture()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, backend=capture.backend)(x, m), f(x, m))
    (site,) = capture.result.sites
    assert site.has_mask and site.mask.startswith("mask not recognised")


def _transformers_llama(num_layers=2):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaModel(cfg)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids=None, attention_mask=None):
            return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state

    return Wrapper()


CASES = {
    "plain": ({}, "k - q <= 0: mask removed"),
    "packed": ({"position_ids": torch.cat([torch.arange(10), torch.arange(6)]).repeat(2, 1)},
               "documents run as packed sequences (thd)"),
    "padded": ({"attention_mask": torch.tensor([[0, 0, 0] + [1] * 13, [1] * 16])},
               "key padding passed as a [B, 1, 1, Sk] mask"),
}


def _op_masks(gm) -> list:
    """Shapes of the masks the attnopt calls in ``gm`` receive."""
    return [tuple(meta(n.kwargs["attn_mask"]).shape) if "attn_mask" in n.kwargs else None for n in _calls(gm)]


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_llama_compiled(case):
    extra, expected = CASES[case]
    model = _transformers_llama()
    ids = torch.randint(0, 128, (2, 16))
    capture = Capture()
    torch._dynamo.reset()
    out = torch.compile(model, backend=capture.backend)(ids, **extra)
    ref = model(ids, **extra)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref.sum().backward()
    for g, w in zip(got, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
    assert [s.status for s in capture.result.sites] == ["lowered", "lowered"]
    assert all(expected in s.mask for s in capture.result.sites)
    assert capture.result.masks_removed
    if case == "padded":  # the model's padding vector, not the dense causal-and-padding mask
        assert all(s.has_mask and s.is_causal for s in capture.result.sites)
        assert _op_masks(capture.after) == [(2, 1, 1, 16)] * 2
    else:
        assert not any(s.has_mask for s in capture.result.sites)


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_llama_exported(case):
    extra, expected = CASES[case]
    model = _transformers_llama(num_layers=1)
    ids = torch.randint(0, 128, (2, 16))
    ep = torch.export.export(model, (ids,), extra)
    new_ep, result = attnopt.optimize(ep, strict=True, return_result=True, target="op")
    torch.testing.assert_close(new_ep.module()(ids, **extra), model(ids, **extra), rtol=1e-4, atol=1e-4)
    assert [s.status for s in result.sites] == ["lowered"] and expected in result.sites[0].mask
    if case == "packed":  # the same program serves other document boundaries
        other = torch.tensor([[5, 6, 7, 0, 1, 2, 3, 4, 9, 1, 2, 3, 4, 5, 6, 7], list(range(16))])
        torch.testing.assert_close(new_ep.module()(ids, position_ids=other), model(ids, position_ids=other),
                                   rtol=1e-4, atol=1e-4)
    assert [sdpa_args(n)["attn_mask"] for n in new_ep.graph.nodes if sdpa_args(n)] == []
    assert _op_masks(new_ep.graph_module) == [(2, 1, 1, 16) if case == "padded" else None]


def test_packed_layers_share_one_offsets_tensor(monkeypatch):
    """Every layer reads the same document offsets: built once in the graph, checked on the host
    once per step (forward and backward)."""
    from attnopt.runtime_ops import spec

    reads = []
    read = spec._read_cu_seqlens
    monkeypatch.setattr(spec, "_read_cu_seqlens", lambda *a: reads.append(a) or read(*a))
    model = _transformers_llama()
    ids, extra = torch.randint(0, 128, (2, 16)), CASES["packed"][0]
    capture = Capture()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture.backend)
    compiled(ids, **extra).sum().backward()  # compiles (the report's kernel check reads example offsets)
    calls = _calls(capture.after)
    assert len(calls) == 2
    assert len({n.kwargs["cu_seqlens_q"] for n in calls} | {n.kwargs["cu_seqlens_k"] for n in calls}) == 1
    reads.clear()
    compiled(ids, **extra).sum().backward()
    assert len(reads) == 1


def test_structure_of_rejects_float_masks():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.zeros(2, 2)
    with pytest.raises(Unproven, match="the mask is not a boolean tensor"):
        structure_of(interpret(x))


def test_chunked_mask_runs_chunks_as_batches():
    from tests.bench_cores import chunked_core

    q, k, v = (torch.randn(2, 16, n * 16, requires_grad=True) for n in (4, 2, 2))
    fn = lambda *t: chunked_core(*t, 4, 2, 4)
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(fn, backend=capture.backend), (q, k, v), [], fn)
    (site,) = capture.result.sites
    assert site.mask.endswith("chunks run as batches") and not site.has_mask and site.is_causal
    node = _calls(capture.after)[0]
    assert tuple(node.args[0].meta["example_value"].shape) == (8, 4, 4, 16)  # [B * S/C, C, H, D]


def test_static_cache_decode_uses_key_lengths_without_repeating_the_cache():
    from tests.bench_cores import decode_core

    q, k_cache, v_cache = torch.randn(3, 1, 64), torch.randn(3, 2, 32, 16), torch.randn(3, 2, 32, 16)
    fn = lambda *t: decode_core(*t, 4, 2)
    capture = Capture()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=capture.backend)
    with torch.no_grad():
        for filled in (20, 5, 31):  # the same graph serves every cache fill
            pos = torch.tensor([filled])
            torch.testing.assert_close(compiled(q, k_cache, v_cache, pos), fn(q, k_cache, v_cache, pos))
    (site,) = capture.result.sites
    assert site.gqa_group == 2 and not site.has_mask and "seqused_k" in site.mask
    node = _calls(capture.after)[0]
    assert "seqused_k" in node.kwargs


def test_transformers_static_cache_steps_use_key_lengths():
    """transformers 5.x masks a StaticCache as k <= q + cumulative_length, and bumps that length
    in place before attention: the key lengths must be the ones the mask saw."""
    import copy

    import transformers as T

    from tests.models.transformers_models import llama

    torch.manual_seed(0)
    model = llama().eval()
    cache = T.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 5)), past_key_values=cache, use_cache=True)
    ref_cache = copy.deepcopy(cache)
    step = lambda tok, c: model(tok, past_key_values=c, use_cache=True).logits
    capture = Capture()
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=capture.backend, fullgraph=True)
    with torch.no_grad():
        for n in (1, 1, 3, 1):  # decode steps and a few tokens at once (a second graph)
            tok = torch.randint(0, 64, (2, n))
            torch.testing.assert_close(compiled(tok, cache), step(tok, ref_cache))
    for _, after, result in capture.graphs:
        assert all("seqused_k" in s.mask and s.is_causal and not s.has_mask for s in result.sites)
        calls = _calls(after)
        assert len(calls) == 2 and all(n.kwargs["causal_align"] == "bottom_right" for n in calls)


def test_cache_key_lengths_assert_when_the_mask_runs_past_the_cache():
    from tests.bench_cores import static_cache_core

    q, k_cache, v_cache = torch.randn(2, 3, 64), torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    fn = lambda *t: static_cache_core(*t, 4, 2)
    capture = Capture()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=capture.backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k_cache, v_cache, torch.tensor([7])),
                                   fn(q, k_cache, v_cache, torch.tensor([7])))
        with pytest.raises(RuntimeError, match="ran past the cache"):  # last query's keys cut by the cache end
            compiled(q, k_cache, v_cache, torch.tensor([15]))
    (site,) = capture.result.sites
    assert "seqused_k" in site.mask


def test_decode_with_grad_keeps_the_mask():
    from tests.bench_cores import decode_core

    q = torch.randn(2, 1, 64, requires_grad=True)
    k_cache, v_cache, pos = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16), torch.tensor([9])
    fn = lambda *t: decode_core(*t, 4, 2)
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(fn, backend=capture.backend), (q, k_cache, v_cache, pos), [], fn)
    (site,) = capture.result.sites
    assert site.has_mask and "inference only" in site.mask


@pytest.mark.parametrize("case", ["chunked", "decode", "masked_fill_window", "packed"])
def test_portable_target_keeps_masks_sdpa_cannot_express(case):
    from tests.bench_cores import chunked_core, decode_core

    if case == "chunked":
        fn, args = (lambda *t: chunked_core(*t, 4, 2, 4)), tuple(torch.randn(2, 16, n * 16) for n in (4, 2, 2))
    elif case == "decode":
        fn = lambda *t: decode_core(*t, 4, 2)
        args = (torch.randn(3, 1, 64), torch.randn(3, 2, 32, 16), torch.randn(3, 2, 32, 16), torch.tensor([20]))
    elif case == "packed":
        model = _transformers_llama(num_layers=1)
        fn = lambda ids, pos: model(ids, position_ids=pos)
        args = (torch.randint(0, 128, (2, 16)), CASES["packed"][0]["position_ids"])
    else:
        def fn(q, k, v):
            i = torch.arange(q.shape[2])
            outside = (i[None, :] > i[:, None]) | (i[None, :] < i[:, None] - 3)  # sliding window of 4
            s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(outside, float("-inf"))
            return s.softmax(-1) @ v

        args = tuple(torch.randn(2, 4, 12, 16) for _ in range(3))
    capture = Capture(target="portable")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, backend=capture.backend)(*args), fn(*args))
    (site,) = capture.result.sites
    assert site.status == "lowered" and site.has_mask
    assert not _calls(capture.after)


def test_chunks_with_another_term_keep_the_mask():
    """Chunks run as batches carry only a band inside each chunk: a key limit beside the chunks
    (k <= pos[q]) has no place there, so the mask stays."""
    def f(q, k, v, pos):
        i = torch.arange(q.shape[2])
        mask = (i[:, None] // 4 == i[None, :] // 4) & (i[None, :] <= pos[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    pos = torch.tensor([0, 1, 1, 2, 4, 4, 6, 7])
    capture = Capture()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, backend=capture.backend)(q, k, v, pos), f(q, k, v, pos))
    (site,) = capture.result.sites
    assert site.has_mask and "kept as an explicit mask (no lowering combines chunk and key_limit)" in site.mask


def test_chunks_as_batches_from_bhsd_sources():
    def f(q, k, v):  # rope-style sources already in [B, H, S, D]
        i = torch.arange(q.shape[2])
        mask = (i[:, None] // 4 == i[None, :] // 4) & (i[None, :] <= i[:, None])
        return F.scaled_dot_product_attention(q * 2, k * 2, v, attn_mask=mask, enable_gqa=True)

    q, k, v = torch.randn(2, 4, 12, 8, requires_grad=True), *(torch.randn(2, 2, 12, 8, requires_grad=True) for _ in range(2))
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(f, backend=capture.backend), (q, k, v), [], f)
    (site,) = capture.result.sites
    assert site.mask.endswith("chunks run as batches") and not site.has_mask


MODEL_MASKS = {
    # name: (config factory, forward kwargs, expected mask note)
    "mistral_sliding_window": (lambda T: T.MistralConfig(sliding_window=5, **_SMALL), {},
                               "k - q <= 0 & k - q >= -4: mask removed"),
    "llama4_chunked": (lambda T: T.Llama4TextConfig(attention_chunk_size=4, head_dim=16, no_rope_layers=[1, 1],
                                                     **_SMALL), {}, "chunks run as batches"),
    "gpt2_padding": (lambda T: T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4), {"pad": True},
                     "key padding passed as a [B, 1, 1, Sk] mask"),
    "bert_padding": (lambda T: T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128), {"pad": True},
                     "dense mask removed, key padding passed as a [B, 1, 1, Sk] mask"),
}
_SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


@pytest.mark.parametrize("name", list(MODEL_MASKS))
def test_transformers_model_masks(name):
    import transformers

    make_config, options, expected = MODEL_MASKS[name]
    cfg = make_config(transformers)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg).eval()
    kwargs = {"input_ids": torch.randint(0, 100, (2, 16))}
    if options.get("pad"):
        kwargs["attention_mask"] = torch.ones(2, 16, dtype=torch.long)
        kwargs["attention_mask"][0, :4] = 0
    forward = lambda **kw: model(**kw).last_hidden_state
    capture = Capture()
    torch._dynamo.reset()
    out, ref = torch.compile(forward, backend=capture.backend)(**kwargs), forward(**kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, list(model.parameters()), grad, allow_unused=True)
    want = torch.autograd.grad(ref, list(model.parameters()), grad, allow_unused=True)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
    assert [s.status for s in capture.result.sites] == ["lowered", "lowered"]
    assert all(expected in s.mask for s in capture.result.sites), [s.mask for s in capture.result.sites]
    if options.get("pad"):
        assert _op_masks(capture.after) == [(2, 1, 1, 16)] * 2


def test_additive_key_limit_mask_is_kept():
    # k <= cache_position[q] as where(keep, 0, finfo.min): a position below 0 would leave the row
    # without keys, where finfo.min averages every key and -inf does not: not provably equal.
    def f(q, k, v, pos):
        i = torch.arange(k.shape[2])
        keep = (i[None, :] <= pos[:, None])[None, None]
        mask = torch.where(keep, torch.zeros(()), torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    capture = Capture()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, backend=capture.backend)(q, k, v, torch.tensor([5])),
                                   f(q, k, v, torch.tensor([5])))
    (site,) = capture.result.sites
    assert site.has_mask and "a row masked entirely averages every key" in site.mask


@pytest.mark.parametrize("build,flags", [
    (lambda q, k: k >= q - 2, (True, [2, 0])),  # a window's left side, the causal flag its right
    (lambda q, k: k <= q + 3, (True, None)),  # looser than causal: causal alone
])
def test_a_mask_and_is_causal_intersect(build, flags):
    """SDPA given both ``attn_mask`` and ``is_causal=True`` attends where both allow."""
    def f(x):
        qi, ki = _idx(S, x.device)
        q = x.view(B, S, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=build(qi, ki), is_causal=True).transpose(1, 2)

    x = torch.randn(B, S, H * D, dtype=torch.float64, requires_grad=True)
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(f, backend=capture.backend), (x,), [], f)
    (site,) = capture.result.sites
    assert site.mask_action == "flags" and "causal (is_causal)" in site.mask
    node = _calls(capture.after)[0]
    assert node.kwargs.get("is_causal") is flags[0] and node.kwargs.get("window_size") == flags[1]


@pytest.mark.parametrize("build", [
    lambda q, k: k < q,  # the diagonal excluded: row 0 keeps no key
    lambda q, k: k > q,
    lambda q, k: (k >= q - 3) & (k < q),
], ids=["lt", "gt", "strict_window"])
def test_strict_bands_keep_their_mask(build):
    def f(x):
        qi, ki = _idx(S, x.device)
        q = x.view(B, S, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=build(qi, ki)).transpose(1, 2)

    x = torch.randn(B, S, H * D, dtype=torch.float64, requires_grad=True)
    capture = Capture()
    torch._dynamo.reset()
    assert_grads_match(torch.compile(f, backend=capture.backend), (x,), [], f)
    (site,) = capture.result.sites
    assert site.mask_action == "kept" and site.has_mask


@pytest.mark.parametrize("over", ["positions", "indices"])
def test_chunks_inside_documents_run_as_packed_pieces(over):
    """Packed rows with chunks (Llama 4 in a packed batch chunks its position ids): every chunk of
    every document is one packed sequence; the same graph serves other document boundaries."""
    chunk = 3

    def f(x, pos):
        qi, ki = _idx(S, x.device)
        starts = torch.diff(pos, prepend=pos[:, :1] - 1) != 1
        doc = starts.cumsum(-1)
        same_doc = doc[:, None, :, None] == doc[:, None, None, :]
        if over == "positions":
            p = pos[:, None, :, None], pos[:, None, None, :]
            same_chunk = p[0] // chunk == p[1] // chunk
        else:
            same_chunk = qi // chunk == ki // chunk
        q = x.view(B, S, H, D).transpose(1, 2)
        mask = same_doc & same_chunk & (ki <= qi)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).transpose(1, 2)

    x = torch.randn(B, S, H * D, dtype=torch.float64, requires_grad=True)
    positions = [torch.cat([torch.arange(7), torch.arange(5)]).repeat(B, 1),
                 torch.tensor([[4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5], list(range(12))])]
    capture = Capture()
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=capture.backend)
    for pos in positions:
        assert_grads_match(compiled, (x, pos), [], f)
    (site,) = capture.result.sites
    assert site.mask_action == "thd" and "chunks of each document" in site.mask
