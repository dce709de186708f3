"""attnopt::attention on CUDA: every variant on every kernel there, bf16 against a float64 reference.

Prints one row per (variant, kernel): the relative errors of out, dq, dk, dv, or why the kernel
does not take the variant, and which kernel the automatic policy picks. Run with ``pytest -s``.
"""
from __future__ import annotations

import pytest
import torch

import attnopt
import attnopt.runtime_ops as R
from attnopt.runtime_ops import kernels
from attnopt.runtime_ops.attention import spec_for
from tests.runtime_ops.variants import SOFTCAP_VARIANTS, VARIANTS, make_inputs, reference, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = 2e-2  # bf16 operands: errors land between 1e-3 and 1e-2


def _gpu_variant(v):
    """Larger than the CPU sizes so that tiles are exercised; head dims kept kernel-friendly; a
    single query stays single (decode)."""
    grow = dict(seqlen_q=v.seqlen_q * 8 if v.seqlen_q > 1 else 1, seqlen_k=v.seqlen_k * 8, dim_qk=v.dim_qk * 2,
                dim_v=v.dim_v * 2)
    if v.seqlens:
        grow["seqlens"] = tuple(s * 8 for s in v.seqlens)
    if v.seqused:
        grow["seqused"] = tuple(s * 8 for s in v.seqused)
    return v.scaled(**grow)


def test_every_variant_on_every_cuda_kernel():
    rows, failures = [], []
    for variant in map(_gpu_variant, VARIANTS + SOFTCAP_VARIANTS):
        q, k, v, kw = make_inputs(variant, torch.bfloat16, "cuda")
        q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
        ref64 = reference(q64, k64, v64, kw)
        grad = torch.randn(ref64.shape, device="cuda", dtype=torch.bfloat16)
        want = torch.autograd.grad(ref64, (q64, k64, v64), grad.double().cpu())
        spec = spec_for(q, k, v, **kw)
        auto = R.kernel_for(q, k, v, **kw)
        for name, why_not in kernels.explain(spec).items():
            if why_not != "ok":
                rows.append((variant.name, name, "n/a", why_not))
                continue
            try:
                with R.trace_kernels() as calls:
                    out = R.attention(q, k, v, kernel=name, **kw)
                    got = torch.autograd.grad(out, (q, k, v), grad)
                errs = [rel_err(out, ref64)] + [rel_err(g, w) for g, w in zip(got, want)]
                ran = {c.kernel for c in calls}
                ok = max(errs) < TOL and ran == {name}
                rows.append((variant.name, name, "ok" if ok else "FAIL",
                             " ".join(f"{e:.1e}" for e in errs) + ("  (auto)" if name == auto else "")))
                if not ok:
                    failures.append((variant.name, name, errs, ran))
            except Exception as e:  # noqa: BLE001 - every kernel error is reported, then fails the test
                rows.append((variant.name, name, "ERROR", f"{type(e).__name__}: {str(e)[:150]}"))
                failures.append((variant.name, name, repr(e)[:300]))
    print(f"\n{'variant':28} {'kernel':10} {'status':6} rel.err out dq dk dv / reason")
    for r in rows:
        print(f"{r[0]:28} {r[1]:10} {r[2]:6} {r[3]}")
    assert not failures, failures


@pytest.mark.parametrize("kernel", ["cudnn", "efficient"])
def test_dropout_forward_and_backward_share_the_mask(kernel):
    from tests.runtime_ops.variants import Variant

    variant = Variant("drop", heads_q=8, heads_kv=8 if kernel == "efficient" else 2, seqlen_q=256, seqlen_k=256,
                      dim_qk=64, dim_v=64)
    q, k, v, kw = make_inputs(variant, torch.bfloat16, "cuda")
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, dropout_p=0.2, kernel=kernel, **kw)
        grad = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda",
                           dtype=out.dtype)
        (dv,) = torch.autograd.grad(out, (v,), grad)
    assert {c.kernel for c in calls} == {kernel}
    terms = grad.float() * out.float()
    lhs, rhs = terms.sum(), (dv.float() * v.float()).sum()
    # out = P_drop V gives <dO, out> = <P_drop^T dO, V> = <dV, V> only when both use one mask: a
    # different mask is off by ~1/sqrt(N) of the summed magnitudes, bf16 rounding by ~1e-5
    assert abs(lhs - rhs) / terms.abs().sum() < 2e-4
    print(f"\ndropout on {kernel}: <dO,out>={lhs.item():.4f} <dV,v>={rhs.item():.4f}")


@pytest.mark.parametrize("kernel", ["decode", "fa4", "flash", "cudnn", "efficient", "math"])
def test_seqused_k_decode_matches_sliced_cache(kernel):
    kern = kernels.KERNELS[kernel]
    if kern.available(torch.device("cuda")):
        pytest.skip(kern.available(torch.device("cuda")))
    torch.manual_seed(0)
    heads = 8 if kernel == "efficient" else 16  # EFFICIENT has no GQA
    q = torch.randn(4, 1, heads, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(4, 8, 1024, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    lengths = torch.tensor([1, 300, 777, 1024], device="cuda", dtype=torch.int32)
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, layout="bshd", seqused_k=lengths, kernel=kernel)
    assert {c.kernel for c in calls} == {kernel}
    for b, n in enumerate(lengths.tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1].transpose(1, 2).float(), k[b:b + 1, :n].transpose(1, 2).float(),
            v[b:b + 1, :n].transpose(1, 2).float(), enable_gqa=True).transpose(1, 2)
        assert rel_err(out[b:b + 1], ref) < TOL


def test_decode_over_a_cache_runs_in_a_cuda_graph():
    """The decode path reads key lengths on the device only, so a decode step can be captured."""
    torch.manual_seed(0)
    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 8, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([1000 + 37 * i for i in range(8)], device="cuda", dtype=torch.int32)
    eager = R.attention(q, k, v, seqused_k=lengths)
    graph = torch.cuda.CUDAGraph()
    with R.trace_kernels() as calls, torch.cuda.graph(graph):
        out = R.attention(q, k, v, seqused_k=lengths)
    lengths += 5  # the graph reads the new lengths when replayed
    graph.replay()
    assert {c.kernel for c in calls} == {"decode"}
    want = R.attention(q, k, v, seqused_k=lengths)
    assert rel_err(out, want) < 1e-6 and rel_err(out, eager) > 1e-4


@pytest.mark.parametrize("heads,dims,window", [((32, 8), (128, 128), -1), ((8, 8), (64, 64), -1),
                                                ((16, 2), (96, 96), -1), ((64, 1), (256, 256), -1),
                                                ((16, 16), (192, 128), -1), ((32, 8), (128, 128), 100)])
@pytest.mark.parametrize("cache", [257, 8192])
def test_split_kv_decode_against_float64(heads, dims, window, cache):
    """attnopt's split-KV decode kernel: any group size, head dims (MLA's dqk != dv), lengths from
    0 (no key: out 0, lse -inf) to the whole cache and not multiples of a block, a sliding window;
    out, lse and (through the math backward) the gradients against float64."""
    (hq, hkv), (d, dv) = heads, dims
    torch.manual_seed(0)
    b = 5
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, cache, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, cache, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lengths = torch.tensor([0, 1, cache // 3 + 1, cache - 1, cache], device="cuda", dtype=torch.int32)
    kw = dict(seqused_k=lengths, is_causal=True, causal_align="bottom_right", window_size=(window, 0))
    with R.trace_kernels() as calls:
        out, lse, _ = torch.ops.attnopt.attention(q, k, v, None, 0.0, True, None, "bhsd", None, "bottom_right",
                                                  [window, 0], None, None, None, None, "auto", lengths)
        attn = R.attention(q, k, v, **kw)
    assert {c.kernel for c in calls} == {"decode"}
    grad = torch.randn_like(attn)
    got = torch.autograd.grad(attn, (q, k, v), grad)
    for i, n in enumerate(lengths.tolist()):
        lo = max(0, n - 1 - window) if window >= 0 else 0
        if n == 0:
            assert out[i].abs().max() == 0 and torch.isneginf(lse[i]).all()
            assert all(g[i].abs().max() == 0 for g in got)
            continue
        q64, k64, v64 = (t[i:i + 1].detach().double().cpu().requires_grad_() for t in (q, k, v))
        kk, vv = (t[:, :, lo:n].repeat_interleave(hq // hkv, 1) for t in (k64, v64))
        scores = q64 @ kk.transpose(-1, -2) * d ** -0.5
        ref = scores.softmax(-1) @ vv
        want = torch.autograd.grad(ref, (q64, k64, v64), grad[i:i + 1].double().cpu())
        assert rel_err(out[i:i + 1], ref) < TOL and rel_err(attn[i:i + 1], ref) < TOL
        assert (lse[i].double().cpu() - scores.logsumexp(-1)[0]).abs().max() < 1e-2
        if n - lo == 1:  # one key: the softmax is constant, dq and dk are zero up to rounding
            assert all(g[i].abs().max() < 1e-2 for g in got[:2]) and rel_err(got[2][i:i + 1], want[2]) < TOL
            continue
        for g, w in zip(got, want):
            assert rel_err(g[i:i + 1], w) < TOL


NEG = float("-inf")


def _table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    for r in rows:
        print("  " + "  ".join(f"{c:<22}" if i == 0 else str(c) for i, c in enumerate(r)))


def _check_every_kernel(title, spec, run, want, tol, require=()):
    """Run ``run(kernel)`` on each kernel ``spec`` admits, compare with ``want`` (float64 CPU tensors),
    print a table and fail on any error; every kernel in ``require`` must be among those admitted."""
    rows, failures = [], []
    admitted = {n for n, why in kernels.explain(spec).items() if why == "ok"}
    for name, why_not in kernels.explain(spec).items():
        if why_not != "ok":
            rows.append((name, "n/a", why_not))
            continue
        try:
            with R.trace_kernels() as calls:
                got = run(name)
            errs = [rel_err(g, w) for g, w in zip(got, want)]
            ok = max(errs) < tol and {c.kernel for c in calls} == {name}
            rows.append((name, "ok" if ok else "FAIL", " ".join(f"{e:.1e}" for e in errs)))
            if not ok:
                failures.append((name, errs, {c.kernel for c in calls}))
        except Exception as e:  # noqa: BLE001 - every kernel error is reported, then fails the test
            rows.append((name, "ERROR", f"{type(e).__name__}: {str(e)[:150]}"))
            failures.append((name, repr(e)[:300]))
    _table(title, rows)
    assert not failures, failures
    missing = {n for n in require if kernels.KERNELS[n].available(torch.device("cuda")) is None} - admitted
    assert not missing, f"kernels that should take this call did not: {missing}"


def _gpt_oss(q, k, v, sinks, keep):
    """transformers' GPT-OSS eager attention, float64 on CPU, [B, H, S, D] in and out."""
    import types

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], sinks=sinks, training=False)
    mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, NEG)
    return eager_attention_forward(module, q, k, v, mask, q.shape[-1] ** -0.5)[0].transpose(1, 2)


def _causal(sq, sk, left=-1):
    i, j = torch.arange(sq)[:, None] + sk - sq, torch.arange(sk)[None]
    return (j <= i) & (j >= i - left) if left >= 0 else j <= i


@pytest.mark.parametrize("window", [-1, 96], ids=["causal", "sliding_window"])
def test_sinks_on_every_cuda_kernel(window):
    """GPT-OSS shapes (64 query heads in 8 groups, head dim 64), bf16 with float32 sinks, against its
    eager attention in float64: out, dq, dk, dv, dsinks."""
    torch.manual_seed(0)
    b, hq, hkv, s, d = 2, 64, 8, 384, 64
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # bshd
    k, v = (torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    sinks = torch.randn(hq, device="cuda", requires_grad=True)
    kw = dict(layout="bshd", is_causal=True, window_size=(window, 0), sinks=sinks)
    t = lambda x: x.detach().double().cpu().transpose(1, 2).requires_grad_()
    q64, k64, v64, s64 = t(q), t(k), t(v), sinks.detach().double().cpu().requires_grad_()
    ref = _gpt_oss(q64, k64, v64, s64, _causal(s, s, window)).transpose(1, 2)
    grad = torch.randn(ref.shape, device="cuda", dtype=torch.bfloat16)
    want = [ref, *torch.autograd.grad(ref, (q64, k64, v64, s64), grad.double().cpu())]
    want[1:4] = [w.transpose(1, 2) for w in want[1:4]]

    def run(kernel):
        out = R.attention(q, k, v, kernel=kernel, **kw)
        return [out, *torch.autograd.grad(out, (q, k, v, sinks), grad)]

    _check_every_kernel(f"sinks, window {window}: rel.err out dq dk dv dsinks", spec_for(q, k, v, **kw), run, want,
                        TOL, require=("flash", "math") if window > 0 else ("cudnn", "flash", "efficient", "math"))


def test_sinks_on_packed_sequences_on_cuda():
    torch.manual_seed(0)
    cu = torch.tensor([0, 200, 201, 520], dtype=torch.int32, device="cuda")
    q = torch.randn(520, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(520, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    sinks = torch.randn(16, device="cuda", requires_grad=True)
    kw = dict(layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=319, max_seqlen_k=319, is_causal=True,
              sinks=sinks)
    t = lambda x: x.detach().double().cpu().requires_grad_()
    q64, k64, v64, s64 = t(q), t(k), t(v), t(sinks)
    dense = lambda x, a, c: x[a:c].transpose(0, 1).unsqueeze(0)
    offs = cu.tolist()
    ref = torch.cat([_gpt_oss(dense(q64, a, c), dense(k64, a, c), dense(v64, a, c), s64, _causal(c - a, c - a))[0]
                     .transpose(0, 1) for a, c in zip(offs, offs[1:])])
    grad = torch.randn(ref.shape, device="cuda", dtype=torch.bfloat16)
    want = [ref, *torch.autograd.grad(ref, (q64, k64, v64, s64), grad.double().cpu())]

    def run(kernel):
        out = R.attention(q, k, v, kernel=kernel, **kw)
        return [out, *torch.autograd.grad(out, (q, k, v, sinks), grad)]

    _check_every_kernel("packed sinks: rel.err out dq dk dv dsinks", spec_for(q, k, v, **kw), run, want, TOL,
                        require=("flash", "math"))


BIAS_SHAPES = {"t5": (1, 16, 256, 320), "alibi": (16, 1, 320)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", BIAS_SHAPES.values(), ids=BIAS_SHAPES.keys())
def test_learned_bias_gradient_on_cuda(shape, dtype):
    """A bias that requires grad, GQA (16 / 4 heads), causal: the kernels that return its gradient
    (EFFICIENT, math) against SDPA in float64 on CPU; the policy picks EFFICIENT."""
    torch.manual_seed(0)
    q = torch.randn(2, 16, 256, 64, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 4, 320, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    bias = torch.randn(shape, device="cuda", requires_grad=True)  # float32, as models keep it
    t = lambda x: x.detach().double().cpu().requires_grad_()
    q64, k64, v64, b64 = t(q), t(k), t(v), t(bias)
    band = torch.ones(256, 320, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, attn_mask=b64.masked_fill(~band, NEG),
                                                           enable_gqa=True)
    grad = torch.randn(ref.shape, device="cuda", dtype=dtype)
    want = [ref, *torch.autograd.grad(ref, (q64, k64, v64, b64), grad.double().cpu())]

    def run(kernel):
        out = R.attention(q, k, v, bias, is_causal=True, kernel=kernel)
        return [out, *torch.autograd.grad(out, (q, k, v, bias), grad)]

    assert R.kernel_for(q, k, v, bias, is_causal=True) == "efficient"
    _check_every_kernel(f"learned bias {tuple(shape)} {dtype}: rel.err out dq dk dv dbias",
                        spec_for(q, k, v, bias, is_causal=True), run, want, TOL, require=("efficient", "math"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, b: R.attention(q, k, v, b, is_causal=True), fullgraph=True)
    out = compiled(q, k, v, bias)
    for g, w in zip([out, *torch.autograd.grad(out, (q, k, v, bias), grad)], want):
        assert rel_err(g, w) < TOL


def _same_nans(got, want) -> float:
    """Fails unless NaNs sit exactly where ``want`` has them; the relative error elsewhere."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), (int(got.isnan().sum()), int(want.isnan().sum()))
    return rel_err(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("mode", ["nan", "nan_additive"])
@pytest.mark.parametrize("case", ["mask_gqa", "band_only"])
def test_nan_rows_on_every_cuda_kernel(case, mode):
    """Rows that keep no key reproduce eager's NaNs (float64 on CPU) on every kernel that takes the
    call: a bool or -inf additive padding mask with GQA, or bottom-right causal with Sq > Sk."""
    torch.manual_seed(0)
    b, hq, hkv, d = 2, 8, 2, 64
    sq, sk = (128, 128) if case == "mask_gqa" else (160, 128)
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    kw: dict = dict(empty_rows=mode)
    if case == "mask_gqa":
        keep = torch.ones(b, hq, sq, sk, dtype=torch.bool)
        keep[0, 3, 5:9] = False  # four empty rows in batch 0, query head 3 (key/value head 1)
        keep[1, :, :, :7] = False
        mask = keep if mode == "nan" else torch.zeros(keep.shape).masked_fill(~keep, NEG).to(torch.bfloat16)
        kw["attn_mask"] = mask.cuda()
    else:
        keep = _causal(sq, sk).expand(b, hq, sq, sk)
        kw.update(is_causal=True, causal_align="bottom_right")
    t = lambda x: x.detach().double().cpu().requires_grad_()
    q64, k64, v64 = t(q), t(k), t(v)
    s = q64 @ k64.repeat_interleave(hq // hkv, 1).transpose(-1, -2) * d ** -0.5
    fill = torch.zeros(keep.shape, dtype=s.dtype).masked_fill(~keep, NEG)
    s = s.masked_fill(~keep, NEG) if mode == "nan" else s + fill
    ref = torch.softmax(s, -1) @ v64.repeat_interleave(hq // hkv, 1)
    grad = torch.randn(ref.shape, device="cuda", dtype=torch.bfloat16)
    want = [ref, *torch.autograd.grad(ref, (q64, k64, v64), grad.double().cpu())]
    assert ref.isnan().any()
    rows = []
    for name, why_not in kernels.explain(spec_for(q, k, v, **kw)).items():
        if why_not != "ok":
            rows.append((name, "n/a", why_not))
            continue
        out = R.attention(q, k, v, kernel=name, **kw)
        errs = [_same_nans(g, w) for g, w in zip([out, *torch.autograd.grad(out, (q, k, v), grad)], want)]
        rows.append((name, "ok", " ".join(f"{e:.1e}" for e in errs)))
        assert max(errs) < TOL, (name, errs)
    _table(f"empty rows {case} {mode}: rel.err out dq dk dv (NaNs matched)", rows)


@pytest.mark.parametrize("kernel", ["auto", "fa4", "cudnn", "flash", "efficient"])
def test_head_dim_of_any_stride_compiled_on_cuda(kernel):
    """q/k/v viewed head-major over [B, S, D, H] memory, compiled with Inductor, on each kernel."""
    kern = kernels.KERNELS.get(kernel)
    if kern is not None and kern.available(torch.device("cuda")):
        pytest.skip(kern.available(torch.device("cuda")))
    torch.manual_seed(0)
    hkv = 8 if kernel == "efficient" else 2
    mk = lambda h: torch.randn(2, 256, 64, h, device="cuda", dtype=torch.bfloat16).permute(0, 3, 1, 2).requires_grad_()
    q, k, v = mk(8), mk(hkv), mk(hkv)
    assert q.stride(-1) == 8
    align = "top_left" if kernel in ("cudnn", "efficient", "auto") else "bottom_right"
    f = lambda q, k, v: R.attention(q, k, v, is_causal=True, causal_align=align, kernel=kernel)
    t = lambda x: x.detach().double().cpu().requires_grad_()
    q64, k64, v64 = t(q), t(k), t(v)
    ref = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=True)
    grad = torch.randn(ref.shape, device="cuda", dtype=torch.bfloat16)
    want = [ref, *torch.autograd.grad(ref, (q64, k64, v64), grad.double().cpu())]
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(q, k, v)
    errs = [rel_err(g, w) for g, w in zip([out, *torch.autograd.grad(out, (q, k, v), grad)], want)]
    print(f"\nhead dim stride 8, compiled, kernel={kernel}: " + " ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < TOL


def test_key_lengths_out_of_range_fail_on_the_device():
    """seqused_k is range-checked by a device-side assert (no host sync); the assert poisons the CUDA
    context, so it runs in a child process."""
    import subprocess
    import sys

    code = ("import torch, attnopt.runtime_ops as R\n"
            "q = torch.randn(2, 8, 1, 64, device='cuda', dtype=torch.bfloat16)\n"
            "k = torch.randn(2, 8, 256, 64, device='cuda', dtype=torch.bfloat16)\n"
            "R.attention(q, k, k, seqused_k=torch.tensor([17, {}], device='cuda', dtype=torch.int32))\n"
            "torch.cuda.synchronize()\n")
    ok = subprocess.run([sys.executable, "-c", code.format(256)], capture_output=True, text=True)
    bad = subprocess.run([sys.executable, "-c", code.format(257)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert bad.returncode != 0 and "assert" in bad.stderr.lower(), bad.stderr[-2000:]


def test_a_hand_written_call_never_waits_for_the_device():
    """A hand-written site (eager's NaN rows asked for) and packed sequences whose offsets were
    read once: forward and backward issue no host read, so nothing stalls the launch queue."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    keep = torch.ones(512, 512, device="cuda", dtype=torch.bool).tril()
    cu = torch.tensor([0, 300, 512, 1024], device="cuda", dtype=torch.int32)
    packed = [t.detach().transpose(1, 2).reshape(1024, 8, 64).requires_grad_() for t in (q, k, v)]
    R.attention(*packed, layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=512, max_seqlen_k=512)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("nan", "nan_additive"):
            mask = keep if mode == "nan" else torch.zeros(keep.shape, device="cuda", dtype=q.dtype).masked_fill(~keep, NEG)
            out = R.attention(q, k, v, mask, empty_rows=mode)
            torch.autograd.grad(out.sum(), (q, k, v))
        out = R.attention(*packed, layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=512,
                          max_seqlen_k=512, is_causal=True, empty_rows="nan")
        torch.autograd.grad(out.sum(), packed)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_training_step_in_cuda_graphs(monkeypatch):
    """torch.compile(backend=attnopt.backend(...), mode="reduce-overhead"): a training step of a Llama
    attention block captures and replays as CUDA graphs (no graph skipped), its gradients equal
    to eager's."""
    from torch._dynamo.utils import counters

    from attnopt.demo_model import LlamaAttention

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    captures, begin = [], torch.cuda.CUDAGraph.capture_begin
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin",
                        lambda self, *a, **kw: (captures.append(1), begin(self, *a, **kw))[1])
    model = LlamaAttention(512, 8, 2).cuda().to(torch.bfloat16)
    compiled = torch.compile(model, backend=attnopt.backend(kernel="cudnn"), mode="reduce-overhead")  # the op
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # warm up, record, replay
        model.zero_grad()
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(x)
        out.float().square().mean().backward()
    out, got = out.clone(), [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.float().square().mean().backward()
    assert rel_err(out, ref) < TOL
    for g, p in zip(got, model.parameters()):
        assert rel_err(g, p.grad) < TOL
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert len(captures) >= 2  # forward and backward graphs
    torch._dynamo.reset()
