"""Split-KV decoding in Triton: one query per batch over a partly filled KV cache.

torch's FlashAttention-2 also splits a single query's keys across SMs, but it sizes its splits by
the cache's length, not by the keys each batch holds, and a compiled graph cannot tell it the
filled length without reading it on the host. Here each (split, batch, kv head) program reads only
the keys below its batch's length (a split past it writes an empty partial result at once), the
GQA group's query heads share every K/V block loaded (they are the rows of one ``tl.dot``), and a
second kernel merges the splits by their log-sum-exp. Both are captured by CUDA graphs like any
kernel. Forward only: a backward (a decode step under autograd) goes through the math kernel with
the same key lengths, as FLASH's does.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ..spec import AttnSpec
from .base import Grads, Kernel, empty_rng
from .math import backward_with_key_lengths

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch comes without Triton: the kernel reports itself unavailable
    triton = None

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 128
# Launch configuration and split size (bench/decode_kernel.py, H200, bf16, D=128, group 4)
BLOCK_N, NUM_WARPS, NUM_STAGES = 64, 4, 3
CTAS_PER_SM = 8  # splits are sized so that a full cache spreads over about this many programs per SM

if triton is not None:
    @triton.jit
    def _split_kernel(Q, K, V, Lens, Out, Lse,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                      heads_kv, splits, split_len, left, scale_log2,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                      DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr, WINDOW: tl.constexpr):
        split = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads_kv
        h = bh % heads_kv
        length = tl.load(Lens + b).to(tl.int32)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, length)
        if WINDOW:  # the query sits at position length - 1 and sees ``left`` keys before it
            lo = tl.maximum(lo, length - 1 - left)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        dv = tl.arange(0, DV_PAD)
        q = tl.load(Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                    mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
        n = tl.arange(0, BLOCK)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        for start in range(lo, hi, BLOCK):
            cols = start + n
            valid = cols < hi
            k = tl.load(k_base + cols[:, None] * stride_ks + d[None, :],
                        mask=valid[:, None] & (d[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vs + dv[None, :],
                        mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        found = l > 0
        out = tl.where(found[:, None], acc / tl.where(found, l, 1.0)[:, None], 0.0)
        lse = tl.where(found, m + tl.log2(tl.where(found, l, 1.0)), float("-inf"))  # base 2
        row = (b * heads_kv * G + h * G + g) * splits + split
        tl.store(Out + row[:, None] * DV + dv[None, :], out, mask=(g[:, None] < G) & (dv[None, :] < DV))
        tl.store(Lse + row, lse, mask=g < G)

    @triton.jit
    def _combine_kernel(Parts, PartLse, Out, Lse, splits, DV: tl.constexpr, DV_PAD: tl.constexpr,
                        SPLITS_PAD: tl.constexpr, LOG2E: tl.constexpr):
        row = tl.program_id(0)  # b * Hq + hq
        s = tl.arange(0, SPLITS_PAD)
        dv = tl.arange(0, DV_PAD)
        lse = tl.load(PartLse + row * splits + s, mask=s < splits, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp2(lse - top)
        total = tl.sum(w, 0)
        parts = tl.load(Parts + (row * splits + s)[:, None] * DV + dv[None, :],
                        mask=(s[:, None] < splits) & (dv[None, :] < DV), other=0.0)
        out = tl.sum(w[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
        tl.store(Out + row * DV + dv, out.to(Out.dtype.element_ty), mask=dv < DV)
        tl.store(Lse + row, tl.where(total > 0, (top + tl.log2(total)) / LOG2E, float("-inf")))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_len(batch: int, heads_kv: int, cache_len: int, sms: int, block: int = BLOCK_N,
              ctas_per_sm: int = CTAS_PER_SM) -> int:
    """Keys per split: a power of two, at least one block, such that a full cache gives about
    ``ctas_per_sm`` programs per SM (a half-filled one half as many) and at most ``_MAX_SPLITS``."""
    want = max(cache_len * batch * heads_kv // (ctas_per_sm * sms), block, -(-cache_len // _MAX_SPLITS))
    return 1 << (want - 1).bit_length()


def decode(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float, left: int = -1,
           block: int = BLOCK_N, warps: int = NUM_WARPS, stages: int = NUM_STAGES,
           keys_per_split: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Attention of q [B, Hq, 1, D] over the first ``lengths[b]`` keys of k, v [B, Hkv, S, D(v)]
    (a ``left`` window keeps the last left + 1 of them). Returns out [B, Hq, 1, Dv] in q's dtype
    and the log-sum-exp [B, Hq, 1] in float32 (-inf and a zero row where a batch has no key)."""
    b, hq, _, d = q.shape
    _, hkv, cache_len, dv = v.shape
    group = hq // hkv
    per_split = keys_per_split or split_len(b, hkv, cache_len, _sm_count(q.device.index or 0), block)
    splits = -(-cache_len // per_split)
    parts = torch.empty(b * hq * splits, dv, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(b * hq * splits, device=q.device, dtype=torch.float32)
    pad = lambda n: max(16, triton.next_power_of_2(n))
    _split_kernel[(splits, b * hkv)](
        q, k, v, lengths, parts, part_lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), hkv, splits, per_split, left, scale * _LOG2E,
        G=group, G_PAD=pad(group), D=d, D_PAD=pad(d), DV=dv, DV_PAD=pad(dv), BLOCK=block, WINDOW=left >= 0,
        num_warps=warps, num_stages=stages)
    out = torch.empty(b, hq, 1, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, hq, 1, device=q.device, dtype=torch.float32)
    _combine_kernel[(b * hq,)](parts, part_lse, out, lse, splits, DV=dv, DV_PAD=pad(dv),
                               SPLITS_PAD=triton.next_power_of_2(splits), LOG2E=_LOG2E, num_warps=4)
    return out, lse


class DecodeKernel(Kernel):
    name = "decode"
    seqused_native = True
    sinks = "lse"

    def available(self, device):
        if device.type != "cuda":
            return "runs on CUDA only"
        if triton is None:
            return "needs Triton"
        major, _ = torch.cuda.get_device_capability(device)
        return None if major >= 8 else "needs sm80 or newer"

    def unsupported(self, spec: AttnSpec) -> Optional[str]:
        if spec.seqlen_q != 1 or not spec.seqused or spec.varlen:
            return "one query per batch over per-batch key lengths (a KV cache) only"
        if spec.dtype not in (torch.float16, torch.bfloat16):
            return "needs float16 or bfloat16"
        if spec.softcap or spec.dropout_p > 0 or spec.has_mask:
            return "no softcapping, dropout or explicit mask"
        if spec.dim_qk > 256 or spec.dim_v > 256:
            return "head dims up to 256"
        if spec.has_band and not spec.band_is_bottom_right():
            return "the query sits after its batch's keys (bottom-right band) only"
        if spec.window[1] > 0:
            return "no keys right of the query exist in a cache: windows end at the diagonal"
        if spec.heads_q // spec.heads_kv > 64:
            return "query heads per key/value head up to 64"
        return None

    def forward(self, spec, q, k, v, mask, seqused_k=None):
        out, lse = decode(q, k, v, seqused_k, spec.scale, spec.window[0])
        return out, lse.to(spec.lse_dtype), empty_rng(q.device)

    def backward(self, spec, grad_out, q, k, v, out, lse, rng_state, mask, seqused_k=None) -> Grads:
        return backward_with_key_lengths(spec, grad_out, q, k, v, out, lse, seqused_k)


__all__ = ["DecodeKernel", "decode", "split_len"]
