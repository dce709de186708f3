"""torch's fused CUDA kernels, called through their aten ops so that the op keeps the
log-sum-exp and RNG state and runs the matching backward without recomputing the forward.

- cuDNN: GQA, q/k head dim != v head dim, any strides with a unit-stride head dim, additive
  masks and dropout; top-left causal; writes the output in q's memory order.
- FLASH (FlashAttention-2 in torch): GQA, bottom-right causal and sliding windows, packed (thd)
  sequences, per-batch key lengths over a KV cache (split-KV for a single query); equal head
  dims, no mask, and no dropout (its RNG state differs across torch versions; cuDNN and
  EFFICIENT serve dropout).
- EFFICIENT (memory-efficient): q/k head dim != v head dim, masks and their gradient (learned
  biases), both causal alignments (bottom-right only where keys are at least as many as
  queries), dropout; GQA by repeating K/V into the copy it makes anyway
  (operands are made contiguous BSHD: its backward needs that).

None of them softcaps scores (FA4 and the math kernel do). Their backwards read the probabilities
from lse and rowsum(dO * O) from out, so attention sinks fold in after a forward without them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import AttnSpec
from .base import Grads, Kernel, additive, band_mask, empty_rng
from .math import backward_with_key_lengths

_HALF = (torch.float16, torch.bfloat16)


def _on_cuda(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else "runs on CUDA only"


def same_order(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with its dims in ``ref``'s memory order (a no-op when they already agree)."""
    order = sorted(range(ref.dim()), key=lambda d: -ref.stride(d))
    if t.permute(order).is_contiguous():
        return t
    inverse = sorted(range(len(order)), key=lambda i: order[i])
    return t.permute(order).contiguous().permute(inverse)


def _bshd(t: Tensor, heads: Optional[int] = None) -> Tensor:
    """[B, H, S, D] view -> contiguous [B, S, H, D] (copies unless already in that order); with
    ``heads``, each head repeated to that many (GQA: query head h reads head h // (heads // H))."""
    t = t.transpose(1, 2)
    if heads is None or heads == t.shape[2]:
        return t.contiguous()
    b, s, h, d = t.shape
    return t.unsqueeze(3).expand(b, s, h, heads // h, d).reshape(b, s, heads, d)


def _rng(seed: Tensor, offset: Tensor, device: torch.device) -> Tensor:
    return torch.stack([seed.reshape(()).to(device, torch.int64), offset.reshape(()).to(device, torch.int64)])


def _aligned_bias(mask: Optional[Tensor], spec: AttnSpec, dtype: torch.dtype) -> Optional[Tensor]:
    """The mask as an additive bias, as SDPA hands it to cuDNN and EFFICIENT: rows dense and
    8-element aligned, and broadcast to [B, Hq, Sq, Sk] as a view (a [B, 1, 1, Sk] key-padding
    mask stays Sk per batch). EFFICIENT returns the bias gradient in that [B, Hq, Sq, Sk] shape."""
    bias = additive(mask, dtype)
    if bias is None:
        return None
    sk = spec.seqlen_k
    rows_unaligned = bias.dim() > 1 and bias.shape[-2] > 1 and bias.stride(-2) % 8
    if bias.shape[-1] != sk or bias.stride(-1) != 1 or rows_unaligned:
        aligned = bias.new_zeros(*bias.shape[:-1], -(-sk // 8) * 8)
        aligned[..., :sk] = bias
        bias = aligned[..., :sk]
    return bias.expand(spec.batch, spec.heads_q, spec.seqlen_q, sk)


class CudnnKernel(Kernel):
    name = "cudnn"
    sinks = "lse"

    def available(self, device):
        if _on_cuda(device):
            return _on_cuda(device)
        return None if torch.backends.cudnn.is_available() else "cuDNN is not available"

    def unsupported(self, spec: AttnSpec) -> Optional[str]:
        if spec.dtype not in _HALF:
            return "needs float16 or bfloat16"
        if spec.softcap:
            return "no softcapping"
        if spec.dim_qk > 256 or spec.dim_v > 256 or spec.dim_qk % 8 or spec.dim_v % 8:
            return "head dims must be multiples of 8 up to 256"
        if spec.seqlen_q == 1 and spec.seqlen_k == 1:
            return "cuDNN takes no single query over a single key"
        if spec.has_band and not (spec.is_causal and spec.window[0] < 0 and spec.band_is_top_left()):
            return "only top-left causal masking (no windows, no bottom-right alignment)"
        return None

    def forward(self, spec, q, k, v, mask):
        bias = _aligned_bias(mask, spec, q.dtype)
        res = torch.ops.aten._scaled_dot_product_cudnn_attention.default(
            q, k, v, bias, True, spec.dropout_p, spec.is_causal, False, scale=spec.scale
        )
        out, lse, seed, offset = res[0], res[1], res[6], res[7]
        rng = _rng(seed, offset, q.device) if spec.dropout_p > 0 else empty_rng(q.device)
        return out, lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2]), rng

    def backward(self, spec, grad_out, q, k, v, out, lse, rng_state, mask) -> Grads:
        # The backward assumes out and grad_out laid out like the forward wrote out: q's order.
        out, grad_out = same_order(out, q), same_order(grad_out, q)
        bias = _aligned_bias(mask, spec, q.dtype)
        if spec.dropout_p > 0:
            seed, offset = rng_state[0], rng_state[1]
        else:
            seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)
        # None reaches the kernel as an undefined tensor: "no bias", "not packed".
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default(
            grad_out, q, k, v, out, lse.unsqueeze(-1), seed, offset, bias,
            None, None, spec.seqlen_q, spec.seqlen_k, spec.dropout_p, spec.is_causal, scale=spec.scale,
        )
        return dq, dk, dv, None


def _rows(t: Tensor) -> tuple[Tensor, int]:
    """A [B, H, S, D] cache view as the (rows, H, D) tensor a packed kernel reads, and the row
    where each batch starts (batch b at b * step): packed kernels address batch b from
    ``cu_seqlens[b]`` rows with the tensor's own strides, so a cache is read where it lies.
    Strides that do not fit (batch stride not a whole number of rows) cost one copy to BSHD."""
    b, h, s, d = t.shape
    sb, sh, ss, sd = t.stride()
    if sd != 1 or ss <= 0 or (b > 1 and sb % ss):
        t = t.transpose(1, 2).contiguous().transpose(1, 2)
        sb, sh, ss, _ = t.stride()
    step = sb // ss if b > 1 else 0
    return t.as_strided(((b - 1) * step + s, h, d), (ss, sh, 1)), step


def _starts(batch: int, step: int, device: torch.device) -> Tensor:
    """int32 offsets 0, step, ..., batch * step (one kernel: this runs on every decode step)."""
    if step == 0:
        return torch.zeros(batch + 1, device=device, dtype=torch.int32)
    return torch.arange(0, (batch + 1) * step, step, device=device, dtype=torch.int32)


def _tokens(t: Tensor) -> Tensor:
    """[B, H, S, D] -> packed [B * S, H, D] (a copy unless already in that order)."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b * s, h, d)


class FlashKernel(Kernel):
    name = "flash"
    varlen_native = True
    seqused_native = True
    sinks = "lse"

    def available(self, device):
        if _on_cuda(device):
            return _on_cuda(device)
        major, _ = torch.cuda.get_device_capability(device)
        return None if major >= 8 else "needs sm80 or newer"

    def unsupported(self, spec: AttnSpec) -> Optional[str]:
        if spec.dtype not in _HALF:
            return "needs float16 or bfloat16"
        if spec.softcap:
            return "no softcapping"
        if spec.dropout_p > 0:
            return "dropout is left to cuDNN and EFFICIENT, whose RNG state the op carries"
        if spec.dim_qk != spec.dim_v:
            return "q/k and v head dims must be equal"
        if spec.dim_qk > 256 or spec.dim_qk % 8:
            return "head dim must be a multiple of 8 up to 256"
        if spec.has_mask:
            return "no explicit mask"
        if spec.has_band and not spec.band_is_bottom_right():
            return "causal/window bands are bottom-right aligned in this kernel"
        return None

    def _window(self, spec: AttnSpec) -> tuple[bool, dict]:
        left, right = spec.window
        kw = {"scale": spec.scale}
        if spec.seqlen_q == 1 and left < 0 and spec.band_is_bottom_right():
            # one query on the bottom-right diagonal sees every key: no band, which keeps FA2 on
            # its decode path (GQA group folded into query rows, keys split across SMs)
            return False, kw
        causal = spec.is_causal and left < 0
        if not causal and spec.has_band:
            kw.update(window_size_left=left, window_size_right=right)
        return causal, kw

    def _call(self, spec, q, k, v, cu_q, cu_k, max_q, max_k, **extra):
        causal, kw = self._window(spec)
        res = torch.ops.aten._flash_attention_forward.default(
            q, k, v, cu_q, cu_k, max_q, max_k, spec.dropout_p, causal, False, **kw, **extra
        )
        return res[0], res[1]

    def _call_bwd(self, spec, do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, rng_state):
        causal, kw = self._window(spec)
        rng = unused = torch.empty(0, dtype=torch.int64, device=q.device)
        # None reaches the kernel as an undefined tensor: "not packed".
        dq, dk, dv = torch.ops.aten._flash_attention_backward.default(
            do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, spec.dropout_p, causal, rng, unused, **kw,
        )
        return dq, dk, dv, None

    def forward(self, spec, q, k, v, mask, seqused_k=None):
        if seqused_k is not None:
            return self._cache_forward(spec, q, k, v, seqused_k)
        t = lambda x: x.transpose(1, 2)  # BHSD view -> BSHD view
        out, lse = self._call(spec, t(q), t(k), t(v), None, None, spec.seqlen_q, spec.seqlen_k)
        return out.transpose(1, 2), lse, empty_rng(q.device)

    def backward(self, spec, grad_out, q, k, v, out, lse, rng_state, mask, seqused_k=None) -> Grads:
        if seqused_k is not None:
            return backward_with_key_lengths(spec, grad_out, q, k, v, out, lse, seqused_k)
        t = lambda x: x.transpose(1, 2)
        dq, dk, dv, _ = self._call_bwd(spec, t(grad_out), t(q), t(k), t(v), t(out), lse, None, None,
                                       spec.seqlen_q, spec.seqlen_k, rng_state)
        return t(dq), t(dk), t(dv), None

    def _cache_forward(self, spec, q, k, v, seqused_k):
        """Queries over a partly filled cache: the packed entry point, which honours ``seqused_k``
        and, for one query per batch, folds the GQA group into query rows and splits the keys."""
        b, sq = spec.batch, spec.seqlen_q
        (k_rows, step_k), (v_rows, step_v) = _rows(k), _rows(v)
        if step_k != step_v:  # one offset vector serves both: copy them to one layout (BSHD)
            (k_rows, step_k), (v_rows, _) = (_rows(t.transpose(1, 2).contiguous().transpose(1, 2)) for t in (k, v))
        out, lse = self._call(spec, _tokens(q), k_rows, v_rows, _starts(b, sq, q.device), _starts(b, step_k, q.device),
                              sq, spec.seqlen_k, seqused_k=seqused_k)
        out = out.view(b, sq, spec.heads_q, spec.dim_v).transpose(1, 2)
        return out, lse.view(spec.heads_q, b, sq).transpose(0, 1), empty_rng(q.device)

    def forward_varlen(self, spec, q, k, v, cu_q, cu_k):
        out, lse = self._call(spec, q, k, v, cu_q, cu_k, spec.seqlen_q, spec.seqlen_k)
        return out, lse, empty_rng(q.device)

    def backward_varlen(self, spec, grad_out, q, k, v, out, lse, rng_state, cu_q, cu_k) -> Grads:
        return self._call_bwd(spec, grad_out, q, k, v, out, lse, cu_q, cu_k, spec.seqlen_q, spec.seqlen_k, rng_state)


class EfficientKernel(Kernel):
    name = "efficient"
    strided_head_dim = True  # copies its operands to contiguous BSHD
    sinks = "lse"
    mask_grad = True

    def available(self, device):
        return _on_cuda(device)

    def unsupported(self, spec: AttnSpec) -> Optional[str]:
        if spec.dtype not in (*_HALF, torch.float32):
            return "needs float16, bfloat16 or float32"
        if spec.softcap:
            return "no softcapping"
        if spec.has_band and not (spec.is_causal and spec.window[0] < 0):
            return "no sliding windows"
        if spec.has_band and not spec.band_is_top_left() and spec.seqlen_q > spec.seqlen_k:
            return "its bottom-right causal band is wrong where queries outnumber keys (measured on the H200)"
        return None

    def _mask_type(self, spec: AttnSpec) -> int:
        if not spec.is_causal:
            return 0
        return 1 if spec.causal_align == "top_left" else 2

    def forward(self, spec, q, k, v, mask):
        hq = spec.heads_q
        out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward.default(
            _bshd(q), _bshd(k, hq), _bshd(v, hq), _aligned_bias(mask, spec, q.dtype), None, None, spec.seqlen_q,
            spec.seqlen_k, spec.dropout_p, self._mask_type(spec), True, scale=spec.scale,
        )
        rng = _rng(seed, offset, q.device) if spec.dropout_p > 0 else empty_rng(q.device)
        return out.transpose(1, 2), lse[..., : spec.seqlen_q], rng

    def backward(self, spec, grad_out, q, k, v, out, lse, rng_state, mask) -> Grads:
        t = lambda x: x.transpose(1, 2)
        hq, hkv = spec.heads_q, spec.heads_kv
        bias = _aligned_bias(mask, spec, q.dtype)
        pad = (-spec.seqlen_q) % 32
        lse_k = F.pad(lse, (0, pad)) if pad else lse
        # Outside CUDA-graph capture this kernel keeps its philox state on the host.
        if spec.dropout_p > 0:
            seed, offset = rng_state.cpu().unbind()
        else:
            seed = offset = torch.zeros((), dtype=torch.int64)
        dq, dk, dv, dbias = torch.ops.aten._efficient_attention_backward.default(
            _bshd(grad_out), _bshd(q), _bshd(k, hq), _bshd(v, hq), bias, _bshd(out), None, None, spec.seqlen_q,
            spec.seqlen_k, lse_k, spec.dropout_p, seed, offset, self._mask_type(spec), spec.mask_grad, scale=spec.scale,
        )
        if hq != hkv:  # the repeated heads' gradients summed back onto their key/value head
            dk, dv = (x.unflatten(2, (hkv, hq // hkv)).sum(3, dtype=torch.float32).to(x.dtype) for x in (dk, dv))
        if not spec.mask_grad:
            return t(dq), t(dk), t(dv), None
        band = band_mask(spec, spec.seqlen_q, spec.seqlen_k, q.device)
        if band is not None:  # the kernel skips blocks outside the causal band and leaves their gradient unwritten
            dbias = dbias.masked_fill(~band, 0)
        return t(dq), t(dk), t(dv), dbias
