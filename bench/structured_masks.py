"""Attention with structured in-graph masks, as models build them: chunked (Llama 4) and decode
over a static KV cache. Each row: Inductor compiling the code as written vs attnopt.

    python bench/structured_masks.py chunked   # B=1 S=16384 Hq=32 Hkv=8 D=128, chunk 4096, fwd+bwd
    python bench/structured_masks.py decode    # batch 8, cache 8192 (4096 filled), 32/8 heads, forward

Decode runs with and without CUDA graphs (``mode="reduce-overhead"``; for attnopt the same
Inductor option, ``triton.cudagraphs``), the cache held in buffers as transformers' StaticCache
holds it. "replay" is the compiled step captured in one CUDA graph and replayed: its device time,
which is what the step adds to a decode step captured whole (all layers in one graph); a single
call through ``torch.compile`` also pays the per-call host cost of Dynamo and the graph launch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnopt  # noqa: E402
from attnopt.demo_model import repeat_kv  # noqa: E402
from common import environment, graph_replay_ms, peak_mib, time_ms, write_json  # noqa: E402


def chunked_core(q, k, v, heads, kv_heads, chunk):
    """Llama 4 chunked attention with its dense mask: same chunk AND causal."""
    b, s, _ = q.shape
    d = q.shape[-1] // heads
    idx = torch.arange(s, device=q.device)
    qi, ki = idx[None, None, :, None], idx[None, None, None, :]
    mask = (qi // chunk == ki // chunk) & (ki <= qi)
    q = q.view(b, s, heads, d).transpose(1, 2)
    k = repeat_kv(k.view(b, s, kv_heads, d).transpose(1, 2), heads // kv_heads)
    v = repeat_kv(v.view(b, s, kv_heads, d).transpose(1, 2), heads // kv_heads)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).contiguous().reshape(b, s, -1)


def decode_core(q, k_cache, v_cache, cache_position, heads, kv_heads):
    """One decode step over a static cache [B, Hkv, max_len, D], the mask over cache positions
    (transformers 4.x)."""
    b = q.shape[0]
    d = q.shape[-1] // heads
    q = q.view(b, 1, heads, d).transpose(1, 2)
    k = repeat_kv(k_cache, heads // kv_heads)
    v = repeat_kv(v_cache, heads // kv_heads)
    kv_idx = torch.arange(k_cache.shape[2], device=q.device)
    mask = (kv_idx[None, :] <= cache_position[:, None])[None, None].expand(b, 1, 1, -1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).reshape(b, 1, -1)


def static_cache_core(q, k_cache, v_cache, cached, heads, kv_heads):
    """Sq new tokens after ``cached`` (a one-element tensor) cached ones, as transformers 5.x
    masks a StaticCache: key k is seen by query q when k <= q + cached."""
    b, sq, _ = q.shape
    d = q.shape[-1] // heads
    q = q.view(b, sq, heads, d).transpose(1, 2)
    k = repeat_kv(k_cache, heads // kv_heads)
    v = repeat_kv(v_cache, heads // kv_heads)
    q_idx = torch.arange(sq, device=q.device)[:, None]
    kv_idx = torch.arange(k_cache.shape[2], device=q.device)[None, :]
    mask = (kv_idx <= q_idx + cached)[None, None].expand(b, 1, sq, -1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).reshape(b, sq, -1)


def run_chunked(args) -> list[dict]:
    b, s, h, hkv, d, c = 1, args.seq or 16384, 32, 8, 128, args.chunk
    mk = lambda n: torch.randn(b, s, n * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(h), mk(hkv), mk(hkv)
    grad = torch.randn(b, s, h * d, device="cuda", dtype=torch.bfloat16)
    fn = lambda *t: chunked_core(*t, h, hkv, c)
    rows = []
    for name, compiled in (("inductor", torch.compile(fn)), ("attnopt", torch.compile(fn, backend="attnopt"))):
        def step(compiled=compiled):
            for t in (q, k, v):
                t.grad = None
            compiled(q, k, v).backward(grad)

        with attnopt.runtime_ops.trace_kernels() as calls:
            step()
        rows.append({"variant": name, **time_ms(step, warmup=3, iters=5, repeats=3), "peak_mib": peak_mib(step),
                     "kernel": ",".join(sorted({x.kernel for x in calls})) or "(torch SDPA)"})
    return rows


class StaticCacheStep(torch.nn.Module):
    """A decode step over a cache held in buffers, as transformers' StaticCache holds it: CUDA
    graphs then read the cache in place instead of copying it into the graph on every replay."""

    def __init__(self, k_cache, v_cache, heads, kv_heads):
        super().__init__()
        self.register_buffer("k_cache", k_cache)
        self.register_buffer("v_cache", v_cache)
        self.heads, self.kv_heads = heads, kv_heads

    def forward(self, q, cached):
        return static_cache_core(q, self.k_cache, self.v_cache, cached, self.heads, self.kv_heads)


def run_decode(args) -> list[dict]:
    b, h, hkv, d, max_len, filled = args.batch or 8, 32, 8, 128, 8192, 4096
    q = torch.randn(b, 1, h * d, device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(b, hkv, max_len, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(b, hkv, max_len, d, device="cuda", dtype=torch.bfloat16)
    model = StaticCacheStep(k_cache, v_cache, h, hkv)
    cached = torch.tensor([filled - 1], device="cuda")
    with torch.no_grad():
        ref = static_cache_core(q.float(), k_cache[:, :, :filled].float(), v_cache[:, :, :filled].float(), cached,
                                h, hkv)
    graphs = {"triton.cudagraphs": True}
    variants = {
        "inductor": lambda: torch.compile(model),
        "attnopt": lambda: torch.compile(model, backend="attnopt"),
        "inductor, CUDA graphs": lambda: torch.compile(model, mode="reduce-overhead"),
        "attnopt, CUDA graphs": lambda: torch.compile(model, backend=attnopt.backend(**graphs)),
    }
    rows = []
    with torch.no_grad():
        for name, make in variants.items():
            torch._dynamo.reset()
            compiled = make()
            step = lambda compiled=compiled: compiled(q, cached)
            with attnopt.runtime_ops.trace_kernels() as calls:
                for _ in range(3):  # CUDA graphs record on a later call
                    out = step()
            err = float((out.float() - ref).norm() / ref.norm())
            t = time_ms(step, iters=100)
            replay = float("nan") if "graphs" in name else 1000 * graph_replay_ms(step)["median_ms"]
            rows.append({"variant": name, **{k: v * 1000 for k, v in t.items()}, "unit": "us", "replay_us": replay,
                         "rel_err": err, "peak_mib": peak_mib(step),
                         "kernel": ",".join(sorted({x.kernel for x in calls})) or "(torch SDPA)"})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=["chunked", "decode"])
    p.add_argument("--seq", type=int, default=0)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--batch", type=int, default=0, help="decode batch (default 8)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("structured_masks.py times CUDA kernels; no CUDA device is visible")
    rows = run_chunked(args) if args.case == "chunked" else run_decode(args)
    env = environment()
    unit = "us" if args.case == "decode" else "ms"
    print(f"\n{args.case}: {env.get('device')} torch {env['torch']} cuDNN {env.get('cudnn')} "
          f"flash-attn-4 {env['flash_attn_4']}")
    print(f"{'variant':24} {'median ' + unit:>10} {'min':>9} {'replay':>9} {'peak MiB':>9} {'rel err':>8} kernel")
    for r in rows:
        print(f"{r['variant']:24} {r['median_ms']:10.3f} {r['min_ms']:9.3f} {r.get('replay_us', float('nan')):9.1f} "
              f"{r['peak_mib']:9.0f} {r.get('rel_err', float('nan')):8.1e} {r['kernel']}")
    name = f"structured_{args.case}" + (f"_batch{args.batch}" if args.case == "decode" and args.batch else "")
    write_json(name, {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
