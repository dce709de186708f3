"""SDPA spellings that cost copies, forward+backward: the code as written vs attnopt vs its best form.

    python bench/sdpa_spellings.py megatron   # SBHD, transpose(0,1).contiguous() -> SDPA -> .contiguous() back
    python bench/sdpa_spellings.py mla        # dqk=192, dv=128: pad V to 192 -> SDPA -> slice

Megatron: S=4096, B=2, H=32, D=128, causal; q/k/v arrive as [S, B, H*D] (a QKV projection in
sequence-first order) and the output leaves as [S, B, H*D]. The reference is the same attention on
permute views. MLA: B=2, S=4096, H=32, causal, scale 192**-0.5, as TransformerEngine and the
flash-attn integrations write it; the reference passes V unpadded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, measure_fwd_bwd, print_fwd_bwd, write_json  # noqa: E402


def megatron_seed(q, k, v, heads):
    """[S, B, H*D] in and out, copies to [B, S, H, D] and back, as Megatron's seed code does."""
    s, b, _ = q.shape
    q, k, v = (t.view(s, b, heads, -1).transpose(0, 1).contiguous().transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2).transpose(0, 1).contiguous().view(s, b, -1)


def megatron_views(q, k, v, heads):
    s, b, _ = q.shape
    q, k, v = (t.view(s, b, heads, -1).permute(1, 2, 0, 3) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.permute(2, 0, 1, 3).reshape(s, b, -1)


def mla_padded(q, k, v, heads):
    """q, k [B, S, H*192], v [B, S, H*128]: V padded to 192 for the kernel, the output sliced."""
    b, s, _ = q.shape
    q, k, v = (t.view(b, s, heads, -1).transpose(1, 2) for t in (q, k, v))
    dqk, dv = q.shape[-1], v.shape[-1]
    o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, dqk - dv)), is_causal=True, scale=dqk ** -0.5)
    return o[..., :dv].transpose(1, 2).reshape(b, s, -1)


def mla_native(q, k, v, heads):
    b, s, _ = q.shape
    q, k, v = (t.view(b, s, heads, -1).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=q.shape[-1] ** -0.5)
    return o.transpose(1, 2).reshape(b, s, -1)


CASES = {
    "megatron": (megatron_seed, megatron_views, "permute views (inductor)"),
    "mla": (mla_padded, mla_native, "native dv != dqk (inductor)"),
}


def inputs(case: str, args):
    torch.manual_seed(0)
    b, s, h = args.batch, args.seq, args.heads
    mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if case == "megatron":
        q, k, v = (mk(s, b, h * 128) for _ in range(3))
        return q, k, v, torch.randn(s, b, h * 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = mk(b, s, h * 192), mk(b, s, h * 192), mk(b, s, h * 128)
    return q, k, v, torch.randn(b, s, h * 128, device="cuda", dtype=torch.bfloat16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sdpa_spellings.py times CUDA kernels; no CUDA device is visible")
    as_written, best, best_name = CASES[args.case]
    h = args.heads
    q, k, v, grad = inputs(args.case, args)
    variants = {
        "inductor": torch.compile(lambda *t: as_written(*t, h)),
        "attnopt": torch.compile(lambda *t: as_written(*t, h), backend="attnopt"),
        best_name: torch.compile(lambda *t: best(*t, h)),
    }
    with torch.no_grad():
        ref = best(q.float(), k.float(), v.float(), h).cpu()
    rows = measure_fwd_bwd(variants, q, k, v, grad, ref, args.iters)
    env = environment()
    print_fwd_bwd(f"{args.case}, fwd+bwd, B={args.batch} S={args.seq} H={h} bf16 causal", rows, env, best_name)
    write_json(f"sdpa_{args.case}", {"env": env, "shape": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
