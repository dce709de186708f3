"""Attention as the seed systems call it, forward+backward: Inductor on the code as written vs
attnopt. One process, every case, so that one GPU run gives the whole table.

    python bench/seed_systems.py                  # all cases on CUDA, bf16
    python bench/seed_systems.py --case padded    # one of: varlen, flex, chunks, padded
    python bench/seed_systems.py --cpu-check      # tiny shapes on CPU: every site lowered, numerics

- ``varlen``: torchtitan's varlen backend: ``repeat_kv`` on [B, S, Hkv, D], transposes, packing to
  [B*S, H, D] and ``torch.nn.attention.varlen.varlen_attn`` with the documents' offsets;
- ``flex``: torchtitan's default, ``flex_attention`` with a BlockMask of causal AND same document;
- ``chunks``: Llama 4's chunked attention on a packed batch, the mask built by transformers'
  ``create_chunked_causal_mask`` from position ids that restart;
- ``padded``: transformers' causal mask with a left-padded ``attention_mask``.

B=1 S=8192 (varlen, flex, chunks: 4 documents, chunk 2048) or B=2 S=4096 (padded: a quarter of row
0 padded), Hq=32 Hkv=8 D=128.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, measure_fwd_bwd, print_fwd_bwd, write_json  # noqa: E402


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torchtitan's repeat_kv on [B, S, Hkv, D]."""
    b, s, h, d = x.shape
    return x[:, :, :, None, :].expand(b, s, h, n_rep, d).reshape(b, s, h * n_rep, d)


def varlen_core(q, k, v, heads, kv_heads, cu, longest):
    from torch.nn.attention.varlen import varlen_attn

    b, s, _ = q.shape
    d = q.shape[-1] // heads
    xq = q.view(b, s, heads, d).transpose(1, 2)
    xk = _repeat_kv(k.view(b, s, kv_heads, d), heads // kv_heads).transpose(1, 2)
    xv = _repeat_kv(v.view(b, s, kv_heads, d), heads // kv_heads).transpose(1, 2)
    packed = [t.transpose(1, 2).reshape(-1, heads, d) for t in (xq, xk, xv)]
    causal = {"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters \
        else {"is_causal": True}
    o = varlen_attn(*packed, cu, cu, longest, longest, **causal)
    return o.view(b, s, heads * d)


def flex_core(q, k, v, heads, kv_heads, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    b, s, _ = q.shape
    d = q.shape[-1] // heads
    xq, xk, xv = (t.view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
    o = flex_attention(xq, xk, xv, block_mask=block_mask, enable_gqa=True)
    return o.transpose(1, 2).reshape(b, s, -1)


def transformers_core(q, k, v, config, make_mask, **mask_kwargs):
    """transformers' sdpa path: the mask from its mask function, repeat_kv, SDPA."""
    from attnopt.demo_model import repeat_kv

    b, s, _ = q.shape
    h, hkv = config.num_attention_heads, config.num_key_value_heads
    d = q.shape[-1] // h
    cache = "cache" if "cache" in inspect.signature(make_mask).parameters else "past_key_values"
    mask = make_mask(config=config, inputs_embeds=q, **{cache: None}, **mask_kwargs)
    xq = q.view(b, s, h, d).transpose(1, 2)
    xk = repeat_kv(k.view(b, s, hkv, d).transpose(1, 2), h // hkv)
    xv = repeat_kv(v.view(b, s, hkv, d).transpose(1, 2), h // hkv)
    o = F.scaled_dot_product_attention(xq, xk, xv, attn_mask=mask, is_causal=mask is None)
    return o.transpose(1, 2).contiguous().reshape(b, s, -1)


def _documents(b: int, s: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(position ids [B, S] restarting at n equal documents, int32 offsets of all of them)."""
    positions = (torch.arange(s, device=device) % (s // n)).expand(b, -1)
    cu = torch.arange(0, b * s + 1, s // n, device=device, dtype=torch.int32)
    return positions, cu


def _reference(q, k, v, heads, kv_heads, keep):
    """Float32 attention under an explicit [B or 1, 1, S, S] keep-mask, for the error column."""
    b, s, _ = q.shape
    d = q.shape[-1] // heads
    xq, xk, xv = (t.float().view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(xq, xk, xv, attn_mask=keep, enable_gqa=True)
    return o.transpose(1, 2).reshape(b, s, -1)


def case(name: str, args, device, dtype):
    """(core, reference output, shape note) for one case."""
    import transformers as T
    from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask

    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    b, s = (2, args.seq // 2) if name == "padded" else (1, args.seq)
    torch.manual_seed(0)
    mk = lambda n: torch.randn(b, s, n * d, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = mk(h), mk(hkv), mk(hkv)
    grad = torch.randn(b, s, h * d, device=device, dtype=dtype)
    i = torch.arange(s, device=device)
    causal = i[None, :] <= i[:, None]
    positions, cu = _documents(b, s, args.documents, device)
    doc = torch.div(i, s // args.documents, rounding_mode="floor")
    same_doc = (doc[None, :] == doc[:, None])[None, None]
    if name == "varlen":
        core = lambda *t: varlen_core(*t, h, hkv, cu, s // args.documents)  # noqa: E731
        keep = same_doc & causal
    elif name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def document_causal(batch, head, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(document_causal, None, None, s, s, device=device)
        core = lambda *t: flex_core(*t, h, hkv, block_mask)  # noqa: E731
        keep = same_doc & causal
    elif name == "chunks":
        config = T.Llama4TextConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=hkv, head_dim=d,
                                    attention_chunk_size=args.chunk)
        config._attn_implementation = "sdpa"
        core = lambda *t: transformers_core(*t, config, create_chunked_causal_mask,  # noqa: E731
                                            attention_mask=None, position_ids=positions)
        pos = i % (s // args.documents)
        keep = same_doc & causal & (torch.div(pos, args.chunk, rounding_mode="floor")[None, :]
                                    == torch.div(pos, args.chunk, rounding_mode="floor")[:, None])[None, None]
    else:
        config = T.LlamaConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=hkv)
        config._attn_implementation = "sdpa"
        padding = torch.ones(b, s, dtype=torch.long, device=device)
        padding[0, : s // 4] = 0
        core = lambda *t: transformers_core(*t, config, create_causal_mask, attention_mask=padding,  # noqa: E731
                                            position_ids=None)
        keep = causal[None, None] & padding.bool()[:, None, None, :]
        keep = keep | ~keep.any(-1, keepdim=True)  # rows that keep no key: compared where they keep one
    with torch.no_grad():
        ref = _reference(q, k, v, h, hkv, keep)
        if name == "padded":
            ref[0, : s // 4] = 0  # SDPA's zeros for the padded queries
    return core, (q, k, v, grad), ref, f"B={b} S={s} Hq={h} Hkv={hkv} D={d}"


def cpu_check(args) -> int:
    """Tiny shapes on CPU: attnopt lowers every site of each case and matches the reference."""
    import attnopt

    args.seq, args.heads, args.kv_heads, args.head_dim, args.chunk = 64, 4, 2, 8, 8
    failures = 0
    for name in ("varlen", "chunks", "padded"):  # flex needs Inductor's kernels to run its backward
        core, (q, k, v, _), ref, shape = case(name, args, "cpu", torch.float32)
        graphs = []
        torch._dynamo.reset()
        compiled = torch.compile(core, backend=attnopt.backend("aot_eager", on_result=lambda b, a, r: graphs.append(r)))
        with torch.no_grad():
            out = compiled(q, k, v)
        err = float((out - ref).norm() / ref.norm())
        sites = [s for r in graphs for s in r.sites]
        ok = sites and all(s.status == "lowered" for s in sites) and err < 1e-4
        failures += not ok
        print(f"{name:8s} {shape}: {[(s.status, s.mask_action) for s in sites]} rel err {err:.1e} "
              f"{'ok' if ok else 'FAIL'}")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=("varlen", "flex", "chunks", "padded", "all"), default="all")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cpu-check", action="store_true", help="tiny shapes on CPU: sites lowered, numerics")
    args = p.parse_args()
    if args.cpu_check:
        sys.exit(cpu_check(args))
    if not torch.cuda.is_available():
        sys.exit("seed_systems.py times CUDA kernels; no CUDA device is visible (--cpu-check runs on CPU)")
    env = environment()
    results = {}
    for name in (("varlen", "flex", "chunks", "padded") if args.case == "all" else (args.case,)):
        core, (q, k, v, grad), ref, shape = case(name, args, "cuda", torch.bfloat16)
        variants = {"inductor": torch.compile(core), "attnopt": torch.compile(core, backend="attnopt")}
        rows = measure_fwd_bwd(variants, q, k, v, grad, ref.cpu(), args.iters)
        print_fwd_bwd(f"{name}: fwd+bwd, {shape}, bf16", rows, env, "inductor")
        results[name] = {"shape": shape, "rows": rows}
        torch._dynamo.reset()
    write_json("seed_systems", {"env": env, "args": vars(args), "cases": results})


if __name__ == "__main__":
    main()
