"""Proven masks that no flag expresses: the op with the dense mask against flex_attention over the
mask's structure (block-sparse), which attnopt runs on CUDA (``attnopt.masks.plan.FLEX_DEVICES``).
Forward + backward, bf16, B=2, 32/8 heads (GQA), D=128, q/k/v from [B, S, H*D] projections.

    python bench/flex_target.py strict_band    [--seq 4096 8192 16384]   # keys k < q
    python bench/flex_target.py chunk_padding  [--chunk 2048]            # same chunk AND causal AND key padding

Variants, each compiled on its own:

- ``inductor, dense mask``: the code as written (SDPA with the mask built in the graph) under Inductor;
- ``inductor, flex by hand``: flex_attention under Inductor, its BlockMask made once outside the step
  (what the best hand-written code does);
- ``attnopt (flex)``: ``backend="attnopt"``, default policy: flex_attention over the proven structure,
  its block lists built in the graph on every step;
- ``attnopt (dense mask)``: the same with flex off: the op with the dense mask.

The flex target is worth keeping on for a shape where ``attnopt (flex)`` beats both ``inductor, dense
mask`` and ``attnopt (dense mask)``; ``rel err`` is against SDPA with the dense mask in float32. A row
that keeps no key (row 0 of the strict band) is zeros under flex and the op, and whatever CUDA's fused
masked SDPA kernel makes of it in the reference: that row alone shows in ``rel err``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnopt.masks.plan as plan  # noqa: E402
from common import environment, measure_fwd_bwd, print_fwd_bwd, projections, write_json  # noqa: E402


def dense_mask(case: str, s: int, keep: torch.Tensor, chunk: int) -> torch.Tensor:
    i = torch.arange(s, device=keep.device)
    q, k = i[:, None], i[None, :]
    if case == "strict_band":
        return k < q
    return (q // chunk == k // chunk) & (k <= q) & keep[:, None, None, :]


def mask_mod(case: str, keep: torch.Tensor, chunk: int):
    if case == "strict_band":
        return lambda b, h, q, k: k < q
    return lambda b, h, q, k: (q // chunk == k // chunk) & (k <= q) & keep[b, k]


def heads(t: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], n, d).transpose(1, 2)


def variants(case: str, args, keep: torch.Tensor) -> dict:
    h, hkv, d, s = args.heads, args.kv_heads, args.head_dim, args.seq

    def written(q, k, v):  # SDPA with the mask built in the graph
        o = F.scaled_dot_product_attention(heads(q, h, d), heads(k, hkv, d), heads(v, hkv, d),
                                           attn_mask=dense_mask(case, s, keep, args.chunk), enable_gqa=True)
        return o.transpose(1, 2).reshape(q.shape)

    block_mask = create_block_mask(mask_mod(case, keep, args.chunk), keep.shape[0] if case != "strict_band" else 1,
                                   None, s, s, device="cuda")

    def by_hand(q, k, v):
        o = flex_attention(heads(q, h, d), heads(k, hkv, d), heads(v, hkv, d), block_mask=block_mask,
                           enable_gqa=True)
        return o.transpose(1, 2).reshape(q.shape)

    return {"inductor, dense mask": (written, "inductor", None),
            "inductor, flex by hand": (by_hand, "inductor", None),
            "attnopt (flex)": (written, "attnopt", plan.FLEX_DEVICES),
            "attnopt (dense mask)": (written, "attnopt", frozenset())}


def run(case: str, args) -> list[dict]:
    q, k, v, grad = projections(args)
    keep = torch.ones(args.batch, args.seq, dtype=torch.bool, device="cuda")
    keep[-1, 3 * args.seq // 4:] = False  # the last row right-padded by a quarter
    table = variants(case, args, keep)
    with torch.no_grad():
        ref = table["inductor, dense mask"][0](*(t.float() for t in (q, k, v))).cpu()
    rows, policy = [], plan.FLEX_DEVICES
    for name, (fn, backend, devices) in table.items():
        torch._dynamo.reset()
        plan.FLEX_DEVICES = policy if devices is None else devices
        try:
            compiled = torch.compile(fn, backend=backend)
            compiled(q, k, v)  # compiled here, under this variant's policy
            row, = measure_fwd_bwd({name: compiled}, q, k, v, grad, ref, args.iters)
            if "flex" in name and row["kernel"] == "(torch SDPA)":  # no attnopt op ran: flex did
                row["kernel"] = "flex_attention (Inductor)"
            rows.append(row)
        finally:
            plan.FLEX_DEVICES = policy
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=["strict_band", "chunk_padding"])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("flex_target.py times CUDA kernels; no CUDA device is visible")
    env, results = environment(), {}
    for seq in args.seq:
        args.seq = seq
        rows = run(args.case, args)
        results[seq] = rows
        print_fwd_bwd(f"{args.case}, B={args.batch} S={seq} {args.heads}/{args.kv_heads} heads D={args.head_dim}"
                      + (f" chunk {args.chunk}" if args.case == "chunk_padding" else ""), rows, env,
                      baseline="inductor, dense mask")
    write_json(f"flex_target_{args.case}", {"env": env, "results": results})


if __name__ == "__main__":
    main()
