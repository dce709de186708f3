"""Attention core over a sweep of shapes, forward+backward: eager vs Inductor vs attnopt, and the
fastest single kernel call for reference. Short sequences are host-bound, long ones kernel-bound,
so the comparison holds only over the whole sweep.

    python bench/sweep.py                              # S 256..16384 with B*S = 16384; 32/8 and 32/32 heads; D 64, 128
    python bench/sweep.py --seq 1024 4096 --heads 32/8 --head-dim 128
    python bench/sweep.py --decode                     # decode: batch 1, 8, 64; cache 1k..32k, half filled

The core is the one ``bench/attention_core.py`` times (transformers' view, transpose, repeat_kv,
SDPA with is_causal, transpose back, contiguous, reshape), bf16. "attnopt portable" is attnopt's
SDPA-on-views target. "best kernel" is the fastest of one SDPA call on strided views with
``enable_gqa`` per SDPA backend, and flash-attn-4's ``flash_attn_func`` where it is installed.
Each point writes its rows to the JSON as it finishes.

The decode sweep times one decode step as transformers 5.x writes it over a StaticCache (mask
``k <= q + cached``, repeat_kv of the whole cache; ``structured_masks.static_cache_core``), the
cache half filled, forward, each compiled step captured in a CUDA graph and replayed (its device
time inside a captured decode step): Inductor on the code as written, attnopt, and attnopt's
attention call alone (per-batch key lengths on its split-KV kernel, and on FLASH), against the
time to read the filled K/V once at the measured copy bandwidth (``decode_kernel.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnopt  # noqa: E402
from attention_core import hf_core  # noqa: E402
from common import environment, graph_replay_ms, time_ms, write_json  # noqa: E402
from decode_kernel import cache_inputs, copy_bandwidth, kv_read_us, op_us  # noqa: E402
from structured_masks import StaticCacheStep, static_cache_core  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _kernel_calls(h: int, hkv: int, d: int) -> dict:
    """One attention call on [B, S, H*D] projections, per kernel that can run it."""
    def sdpa(backend):
        def call(q, k, v):
            b, s, _ = q.shape
            q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return call

    calls = {f"sdpa {name}": sdpa(backend) for name, backend in BACKENDS.items()}
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return calls

    def fa4(q, k, v):
        b, s, _ = q.shape
        return flash_attn_func(*(t.view(b, s, -1, d) for t in (q, k, v)), causal=True)[0]

    calls["fa4"] = fa4
    return calls


def point(b: int, s: int, h: int, hkv: int, d: int, iters: int) -> list[dict]:
    torch.manual_seed(0)
    mk = lambda n: torch.randn(b, s, n * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(h), mk(hkv), mk(hkv)
    grad = torch.randn(b, s, h * d, device="cuda", dtype=torch.bfloat16)
    core = lambda *t: hf_core(*t, h, hkv)
    variants = {"eager": core, "inductor": torch.compile(core), "attnopt": torch.compile(core, backend="attnopt"),
                "attnopt portable": torch.compile(core, backend=attnopt.backend(target="portable"))}
    rows = []
    for name, fn in variants.items():
        def step(fn=fn):
            fn(q, k, v).backward(grad)
        try:
            rows.append({"variant": name, **time_ms(step, warmup=5, iters=iters, repeats=5)})
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, the sweep goes on
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    best = None
    for name, fn in _kernel_calls(h, hkv, d).items():
        def step(fn=fn):
            fn(q, k, v).backward(grad.view(b, s, h, d).transpose(1, 2) if name.startswith("sdpa") else
                                 grad.view(b, s, h, d))
        try:
            t = time_ms(step, warmup=5, iters=iters, repeats=5)
        except Exception:  # noqa: BLE001 - this kernel does not take the shape
            continue
        if best is None or t["median_ms"] < best["median_ms"]:
            best = {"variant": "best kernel", "kernel": name, **t}
    if best is not None:
        rows.append(best)
    torch._dynamo.reset()
    return rows


def decode_point(b: int, cache: int, h: int, hkv: int, d: int, bandwidth: float) -> dict:
    filled = cache // 2
    q, k, v, lengths = cache_inputs(b, h, hkv, d, cache, filled)
    x = q.transpose(1, 2).reshape(b, 1, h * d)
    cached = torch.tensor([filled - 1], device="cuda")
    model = StaticCacheStep(k, v, h, hkv)
    with torch.no_grad():
        ref = static_cache_core(x.double(), k[:, :, :filled].double(), v[:, :, :filled].double(), cached, h, hkv)
    row = {"batch": b, "cache": cache, "filled": filled, "kv_read_us": kv_read_us(b, hkv, d, filled, bandwidth)}
    with torch.no_grad():
        compiled_steps = {"inductor": torch.compile(model), "attnopt": torch.compile(model, backend="attnopt")}
        for name, compiled in compiled_steps.items():
            try:
                out = compiled(x, cached)
                row[f"{name}_us"] = 1e3 * graph_replay_ms(lambda: compiled(x, cached))["median_ms"]
                row[f"{name}_err"] = float((out.double() - ref).norm() / ref.norm())
            except torch.OutOfMemoryError:
                row[f"{name}_us"] = float("nan")
            torch.cuda.empty_cache()
        for kernel in ("decode", "flash"):
            row[f"op {kernel}_us"] = op_us(q, k, v, lengths, kernel)
    torch._dynamo.reset()
    return row


def decode_sweep(args, env: dict) -> None:
    bandwidth = copy_bandwidth()
    print(f"decode, {args.decode_heads} heads, D={args.decode_head_dim}, cache half filled; µs per step "
          f"(CUDA graph replay); copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'B':>3} {'cache':>6} {'K/V read':>9} {'inductor':>9} {'attnopt':>9} {'op decode':>9} {'op flash':>9}  "
          f"attnopt/inductor  op decode/K/V read")
    h, hkv = map(int, args.decode_heads.split("/"))
    results = []
    for b in args.decode_batch:
        for cache in args.decode_cache:
            r = decode_point(b, cache, h, hkv, args.decode_head_dim, bandwidth)
            results.append(r)
            write_json("sweep_decode", {"env": env, "copy_bandwidth": bandwidth, "points": results})
            print(f"{b:3d} {cache:6d} {r['kv_read_us']:9.1f} {r['inductor_us']:9.1f} {r['attnopt_us']:9.1f} "
                  f"{r['op decode_us']:9.1f} {r['op flash_us']:9.1f}  {r['attnopt_us'] / r['inductor_us']:16.3f}  "
                  f"{r['op decode_us'] / r['kv_read_us']:18.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="B*S at every point")
    p.add_argument("--heads", nargs="+", default=["32/8", "32/32"], help="query/key-value heads")
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--decode", action="store_true", help="the decode sweep instead of the forward+backward one")
    p.add_argument("--decode-heads", default="32/8")
    p.add_argument("--decode-head-dim", type=int, default=128)
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--decode-cache", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep.py times CUDA kernels; no CUDA device is visible")
    torch._dynamo.config.cache_size_limit = 256
    env = environment()
    print(f"{env.get('device')} torch {env['torch']} cuDNN {env.get('cudnn')} flash-attn-4 {env['flash_attn_4']}")
    if args.decode:
        return decode_sweep(args, env)
    print(f"{'heads':>6} {'D':>4} {'S':>6} {'B':>3} {'eager':>8} {'inductor':>8} {'attnopt':>8} {'portable':>8} "
          f"{'best':>8}  attnopt/inductor  best kernel")
    results = []
    for heads in args.heads:
        h, hkv = map(int, heads.split("/"))
        for d in args.head_dim:
            for s in args.seq:
                b = max(args.tokens // s, 1)
                rows = point(b, s, h, hkv, d, args.iters)
                results.append({"heads": h, "kv_heads": hkv, "head_dim": d, "seq": s, "batch": b, "rows": rows})
                write_json("sweep", {"env": env, "points": results})
                ms = {r["variant"]: r.get("median_ms", float("nan")) for r in rows}
                best = next((r.get("kernel", "") for r in rows if r["variant"] == "best kernel"), "")
                print(f"{heads:>6} {d:4d} {s:6d} {b:3d} {ms['eager']:8.3f} {ms['inductor']:8.3f} {ms['attnopt']:8.3f} "
                      f"{ms['attnopt portable']:8.3f} {ms.get('best kernel', float('nan')):8.3f}  "
                      f"{ms['attnopt'] / ms['inductor']:16.3f}  {best}", flush=True)


if __name__ == "__main__":
    main()
