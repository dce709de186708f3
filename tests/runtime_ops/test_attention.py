"""attnopt::attention on CPU: numerics of every variant on every CPU kernel, opcheck, errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt.runtime_ops as R
from tests.runtime_ops.variants import VARIANTS, Variant, make_inputs, reference, rel_err

CPU_KERNELS = ("cpu_flash", "math")


def _additive_mla(q, v, kw) -> bool:
    """An additive mask with a v head dim other than q/k's: torch's SDPA runs that in its math kernel,
    and so does the op (a row a finite fill masks entirely differentiates otherwise in cpu_flash)."""
    mask = kw.get("attn_mask")
    return mask is not None and mask.dtype != torch.bool and q.shape[-1] != v.shape[-1]


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_forward_backward_match_reference(variant: Variant, kernel: str):
    q, k, v, kw = make_inputs(variant, torch.float32, "cpu")
    if kernel == "cpu_flash" and _additive_mla(q, v, kw):
        with pytest.raises(ValueError, match="torch's SDPA runs them in math"):
            R.attention(q, k, v, kernel=kernel, **kw)
        assert R.kernel_for(q, k, v, **kw) == "math"
        return
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, kernel=kernel, **kw)
        ref = reference(q, k, v, kw)
        assert out.shape == ref.shape and out.is_contiguous()
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref, (q, k, v), grad.double())
    assert rel_err(out, ref) < 1e-5
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) < 1e-5
    assert [c.kernel for c in calls] == [kernel, kernel]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_opcheck(variant: Variant):
    q, k, v, kw = make_inputs(variant, torch.float32, "cpu")
    args = (q, k, v)
    kwargs = {k_: (list(v_) if k_ == "window_size" else v_) for k_, v_ in kw.items()}
    torch.library.opcheck(torch.ops.attnopt.attention.default, args, kwargs)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.name in ("gqa", "mla_gqa", "sbhd_to_bshd", "thd",
                                                                     "bool_mask", "window", "heads_innermost_bhsd",
                                                                     "heads_innermost_thd")], ids=lambda v: v.name)
def test_opcheck_backward_op(variant: Variant):
    q, k, v, kw = make_inputs(variant, torch.float32, "cpu", requires_grad=False)
    kwargs = {k_: (list(v_) if k_ == "window_size" else v_) for k_, v_ in kw.items()}
    out, lse, rng = torch.ops.attnopt.attention.default(q, k, v, **kwargs)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.attnopt.attention_backward.default, (grad, out, lse, rng, q, k, v), kwargs)


def test_auto_policy_on_cpu_prefers_fused_kernel():
    q, k, v, kw = make_inputs(Variant("gqa", heads_q=8, heads_kv=2, is_causal=True), torch.float32, "cpu")
    assert R.kernel_for(q, k, v, **kw) == "cpu_flash"
    q, k, v, kw = make_inputs(Variant("bshd"), torch.float32, "cpu")
    assert R.kernel_for(q, k, v, dropout_p=0.1, **kw) == "math"


def test_inputs_are_read_in_place_and_output_is_in_requested_layout():
    base = torch.randn(2, 16, 3, 4, 32)  # fused QKV projection [B, S, 3, H, D]
    q, k, v = base.unbind(2)  # strided bshd views, no copies
    out = R.attention(q, k, v, layout="bshd", out_layout="sbhd", is_causal=True)
    assert out.shape == (16, 2, 4, 32) and out.is_contiguous()
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out, ref.permute(2, 0, 1, 3))


def test_dropout_forward_and_backward_use_one_mask():
    # With a fixed dropout mask, out is linear in v, so <dO, out> == <dV, v> exactly when the
    # backward replays the forward's mask.
    q, k, v, kw = make_inputs(Variant("gqa", heads_q=8, heads_kv=2), torch.float64, "cpu")
    out = R.attention(q, k, v, dropout_p=0.3, **kw)
    grad = torch.randn_like(out)
    (dv,) = torch.autograd.grad(out, (v,), grad)
    torch.testing.assert_close((grad * out).sum(), (dv * v).sum())
    dropped = (out == 0).all(-1).float().mean()
    assert dropped < 0.05  # rows are averages of kept values, not zeroed outright
    torch.manual_seed(1)
    a = R.attention(q, k, v, dropout_p=0.3, **kw)
    torch.manual_seed(1)
    b = R.attention(q, k, v, dropout_p=0.3, **kw)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, R.attention(q, k, v, **kw))


def test_dropout_gradients_by_finite_differences():
    q, k, v, kw = make_inputs(Variant("small", batch=1, heads_q=2, heads_kv=1, seqlen_q=3, seqlen_k=4, dim_qk=4,
                                      dim_v=4), torch.float64, "cpu")

    def f(q, k, v):
        torch.manual_seed(7)
        return R.attention(q, k, v, dropout_p=0.25, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_lse_is_returned_and_not_differentiable():
    q, k, v, kw = make_inputs(Variant("bshd"), torch.float32, "cpu")
    out, lse = R.attention(q, k, v, return_lse=True, **kw)
    assert lse.shape == (2, 4, 16) and lse.dtype == torch.float32 and not lse.requires_grad
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 32**0.5
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_compiles_fullgraph_with_dynamic_shapes():
    def f(q, k, v):
        return R.attention(q, k, v, layout="bshd", is_causal=True).sum()

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for s in (8, 12, 20):
        q, k, v, kw = make_inputs(Variant("d", heads_q=4, heads_kv=2, seqlen_q=s, seqlen_k=s), torch.float32, "cpu")
        torch.testing.assert_close(cf(q, k, v), f(q, k, v))
        ga = torch.autograd.grad(cf(q, k, v), (q, k, v))
        gb = torch.autograd.grad(f(q, k, v), (q, k, v))
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)


def test_exports_and_round_trips(tmp_path):
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return R.attention(q, k, v, layout="sbhd", is_causal=True)

    q, k, v, _ = make_inputs(Variant("e", layout="sbhd", heads_q=4, heads_kv=2), torch.float32, "cpu", False)
    ep = torch.export.export(M(), (q, k, v))
    assert any(n.target is torch.ops.attnopt.attention.default for n in ep.graph.nodes)
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2")
    torch.testing.assert_close(loaded.module()(q, k, v), M()(q, k, v))


BAD = [
    ("dtype", lambda q, k, v: (q, k.double(), v), {}, "share a dtype"),
    ("rank", lambda q, k, v: (q[0], k, v), {}, "must have 4 dims"),
    ("heads", lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), {}, "multiple of key/value heads"),
    ("kv_heads", lambda q, k, v: (q, k, v[:, :, :2]), {}, "same number of heads"),
    ("qk_dim", lambda q, k, v: (q, k[..., :16], v), {}, "head dims differ"),
    ("layout", lambda q, k, v: (q, k, v), {"layout": "bsdh"}, "layout must be one of"),
    ("mask_shape", lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(3, 1, 16, 16, dtype=torch.bool)}, "broadcast"),
    ("mask_dtype", lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(16, 16, dtype=torch.int64)}, "attn_mask must be bool"),
    ("causal_window", lambda q, k, v: (q, k, v), {"is_causal": True, "window_size": (4, 2)}, "right of the diagonal"),
    ("dropout", lambda q, k, v: (q, k, v), {"dropout_p": 1.0}, "dropout_p"),
    ("kernel", lambda q, k, v: (q, k, v), {"kernel": "nope"}, "unknown kernel"),
    ("forced_kernel", lambda q, k, v: (q, k, v), {"kernel": "cudnn"}, "kernel 'cudnn' cannot run"),
    ("forced_dropout", lambda q, k, v: (q, k, v), {"kernel": "cpu_flash", "dropout_p": 0.1}, "no dropout"),
    ("cu_seqlens_dense", lambda q, k, v: (q, k, v), {"cu_seqlens_q": torch.tensor([0, 16], dtype=torch.int32)},
     "cu_seqlens_q describe packed sequences: they need layout 'thd'"),
    ("max_seqlen_dense", lambda q, k, v: (q, k, v), {"max_seqlen_q": 16, "max_seqlen_k": 16},
     "max_seqlen_q, max_seqlen_k describe packed"),
    ("seqused_negative", lambda q, k, v: (q, k, v), {"seqused_k": torch.tensor([3, -1], dtype=torch.int32)},
     r"seqused_k must lie in \[0, 16\]"),
    ("seqused_past_keys", lambda q, k, v: (q, k, v), {"seqused_k": torch.tensor([17, 2], dtype=torch.int32)},
     r"got values in \[2, 17\]"),
    ("seqused_dtype", lambda q, k, v: (q, k, v), {"seqused_k": torch.tensor([3, 1])}, "seqused_k must be an int32"),
    ("mask_rank", lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(1, 2, 1, 16, 16, dtype=torch.bool)},
     "at most 4 dims"),
    ("mask_half", lambda q, k, v: (q, k, v), {"attn_mask": torch.zeros(16, 16, dtype=torch.float16)},
     "attn_mask must be bool or additive"),
    ("sinks_shape", lambda q, k, v: (q, k, v), {"sinks": torch.zeros(2)}, r"sinks must have shape \(4,\)"),
    ("sinks_dtype", lambda q, k, v: (q, k, v), {"sinks": torch.zeros(4, dtype=torch.float64)},
     "sinks must be float32 or of the query's dtype"),
    ("sinks_int", lambda q, k, v: (q, k, v), {"sinks": torch.zeros(4, dtype=torch.int32)}, "sinks must be float32"),
    ("empty_rows", lambda q, k, v: (q, k, v), {"empty_rows": "inf"}, "empty_rows must be one of"),
    ("forced_sinks", lambda q, k, v: (q, k, v), {"sinks": torch.zeros(4), "kernel": "cudnn"}, "kernel 'cudnn'"),
]


@pytest.mark.parametrize("make,extra,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(make, extra, message):
    q, k, v, _ = make_inputs(Variant("bad", heads_q=4, heads_kv=4), torch.float32, "cpu", False)
    with pytest.raises(ValueError, match=message):
        R.attention(*make(q, k, v), layout=extra.pop("layout", "bshd"), **extra)


def test_bad_cu_seqlens_raise_value_error():
    q = torch.randn(10, 2, 8)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    for cu, msg in [
        (torch.tensor([0, 4, 9], dtype=torch.int32), "must end at"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), "must start at 0"),
        (torch.tensor([0, 7, 5, 10], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([0, 10], dtype=torch.int32), r"batch\+1"),
        (torch.tensor([0, 4, 10], dtype=torch.int64), "int32"),
    ]:
        cu_k = cu if msg in ("int32", "non-decreasing") else good
        with pytest.raises(ValueError, match=msg):
            R.attention(q, q, q, layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=6)
    with pytest.raises(ValueError, match="longer than its max_seqlen"):
        R.attention(q, q, q, layout="thd", cu_seqlens_q=good, cu_seqlens_k=good, max_seqlen_q=5, max_seqlen_k=6)


def test_offsets_ending_in_empty_sequences_run_only_the_filled_ones():
    """Offsets built in a graph have a fixed worst-case size; the kernel sees the real sequences."""
    q = torch.randn(10, 2, 8, requires_grad=True)
    fixed = torch.tensor([0, 4, 10, 10, 10, 10], dtype=torch.int32)
    tight = torch.tensor([0, 4, 10], dtype=torch.int32)
    with R.trace_kernels() as calls:
        out = R.attention(q, q, q, layout="thd", cu_seqlens_q=fixed, cu_seqlens_k=fixed, max_seqlen_q=10,
                          max_seqlen_k=10, is_causal=True)
        (grad,) = torch.autograd.grad(out.sum(), q)
    assert [c.shape[0] for c in calls] == [2, 2] and calls[0].shape[3] == 6  # 2 sequences, longest 6
    want = R.attention(q, q, q, layout="thd", cu_seqlens_q=tight, cu_seqlens_k=tight, max_seqlen_q=6,
                       max_seqlen_k=6, is_causal=True)
    assert torch.allclose(out, want)
    assert torch.allclose(grad, torch.autograd.grad(want.sum(), q)[0])


def test_offsets_are_read_on_the_host_once_per_tensor(monkeypatch):
    """Reading offsets waits for the device: layers sharing one offsets tensor, and their
    backwards, read it once; a write in place or another tensor reads again."""
    from attnopt.runtime_ops import spec

    reads = []
    read = spec._read_cu_seqlens
    monkeypatch.setattr(spec, "_read_cu_seqlens", lambda *a: reads.append(a) or read(*a))
    q = torch.randn(10, 2, 8, requires_grad=True)
    cu = torch.tensor([0, 4, 10, 10], dtype=torch.int32)
    layer = lambda x, cu: R.attention(x, x, x, layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=10,
                                      max_seqlen_k=10, is_causal=True)
    out = q
    host_reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: host_reads.append(1) or tolist(t))
    with R.trace_kernels() as calls:
        for _ in range(3):
            out = layer(out, cu)
        torch.autograd.grad(out.sum(), q)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    assert len(reads) == 1
    # and nothing else is read: a kernel that runs one sequence at a time uses the offsets read then
    assert len(host_reads) == 1 and not {c.kernel for c in calls} & {"fa4", "flash"}
    cu[2:] = torch.tensor([7, 10], dtype=torch.int32)  # a write in place: the cached check is stale
    with R.trace_kernels() as calls:
        layer(q, cu)
    assert len(reads) == 2 and calls[0].shape[0] == 3  # three sequences now
    layer(q, cu.clone())
    assert len(reads) == 3


@settings(max_examples=25, deadline=None)
@given(
    layout=st.sampled_from(["bhsd", "bshd", "sbhd"]),
    out_layout=st.sampled_from(["bhsd", "bshd", "sbhd"]),
    heads_kv=st.sampled_from([1, 2, 3]),
    group=st.integers(1, 3),
    seqlen_q=st.integers(1, 9),
    seqlen_k=st.integers(1, 9),
    dims=st.sampled_from([(8, 8), (16, 8), (8, 16)]),
    causal=st.booleans(),
    align=st.sampled_from(["top_left", "bottom_right"]),
)
def test_any_layout_and_shape_matches_reference(layout, out_layout, heads_kv, group, seqlen_q, seqlen_k, dims,
                                                 causal, align):
    v_ = Variant("h", layout=layout, out_layout=out_layout, batch=2, heads_q=heads_kv * group, heads_kv=heads_kv,
                 seqlen_q=seqlen_q, seqlen_k=seqlen_k, dim_qk=dims[0], dim_v=dims[1], is_causal=causal,
                 causal_align=align)
    q, k, v, kw = make_inputs(v_, torch.float64, "cpu", requires_grad=False)
    ref = reference(q, k, v, kw)
    fully_masked = ref.isnan().any(-1)  # causal rows with no key: defined as 0 by attnopt
    out = R.attention(q, k, v, **kw)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out[~fully_masked], ref[~fully_masked])
    assert (out[fully_masked] == 0).all()


HEADS_INNERMOST = [v for v in VARIANTS if v.heads_innermost]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("variant", HEADS_INNERMOST, ids=lambda v: v.name)
def test_head_dim_of_any_stride_compiles(variant: Variant, backend: str):
    """q/k/v viewed head-major over [..., D, H] memory: read right in eager and compiled, and the
    fake kernel's outputs have the real ones' strides."""
    q, k, v, kw = make_inputs(variant, torch.float32, "cpu")
    assert q.stride(-1) != 1
    ref = reference(q, k, v, kw)
    grad = torch.randn(ref.shape, dtype=torch.float32)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: R.attention(q, k, v, **kw), backend=backend, fullgraph=True)
    out = f(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), grad)
    assert rel_err(out, ref) < 1e-5
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    qkv = [t.detach() for t in (q, k, v)]
    real = torch.ops.attnopt.attention.default(*qkv, **kw)
    mode = torch._subclasses.FakeTensorMode()
    fakes = {n: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for n, a in kw.items()}
    fake_qkv = [mode.from_tensor(t) for t in qkv]
    with mode:
        fake = torch.ops.attnopt.attention.default(*fake_qkv, **fakes)
    assert [t.stride() for t in fake] == [t.stride() for t in real]


LSE_VARIANTS = [v for v in VARIANTS if v.name in ("bshd", "gqa", "mla", "thd", "thd_window", "kv_cache_causal")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("variant", LSE_VARIANTS, ids=lambda v: v.name)
def test_lse_dtype_follows_the_inputs_in_every_kernel_and_the_fake(variant: Variant, kernel: str, dtype):
    q, k, v, kw = make_inputs(variant, dtype, "cpu", requires_grad=False)
    _, lse = R.attention(q, k, v, kernel=kernel, return_lse=True, **kw)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    args = {n: (list(a) if n == "window_size" else a) for n, a in kw.items()}
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        _, fake_lse, _ = torch.ops.attnopt.attention.default(q, k, v, kernel_name=kernel, **args)
    assert fake_lse.dtype == lse.dtype and fake_lse.shape == lse.shape


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.layout == "thd"], ids=lambda v: v.name)
def test_packed_float64_forward_and_backward_match_per_sequence_reference(variant: Variant, kernel: str):
    q, k, v, kw = make_inputs(variant, torch.float64, "cpu")
    out = R.attention(q, k, v, kernel=kernel, **kw)
    ref = reference(q, k, v, kw)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    assert rel_err(out, ref) < 1e-12
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and rel_err(g, w) < 1e-12


def test_key_lengths_are_checked_once_per_tensor_and_version():
    q, k, v, kw = make_inputs(Variant("c", seqlen_q=1, seqlen_k=8), torch.float32, "cpu", False)
    lengths = torch.tensor([3, 8], dtype=torch.int32)
    R.attention(q, k, v, seqused_k=lengths, **kw)
    lengths[0] = 9  # written in place: checked again
    with pytest.raises(ValueError, match=r"seqused_k must lie in \[0, 8\]"):
        R.attention(q, k, v, seqused_k=lengths, **kw)


# Learned additive biases: shapes as models write them, broadcast to [B, Hq, Sq, Sk] = [2, 8, 6, 7].
BIAS_SHAPES = {"t5": (1, 8, 6, 7), "alibi": (8, 1, 7), "per_batch": (2, 1, 6, 7), "shared": (6, 7),
               "per_query": (2, 8, 6, 1)}


def _bias_inputs(shape, causal: bool):
    torch.manual_seed(0)
    q = torch.randn(2, 6, 8, 16, dtype=torch.float64, requires_grad=True)  # bshd, GQA 8/2, Sq=6, Sk=7
    k, v = (torch.randn(2, 7, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bias = torch.randn(shape, dtype=torch.float64)
    if causal:  # -inf entries (never on key 0, so every causal row keeps a key): their gradient is 0
        drop = torch.rand(shape) < 0.2
        drop[..., 0] = False
        bias = bias.masked_fill(drop, float("-inf"))
    return q, k, v, bias.requires_grad_()


def _sdpa_bshd(q, k, v, bias, causal):
    """SDPA takes no mask with is_causal: the band goes into the bias (filled, so no gradient there)."""
    t = lambda x: x.transpose(1, 2)
    if causal:
        bias = bias.masked_fill(~torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(), float("-inf"))
    return t(torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=bias, enable_gqa=True))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", BIAS_SHAPES.values(), ids=BIAS_SHAPES.keys())
def test_learned_bias_gradient_matches_sdpa(shape, causal):
    q, k, v, bias = _bias_inputs(shape, causal)
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, bias, is_causal=causal, layout="bshd")
        ref = _sdpa_bshd(q, k, v, bias, causal)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v, bias), grad)
    want = torch.autograd.grad(ref, (q, k, v, bias), grad)
    assert [c.kernel for c in calls] == ["math", "math"]  # cpu_flash returns no bias gradient
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_learned_bias_gradients_by_finite_differences():
    q, k, v, bias = _bias_inputs((8, 1, 7), causal=False)
    q, k, v = (t[:1, :3].detach().requires_grad_() for t in (q, k, v))
    f = lambda q, k, v, b: R.attention(q, k, v, b, is_causal=True, causal_align="bottom_right", layout="bshd")
    assert torch.autograd.gradcheck(f, (q, k, v, bias[:, :, :3].detach().requires_grad_()))


def test_bias_gradient_picks_a_kernel_that_returns_it():
    q, k, v, bias = _bias_inputs(BIAS_SHAPES["t5"], causal=False)
    assert R.kernel_for(q, k, v, bias, layout="bshd") == "math"
    assert R.kernel_for(q, k, v, bias.detach(), layout="bshd") == "cpu_flash"
    with torch.no_grad():
        assert R.kernel_for(q, k, v, bias, layout="bshd") == "cpu_flash"
    with pytest.raises(ValueError, match="returns no gradient for attn_mask"):
        R.attention(q, k, v, bias, layout="bshd", kernel="cpu_flash")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_learned_bias_gradient_through_torch_compile(backend):
    q, k, v, bias = _bias_inputs(BIAS_SHAPES["alibi"], causal=True)
    f = lambda q, k, v, b: R.attention(q, k, v, b, is_causal=True, layout="bshd")
    ref = f(q, k, v, bias)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v, bias), grad)
    torch._dynamo.reset()
    out = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, bias)
    got = torch.autograd.grad(out, (q, k, v, bias), grad)
    torch.testing.assert_close(out, ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("shape", [BIAS_SHAPES["t5"], BIAS_SHAPES["alibi"]], ids=["t5", "alibi"])
def test_opcheck_with_a_learned_bias(shape):
    q, k, v, bias = _bias_inputs(shape, causal=True)
    torch.library.opcheck(torch.ops.attnopt.attention.default, (q, k, v, bias),
                          {"is_causal": True, "layout": "bshd"})
    kwargs = {"is_causal": True, "layout": "bshd", "mask_grad": True}
    args = tuple(t.detach() for t in (q, k, v, bias))
    out, lse, rng = torch.ops.attnopt.attention.default(*args, **kwargs)
    torch.library.opcheck(torch.ops.attnopt.attention_backward.default, (torch.randn_like(out), out, lse, rng, *args),
                          kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_math_kernel_averages_a_row_masked_by_a_finite_fill(dtype):
    """A row whose every key carries finfo.min: the scores round to the fill, and softmax (max
    subtracted) averages every key, in the forward and through the gradient; exp(s - lse) would
    give every key weight 1, since lse rounds to the fill too."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    i = torch.arange(6)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] >= 2)  # rows 0 and 1 keep no key
    bias = torch.where(keep, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)

    def eager(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5 + bias, dim=-1) @ v

    out = R.attention(q, k, v, bias, kernel="math")
    ref = eager(q, k, v)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want)


def _filled(q, k, v, keep, fill):
    return torch.softmax((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).masked_fill(~keep, fill), dim=-1) @ v


@pytest.mark.parametrize("case,kernel", [
    ("bounded", "cpu_flash"),  # every masked weight underflows to 0: the fill acts as -inf, any kernel runs
    ("large_scores", "math"),  # scores can reach the fill: masked keys keep weight, as masked_fill gives them
    ("empty_row", "math"),  # a row masked entirely averages every key
])
def test_a_finite_mask_fill_is_what_masked_fill_gives(case, kernel):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    if case == "large_scores":
        q, k = q * 400, k * 400
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    i = torch.arange(6)
    keep = i[None, :] <= i[:, None]
    if case == "empty_row":
        keep = keep & (i[:, None] != 3)
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, keep, mask_fill=-10000.0)
        ref = _filled(q, k, v, keep, -10000.0)
        torch.testing.assert_close(out, ref)
        grad = torch.randn_like(ref)
        for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(got, want)
    assert [c.kernel for c in calls] == [kernel, kernel]


def test_mask_fill_is_checked():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="mask_fill must be finite"):
        R.attention(q, q, q, is_causal=True, mask_fill=float("-inf"))
    with pytest.raises(ValueError, match="needs a bool attn_mask"):
        R.attention(q, q, q, torch.zeros(4, 4), mask_fill=-10000.0)
