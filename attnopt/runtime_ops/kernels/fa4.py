"""FlashAttention-4 (``flash_attn.cute``), the fastest kernel measured on Hopper and Blackwell.

GQA by head count, q/k head dim != v head dim, bottom-right causal and sliding windows, packed
(thd) sequences, softcapping (forward and backward), attention sinks (``learnable_sink``: a
per-head logit in natural-log units, not scaled, with no value, folded into the row's softmax
denominator and its lse, exactly the op's ``sinks``; its backward reads them through that lse).
No dropout and no explicit mask. Importing
``flash_attn.cute`` JIT-loads CuTe DSL and takes seconds, so it happens on first use, never at
``import attnopt``.
"""
from __future__ import annotations

import functools
import importlib.util
from types import ModuleType
from typing import Optional

import torch

from ..spec import AttnSpec
from .base import Grads, Kernel, empty_rng
from .math import backward_with_key_lengths

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _interface() -> ModuleType:
    from flash_attn.cute import interface

    return interface


_SM90_HEAD_DIMS = frozenset({(64, 64), (96, 96), (128, 128), (192, 128), (192, 192), (256, 256)})


class FA4Kernel(Kernel):
    name = "fa4"
    varlen_native = True
    seqused_native = True
    sinks = "native"

    def available(self, device):
        if device.type != "cuda":
            return "runs on CUDA only"
        try:
            found = importlib.util.find_spec("flash_attn.cute") is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return "flash_attn.cute (flash-attn-4) is not installed"
        major, _ = torch.cuda.get_device_capability(device)
        return None if major >= 9 else "needs sm90 or newer"

    def unsupported(self, spec: AttnSpec) -> Optional[str]:
        if spec.dtype not in _HALF:
            return "needs float16 or bfloat16"
        if spec.dropout_p > 0:
            return "no dropout"
        if spec.has_mask:
            return "no explicit mask"
        if spec.has_band and not spec.band_is_bottom_right():
            return "causal/window bands are bottom-right aligned in this kernel"
        if spec.dim_qk % 8 or spec.dim_v % 8 or spec.dim_qk > 256 or spec.dim_v > 256:
            return "head dims must be multiples of 8 up to 256"
        if spec.heads_q != spec.heads_kv and spec.dim_qk != spec.dim_v:
            return "GQA backward needs equal q/k and v head dims"
        major, _ = torch.cuda.get_device_capability(spec.device)
        if spec.softcap and (major >= 12 or (major >= 10 and spec.dim_qk == spec.dim_v == 256)):
            return "its backward has no softcapping on sm120, nor for head dim 256 on sm100"
        if spec.sinks and (major >= 12 or (major >= 10 and 256 in (spec.dim_qk, spec.dim_v))):
            return "its learnable sinks run on sm90 and sm100/sm110, not with head dim 256 on sm100"
        if major == 9:  # the head dims its sm90 kernels are built for (FA3's); others fail to compile
            if (spec.dim_qk, spec.dim_v) in _SM90_HEAD_DIMS:
                return None
            return f"head dims ({spec.dim_qk}, {spec.dim_v}): sm90 kernels take {sorted(_SM90_HEAD_DIMS)}"
        try:
            _interface()._validate_head_dims(spec.dim_qk, spec.dim_v, major, 16 // (torch.finfo(spec.dtype).bits // 8))
        except (AssertionError, ValueError) as e:
            return f"head dims ({spec.dim_qk}, {spec.dim_v}): {e}"
        return None

    def _window(self, spec: AttnSpec) -> dict:
        left, right = spec.window
        causal = spec.is_causal and left < 0
        if causal or not spec.has_band:
            return {"causal": causal}
        return {"causal": False, "window_size_left": left if left >= 0 else None,
                "window_size_right": right if right >= 0 else None}

    def forward(self, spec, q, k, v, mask, seqused_k=None, sinks=None):
        t = lambda x: x.transpose(1, 2)
        out, lse, *_ = _interface()._flash_attn_fwd(
            t(q), t(k), t(v), softmax_scale=spec.scale, softcap=spec.softcap, return_lse=True, seqused_k=seqused_k,
            learnable_sink=sinks, **self._window(spec),
        )
        return out.transpose(1, 2), lse, empty_rng(q.device)

    def backward(self, spec, grad_out, q, k, v, out, lse, rng_state, mask, seqused_k=None) -> Grads:
        if seqused_k is not None:
            return backward_with_key_lengths(spec, grad_out, q, k, v, out, lse, seqused_k)
        t = lambda x: x.transpose(1, 2)
        w = self._window(spec)
        dq, dk, dv = _interface()._flash_attn_bwd(
            t(q), t(k), t(v), t(out), t(grad_out), lse, spec.scale, w.pop("causal"), spec.softcap, **w
        )[:3]
        return t(dq), t(dk), t(dv), None

    def forward_varlen(self, spec, q, k, v, cu_q, cu_k, sinks=None):
        out, lse, *_ = _interface()._flash_attn_fwd(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=spec.seqlen_q,
            max_seqlen_k=spec.seqlen_k, softmax_scale=spec.scale, softcap=spec.softcap, return_lse=True,
            learnable_sink=sinks, **self._window(spec),
        )
        return out, lse, empty_rng(q.device)

    def backward_varlen(self, spec, grad_out, q, k, v, out, lse, rng_state, cu_q, cu_k) -> Grads:
        w = self._window(spec)
        dq, dk, dv = _interface()._flash_attn_bwd(
            q, k, v, out, grad_out, lse, spec.scale, w.pop("causal"), spec.softcap, cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k, max_seqlen_q=spec.seqlen_q, max_seqlen_k=spec.seqlen_k, **w,
        )[:3]
        return dq, dk, dv, None
