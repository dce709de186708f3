"""torch's fused flash-attention kernel for CPU.

It reads strided inputs in place (with a unit-stride head dim) and takes GQA natively (checked
once per process, since older torch builds did not). It needs equal q/k and v head dims, so
MLA-shaped calls get the smaller side zero-padded and the output trimmed; it has no dropout and no
softcapping; bands other than top-left causal go in as an additive mask. Its backward reads the
probabilities from lse, so attention sinks fold in after its forward; it returns no mask gradient.
A row that keeps no key gets out 0 and lse 0.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ..spec import AttnSpec
from .base import Grads, Kernel, additive, empty_rng, full_mask, pad_last

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


@functools.cache
def _native_gqa() -> bool:
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 2, 3, 8)
    try:
        out, _ = _fwd(q, k, k)
    except RuntimeError:
        return False
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    return bool(torch.allclose(out, ref, atol=1e-5))


class CpuFlashKernel(Kernel):
    name = "cpu_flash"
    sinks = "lse"

    def available(self, device):
        return None if device.type == "cpu" else "runs on CPU only"

    def unsupported(self, spec: AttnSpec) -> Optional[str]:
        if spec.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return f"dtype {spec.dtype} is not supported"
        if spec.dropout_p > 0:
            return "no dropout"
        if spec.softcap:
            return "no softcapping"
        if spec.heads_q != spec.heads_kv and not _native_gqa():
            return "this torch build's CPU kernel has no grouped-query attention"
        if spec.dim_qk != spec.dim_v and spec.mask_dtype is not None and spec.mask_dtype != torch.bool:
            # torch runs such calls in its math kernel: a row an additive fill masks entirely (finfo.min)
            # averages every key there, and differentiates differently in this kernel's backward
            return "an additive mask with q/k and v head dims that differ (torch's SDPA runs them in math)"
        return None

    def _args(self, spec: AttnSpec, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]):
        d = max(spec.dim_qk, spec.dim_v)
        native_causal = spec.is_causal and spec.window[0] < 0 and spec.band_is_top_left()
        if native_causal:
            m = mask
        else:
            m = full_mask(spec, mask, q.shape[2], k.shape[2], q.device)
        m = additive(m, q.dtype)
        if m is not None and m.dim() not in (2, 4):  # the kernel takes 2-D or 4-D masks: [H, Sq, Sk] -> [1, H, Sq, Sk]
            m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        return (pad_last(q, d), pad_last(k, d), pad_last(v, d)), m, native_causal

    def forward(self, spec, q, k, v, mask):
        (qp, kp, vp), m, causal = self._args(spec, q, k, v, mask)
        out, lse = _fwd(qp, kp, vp, 0.0, causal, attn_mask=m, scale=spec.scale)
        return out[..., : spec.dim_v], lse, empty_rng(q.device)

    def backward(self, spec, grad_out, q, k, v, out, lse, rng_state, mask) -> Grads:
        d = max(spec.dim_qk, spec.dim_v)
        (qp, kp, vp), m, causal = self._args(spec, q, k, v, mask)
        dq, dk, dv = _bwd(pad_last(grad_out, d), qp, kp, vp, pad_last(out, d), lse, 0.0, causal, attn_mask=m, scale=spec.scale)
        return dq[..., : spec.dim_qk], dk[..., : spec.dim_qk], dv[..., : spec.dim_v], None
