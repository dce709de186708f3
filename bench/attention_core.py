"""Attention core as transformers writes it, forward+backward: eager vs Inductor vs attnopt.

From the q/k/v projections ([B, S, H*D]) to the output projection's input: view, transpose,
repeat_kv of K/V, SDPA with is_causal, transpose back, contiguous, reshape. The "views +
enable_gqa" row is the same attention written by hand in its best form, for reference.

    python bench/attention_core.py            # Llama-3-8B: B=2 S=4096 Hq=32 Hkv=8 D=128 bf16
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
from common import add_shape_args, environment, measure_fwd_bwd, print_fwd_bwd, projections, write_json  # noqa: E402


def hf_core(q, k, v, heads, kv_heads):
    b, s, _ = q.shape
    d = q.shape[-1] // heads
    q = q.view(b, s, heads, d).transpose(1, 2)
    k = k.view(b, s, kv_heads, d).transpose(1, 2)
    v = v.view(b, s, kv_heads, d).transpose(1, 2)
    k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2).contiguous().reshape(b, s, -1)


def best_form(q, k, v, heads, kv_heads):
    b, s, _ = q.shape
    d = q.shape[-1] // heads
    q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return o.transpose(1, 2).reshape(b, s, -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p, iters=30)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_core.py times CUDA kernels; no CUDA device is visible")
    b, s, h, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q, k, v, grad = projections(args)
    variants = {
        "eager": lambda *t: hf_core(*t, h, hkv),
        "inductor": torch.compile(lambda *t: hf_core(*t, h, hkv)),
        "attnopt": torch.compile(lambda *t: hf_core(*t, h, hkv), backend="attnopt"),
        "attnopt, cuDNN forced": torch.compile(lambda *t: hf_core(*t, h, hkv), backend=attnopt.backend(kernel="cudnn")),
        "views + enable_gqa (inductor)": torch.compile(lambda *t: best_form(*t, h, hkv)),
    }
    with torch.no_grad():
        ref_out = hf_core(q.float(), k.float(), v.float(), h, hkv).cpu()
    rows = measure_fwd_bwd(variants, q, k, v, grad, ref_out, args.iters)

    env = environment()
    print_fwd_bwd(f"attention core fwd+bwd, B={b} S={s} Hq={h} Hkv={hkv} D={d} bf16 causal", rows, env, "inductor")
    path = write_json("attention_core", {"env": env, "shape": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
