"""transformers' compiled attention: in-graph mask + repeat_kv, forward+backward.

Under torch.compile, transformers builds an explicit boolean mask (causal AND same document,
from position ids) and hands SDPA ``attn_mask`` with ``is_causal=False``; K/V go through
repeat_kv. This times that core, the mask built by transformers' own ``create_causal_mask``,
against the same attention written with ``is_causal=True, enable_gqa=True``.

    python bench/masked_attention.py                 # B=2 S=4096 Hq=32 Hkv=8 D=128 bf16
    python bench/masked_attention.py --documents 4   # each row packs 4 documents (position ids restart)

With ``--documents N`` the mask is causal AND same document; the reference runs the documents as
batches of their own with ``is_causal`` (the best form when all documents have one length).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_core import best_form  # noqa: E402
from attnopt.demo_model import repeat_kv  # noqa: E402
from common import add_shape_args, environment, measure_fwd_bwd, print_fwd_bwd, projections, write_json  # noqa: E402


def transformers_core(q, k, v, config, position_ids=None):
    b, s, _ = q.shape
    h, hkv = config.num_attention_heads, config.num_key_value_heads
    d = q.shape[-1] // h
    if position_ids is None:  # as LlamaModel does: from the cache positions (an arange in the graph)
        position_ids = torch.arange(s, device=q.device).unsqueeze(0)
    mask = create_causal_mask(config=config, inputs_embeds=q, attention_mask=None, past_key_values=None,
                              position_ids=position_ids)
    q = q.view(b, s, h, d).transpose(1, 2)
    k = repeat_kv(k.view(b, s, hkv, d).transpose(1, 2), h // hkv)
    v = repeat_kv(v.view(b, s, hkv, d).transpose(1, 2), h // hkv)
    # sdpa_attention_forward: is_causal only when no mask was built (eager skips building it)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return o.transpose(1, 2).contiguous().reshape(b, s, -1)


def documents_as_batches(q, k, v, heads, kv_heads, documents):
    """Equal-length documents as batches of their own: the best form of the packed mask."""
    b, s, _ = q.shape
    q, k, v = (t.reshape(b * documents, s // documents, -1) for t in (q, k, v))
    return best_form(q, k, v, heads, kv_heads).reshape(b, s, -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--documents", type=int, default=1, help="documents packed in each row")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("masked_attention.py times CUDA kernels; no CUDA device is visible")
    b, s, h, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    config = LlamaConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=hkv)
    config._attn_implementation = "sdpa"
    q, k, v, grad = projections(args)
    n = args.documents
    # a packed batch comes with its position ids, restarting at every document
    positions = None if n == 1 else (torch.arange(s, device="cuda") % (s // n)).expand(b, -1)
    core = lambda *t: transformers_core(*t, config, positions)
    best = (lambda *t: best_form(*t, h, hkv)) if n == 1 else (lambda *t: documents_as_batches(*t, h, hkv, n))
    variants = {
        "inductor": torch.compile(core),
        "attnopt": torch.compile(core, backend="attnopt"),
        "is_causal + enable_gqa (inductor)" if n == 1 else "documents as batches (inductor)": torch.compile(best),
    }
    with torch.no_grad():
        ref = best(q.float(), k.float(), v.float()).cpu()
    rows = measure_fwd_bwd(variants, q, k, v, grad, ref, args.iters)
    env = environment()
    print_fwd_bwd(f"transformers attention with in-graph mask, fwd+bwd, B={b} S={s} Hq={h} Hkv={hkv} D={d} bf16, "
                  f"{n} document(s) per row", rows, env, rows[-1]["variant"])
    write_json("masked_attention" if n == 1 else f"masked_attention_{n}docs", {"env": env, "shape": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
