"""One attention call, forward+backward, through each kernel: device time and host time.

Separates what a kernel costs on the GPU from what its Python launch path costs on the host,
so that a slow end-to-end figure can be traced to one or the other.

    python bench/kernel_calls.py      # B=2 S=4096 Hq=32 Hkv=8 D=128 bf16 causal, BSHD inputs
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnopt  # noqa: E402
from attnopt.runtime_ops import kernels  # noqa: E402
from common import add_shape_args, environment, projections, time_ms, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_calls.py times CUDA kernels; no CUDA device is visible")
    b, s, h, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q, k, v, grad = projections(args, split_heads=True)

    def clear():
        for t in (q, k, v):
            t.grad = None

    paths = {
        "sdpa enable_gqa (views)": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        ).transpose(1, 2),
    }
    for name in ("fa4", "cudnn", "flash"):
        kern = kernels.KERNELS[name]
        if kern.available(q.device) is None:
            paths[f"attnopt.attention kernel={name}"] = (
                lambda name=name: attnopt.attention(q, k, v, is_causal=True, layout="bshd", kernel=name))
    try:
        from flash_attn.cute import flash_attn_func

        paths["flash_attn.cute.flash_attn_func"] = lambda: flash_attn_func(q, k, v, causal=True)[0]
    except ImportError:
        pass

    rows = []
    for name, fn in paths.items():
        def step(fn=fn):
            clear()
            fn().backward(grad)

        t = time_ms(step, iters=args.iters)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):  # host time to enqueue one step (the GPU may still be busy)
            clear()
            out = fn()
            out.backward(grad)
        host = (time.perf_counter() - start) / 20 * 1e3
        torch.cuda.synchronize()
        rows.append({"path": name, **t, "host_ms": host})
    env = environment()
    print(f"\none attention fwd+bwd, B={b} S={s} Hq={h} Hkv={hkv} D={d} bf16 causal, BSHD")
    print(f"{env.get('device')} torch {env['torch']} cuDNN {env.get('cudnn')} flash-attn-4 {env['flash_attn_4']}")
    print(f"{'path':40} {'median ms':>9} {'min':>7} {'host ms':>8}")
    for r in rows:
        print(f"{r['path']:40} {r['median_ms']:9.3f} {r['min_ms']:7.3f} {r['host_ms']:8.3f}")
    write_json("kernels", {"env": env, "shape": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
