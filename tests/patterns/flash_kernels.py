"""What flash-attn style calls compute, and CPU stand-ins for flash-attn's ops.

``reference_attention`` is the float64 reference: per sequence, GQA (query head h reads key/value
head h // R), causal and windows around the diagonal the call aligns (flash-attn: bottom right),
softcapping, rows that keep no key giving zeros.

flash-attn's kernels are CUDA builds. The tests declare its public ops here under the same
namespaces, names and schemas (``flash_attn::_flash_attn_forward`` and friends from
flash_attn/flash_attn_interface.py; ``flash_attn_3::...`` from hopper/flash_attn_interface.py),
computing ``reference_attention`` on CPU, and wrap them in autograd.Functions written as
flash-attn writes ``flash_attn_func`` and ``flash_attn_varlen_func``, so that graphs hold what they
hold with the real package. Where the real package is loaded, its ops own those names and
``DECLARED`` is False.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _probabilities(q: Tensor, k: Tensor, causal: bool, window: Sequence[int], align: str, scale: float,
                   softcap: float) -> tuple[Tensor, Tensor]:
    """(softmax of the [B, H, Sq, Sk] scores over the band around the ``align``ed diagonal, rows that
    keep no key zero; tanh of the softcapped scores, for the backward)."""
    s = q @ k.transpose(-2, -1) * scale
    capped = torch.tanh(s / softcap) if softcap else s
    if softcap:
        s = softcap * capped
    sq, sk = s.shape[-2:]
    i = torch.arange(sq)[:, None] + (sk - sq if align == "bottom_right" else 0)
    j = torch.arange(sk)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    left, right = window
    right = 0 if causal else right
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    rows = keep.any(-1, keepdim=True)
    s = torch.where(rows, s.masked_fill(~keep, float("-inf")), 0.0)
    return torch.where(rows, torch.softmax(s, -1), 0.0), capped


def _dense(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: Sequence[int], align: str, scale: float,
           softcap: float) -> Tensor:
    """[B, H, S, D] attention, GQA by repeating key/value heads (differentiable)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return _probabilities(q, k, causal, window, align, scale, softcap)[0] @ v


def _dense_grads(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool, window: Sequence[int], align: str,
                 scale: float, softcap: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of ``_dense`` written out (a kernel has no autograd to call)."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    p, capped = _probabilities(q, kr, causal, window, align, scale, softcap)
    dv = p.transpose(-2, -1) @ dout
    dp = dout @ vr.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    if softcap:
        ds = ds * (1 - capped ** 2)
    dq, dk = ds @ kr * scale, ds.transpose(-2, -1) @ q * scale
    fold = (lambda t: t.unflatten(1, (k.shape[1], group)).sum(2))
    return dq, fold(dk), fold(dv)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, layout: str = "bshd", causal: bool = False,
                        window: Sequence[int] = (-1, -1), align: str = "bottom_right", scale: Optional[float] = None,
                        softcap: float = 0.0, cu_seqlens_q: Optional[Tensor] = None,
                        cu_seqlens_k: Optional[Tensor] = None) -> Tensor:
    """Attention as a flash-attn style call defines it, in the call's layout ("bhsd", "bshd" or
    packed "thd" with offsets), differentiable."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if layout == "bhsd":
        return _dense(q, k, v, causal, window, align, scale, softcap)
    if layout == "bshd":
        return _dense(*(t.transpose(1, 2) for t in (q, k, v)), causal, window, align, scale, softcap).transpose(1, 2)
    out = q.new_zeros(*q.shape[:2], v.shape[-1])
    offs_q, offs_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = []
    for i in range(len(offs_q) - 1):
        sq, sk = slice(offs_q[i], offs_q[i + 1]), slice(offs_k[i], offs_k[i + 1])
        if sq.stop > sq.start:
            o = _dense(*(t[s].transpose(0, 1)[None] for t, s in ((q, sq), (k, sk), (v, sk))), causal, window, align,
                       scale, softcap)
            pieces.append((sq, o[0].transpose(0, 1)))
    for sq, o in pieces:
        out = out.index_copy(0, torch.arange(sq.start, sq.stop), o)
    return out


def reference_grads(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, *, layout: str = "bshd", causal: bool = False,
                    window: Sequence[int] = (-1, -1), align: str = "bottom_right", scale: Optional[float] = None,
                    softcap: float = 0.0, cu_seqlens_q: Optional[Tensor] = None,
                    cu_seqlens_k: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of ``reference_attention`` for the output gradient ``dout``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    band = (causal, window, align, scale, softcap)
    if layout == "bhsd":
        return _dense_grads(dout, q, k, v, *band)
    if layout == "bshd":
        grads = _dense_grads(*(t.transpose(1, 2) for t in (dout, q, k, v)), *band)
        return tuple(g.transpose(1, 2) for g in grads)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    offs_q, offs_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(offs_q) - 1):
        sq, sk = slice(offs_q[i], offs_q[i + 1]), slice(offs_k[i], offs_k[i + 1])
        if sq.stop > sq.start:
            grads = _dense_grads(*(t[s].transpose(0, 1)[None] for t, s in ((dout, sq), (q, sq), (k, sk), (v, sk))),
                                 *band)
            for buf, g, s in zip((dq, dk, dv), grads, (sq, sk, sk)):
                buf[s] = g[0].transpose(0, 1)
    return dq, dk, dv


def _lse(q: Tensor) -> Tensor:
    return q.new_zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


DECLARED = not hasattr(torch.ops.flash_attn, "_flash_attn_forward")

if DECLARED:
    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=(), device_types="cpu")
    def _flash_attn_forward(
            q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float, causal: bool,
            window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Optional[Tensor],
            return_softmax: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = reference_attention(q, k, v, causal=causal, window=(window_size_left, window_size_right),
                                  scale=softmax_scale, softcap=softcap).contiguous()
        return out, _lse(q), q.new_empty(0), q.new_zeros(2, dtype=torch.int64)

    @_flash_attn_forward.register_fake
    def _(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
          return_softmax):
        return q.new_empty(*q.shape[:-1], v.shape[-1]), _lse(q), q.new_empty(0), q.new_empty(2, dtype=torch.int64)

    @torch.library.custom_op("flash_attn::_flash_attn_varlen_forward", mutates_args=(), device_types="cpu")
    def _flash_attn_varlen_forward(
            q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
            max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int = -1,
            window_size_right: int = -1, softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
            return_softmax: bool = False, block_table: Optional[Tensor] = None, leftpad_k: Optional[Tensor] = None,
            seqused_k: Optional[Tensor] = None, zero_tensors: bool = False,
            num_splits: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = reference_attention(q, k, v, layout="thd", causal=causal, window=(window_size_left, window_size_right),
                                  scale=softmax_scale, softcap=softcap, cu_seqlens_q=cu_seqlens_q,
                                  cu_seqlens_k=cu_seqlens_k)
        return out, q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32), q.new_empty(0), \
            q.new_zeros(2, dtype=torch.int64)

    @_flash_attn_varlen_forward.register_fake
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
          window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
          block_table=None, leftpad_k=None, seqused_k=None, zero_tensors=False, num_splits=0):
        return (q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32),
                q.new_empty(0), q.new_empty(2, dtype=torch.int64))

    @torch.library.custom_op("flash_attn::_flash_attn_backward", mutates_args=("dq", "dk", "dv"), device_types="cpu")
    def _flash_attn_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                             dq: Optional[Tensor], dk: Optional[Tensor], dv: Optional[Tensor], dropout_p: float,
                             softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
                             softcap: float, alibi_slopes: Optional[Tensor], deterministic: bool,
                             rng_state: Optional[Tensor] = None) -> Tensor:
        grads = reference_grads(dout, q, k, v, causal=causal, window=(window_size_left, window_size_right),
                                scale=softmax_scale, softcap=softcap)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return softmax_lse.new_empty(0)

    @_flash_attn_backward.register_fake
    def _(dout, q, k, v, out, softmax_lse, *rest, **kw):
        return softmax_lse.new_empty(0)

    @torch.library.custom_op("flash_attn::_flash_attn_varlen_backward", mutates_args=("dq", "dk", "dv"),
                             device_types="cpu")
    def _flash_attn_varlen_backward(
            dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor, dq: Optional[Tensor],
            dk: Optional[Tensor], dv: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
            max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int,
            window_size_right: int, softcap: float, alibi_slopes: Optional[Tensor], deterministic: bool,
            rng_state: Optional[Tensor] = None, zero_tensors: bool = False) -> Tensor:
        grads = reference_grads(dout, q, k, v, layout="thd", causal=causal,
                                window=(window_size_left, window_size_right), scale=softmax_scale, softcap=softcap,
                                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return softmax_lse.new_empty(0)

    @_flash_attn_varlen_backward.register_fake
    def _(dout, q, k, v, out, softmax_lse, *rest, **kw):
        return softmax_lse.new_empty(0)

    @torch.library.custom_op("flash_attn_3::_flash_attn_forward", mutates_args=(), device_types="cpu")
    def _flash_attn_3_forward(
            q: Tensor, k: Tensor, v: Tensor, k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None,
            qv: Optional[Tensor] = None, out_: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None,
            cu_seqlens_k: Optional[Tensor] = None, cu_seqlens_k_new: Optional[Tensor] = None,
            seqused_q: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
            max_seqlen_k: Optional[int] = None, page_table: Optional[Tensor] = None,
            kv_batch_idx: Optional[Tensor] = None, leftpad_k: Optional[Tensor] = None,
            rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
            seqlens_rotary: Optional[Tensor] = None, q_descale: Optional[Tensor] = None,
            k_descale: Optional[Tensor] = None, v_descale: Optional[Tensor] = None,
            softmax_scale: Optional[float] = None, causal: bool = False, window_size_left: int = -1,
            window_size_right: int = -1, attention_chunk: int = 0, softcap: float = 0.0,
            rotary_interleaved: bool = True, scheduler_metadata: Optional[Tensor] = None, num_splits: int = 1,
            pack_gqa: Optional[bool] = None, sm_margin: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if k_new is not None or seqused_k is not None:
            raise NotImplementedError("the CPU stand-in computes no cache updates or key lengths")
        layout = "bshd" if cu_seqlens_q is None else "thd"
        out = reference_attention(q, k, v, layout=layout, causal=causal, window=(window_size_left, window_size_right),
                                  scale=softmax_scale, softcap=softcap, cu_seqlens_q=cu_seqlens_q,
                                  cu_seqlens_k=cu_seqlens_k).contiguous()
        return out, _lse(q) if layout == "bshd" else q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32), \
            q.new_empty(0), q.new_empty(0)

    @_flash_attn_3_forward.register_fake
    def _(q, k, v, *rest, **kw):
        lse = _lse(q) if q.dim() == 4 else q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
        return q.new_empty(*q.shape[:-1], v.shape[-1]), lse, q.new_empty(0), q.new_empty(0)

    @torch.library.custom_op("flash_attn_3::_flash_attn_backward", mutates_args=("dq", "dk", "dv"),
                             device_types="cpu")
    def _flash_attn_3_backward(
            dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
            cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
            sequed_q: Optional[Tensor] = None, sequed_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
            max_seqlen_k: Optional[int] = None, dq: Optional[Tensor] = None, dk: Optional[Tensor] = None,
            dv: Optional[Tensor] = None, softmax_scale: Optional[float] = None, is_causal: bool = False,
            window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
            deterministic: bool = False, sm_margin: int = 0) -> Tensor:
        layout = "bshd" if cu_seqlens_q is None else "thd"
        grads = reference_grads(dout, q, k, v, layout=layout, causal=is_causal,
                                window=(window_size_left, window_size_right), scale=softmax_scale, softcap=softcap,
                                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return softmax_lse.new_empty(0)

    @_flash_attn_3_backward.register_fake
    def _(dout, q, k, v, out, softmax_lse, *rest, **kw):
        return softmax_lse.new_empty(0)

    def _fa3_setup_context(ctx, inputs, output):  # as hopper/flash_attn_interface.py registers it
        q, k, v = inputs[:3]
        out, softmax_lse, _, _ = output
        ctx.save_for_backward(q, k, v, out, softmax_lse)
        ctx.softmax_scale, ctx.causal = inputs[-11], inputs[-10]
        ctx.window_size, ctx.softcap = [inputs[-9], inputs[-8]], inputs[-6]

    def _fa3_backward(ctx, dout, *grads):
        q, k, v, out, softmax_lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        torch.ops.flash_attn_3._flash_attn_backward(
            dout, q, k, v, out, softmax_lse, None, None, None, None, None, None, dq, dk, dv, ctx.softmax_scale,
            ctx.causal, ctx.window_size[0], ctx.window_size[1], ctx.softcap, False, 0)
        return dq, dk, dv, *((None,) * 32)

    _flash_attn_3_forward.register_autograd(_fa3_backward, setup_context=_fa3_setup_context)


class FlashAttnFunc(torch.autograd.Function):
    """flash-attn 2's ``FlashAttnFunc``: the forward op, and its backward op for the gradient."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                return_softmax, is_grad_enabled):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** (-0.5)
        head_size_og = q.size(3)
        if head_size_og % 8 != 0:
            q, k, v = (torch.nn.functional.pad(t, [0, 8 - head_size_og % 8]) for t in (q, k, v))
        out_padded, softmax_lse, S_dmask, rng_state = torch.ops.flash_attn._flash_attn_forward(
            q, k, v, dropout_p, softmax_scale, causal=causal, window_size_left=window_size[0],
            window_size_right=window_size[1], softcap=softcap, alibi_slopes=alibi_slopes,
            return_softmax=return_softmax and dropout_p > 0)
        ctx.save_for_backward(q, k, v, out_padded, softmax_lse, rng_state)
        ctx.dropout_p, ctx.softmax_scale, ctx.causal, ctx.window_size = dropout_p, softmax_scale, causal, window_size
        ctx.softcap, ctx.alibi_slopes, ctx.deterministic = softcap, alibi_slopes, deterministic
        out = out_padded[..., :head_size_og]
        return out if not return_softmax else (out, softmax_lse, S_dmask)

    @staticmethod
    def backward(ctx, dout, *args):
        q, k, v, out, softmax_lse, rng_state = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        head_size_og = dout.size(3)
        dout_padded = dout
        if head_size_og % 8 != 0:
            dout_padded = torch.nn.functional.pad(dout, [0, 8 - head_size_og % 8])
        torch.ops.flash_attn._flash_attn_backward(
            dout_padded, q, k, v, out, softmax_lse, dq, dk, dv, ctx.dropout_p, ctx.softmax_scale, ctx.causal,
            ctx.window_size[0], ctx.window_size[1], ctx.softcap, ctx.alibi_slopes, ctx.deterministic,
            rng_state=rng_state)
        dq, dk, dv = (t[..., : dout.shape[-1]] for t in (dq, dk, dv))
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


class FlashAttnVarlenFunc(torch.autograd.Function):
    """flash-attn 2's ``FlashAttnVarlenFunc``."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                causal, window_size, softcap, alibi_slopes, deterministic, return_softmax, block_table,
                is_grad_enabled):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** (-0.5)
        head_size_og = q.size(2)
        if head_size_og % 8 != 0:
            q, k, v = (torch.nn.functional.pad(t, [0, 8 - head_size_og % 8]) for t in (q, k, v))
        out_padded, softmax_lse, S_dmask, rng_state = torch.ops.flash_attn._flash_attn_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal=causal,
            window_size_left=window_size[0], window_size_right=window_size[1], softcap=softcap,
            alibi_slopes=alibi_slopes, return_softmax=return_softmax and dropout_p > 0, block_table=block_table)
        ctx.save_for_backward(q, k, v, out_padded, softmax_lse, cu_seqlens_q, cu_seqlens_k, rng_state)
        ctx.dropout_p, ctx.max_seqlen_q, ctx.max_seqlen_k = dropout_p, max_seqlen_q, max_seqlen_k
        ctx.softmax_scale, ctx.causal, ctx.window_size, ctx.softcap = softmax_scale, causal, window_size, softcap
        ctx.alibi_slopes, ctx.deterministic = alibi_slopes, deterministic
        out = out_padded[..., :head_size_og]
        return out if not return_softmax else (out, softmax_lse, S_dmask)

    @staticmethod
    def backward(ctx, dout, *args):
        q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, rng_state = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        head_size_og = dout.size(2)
        dout_padded = dout
        if head_size_og % 8 != 0:
            dout_padded = torch.nn.functional.pad(dout, [0, 8 - head_size_og % 8])
        torch.ops.flash_attn._flash_attn_varlen_backward(
            dout_padded, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q,
            ctx.max_seqlen_k, ctx.dropout_p, ctx.softmax_scale, ctx.causal, ctx.window_size[0], ctx.window_size[1],
            ctx.softcap, ctx.alibi_slopes, ctx.deterministic, rng_state=rng_state)
        dq, dk, dv = (t[..., : dout.shape[-1]] for t in (dq, dk, dv))
        return (dq, dk, dv, *((None,) * 14))


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's ``flash_attn_func``: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]."""
    return FlashAttnFunc.apply(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                               deterministic, return_attn_probs, torch.is_grad_enabled())


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2's ``flash_attn_varlen_func``: packed q [Tq, Hq, D], k/v [Tk, Hkv, D]."""
    return FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                     softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                     return_attn_probs, block_table, torch.is_grad_enabled())


def flash_attn_3_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """flash-attn 3's ``flash_attn_func`` reduced to the arguments used here: it calls the op,
    whose registered autograd runs the backward op."""
    return torch.ops.flash_attn_3._flash_attn_forward(
        q, k, v, softmax_scale=softmax_scale, causal=causal, window_size_left=window_size[0],
        window_size_right=window_size[1], softcap=softcap)[0]
