"""What every attention kernel provides, and helpers they share.

Kernels see q, k, v as [B, H, S, D] views of the caller's tensors (no copies; a head dim that is
not unit-stride is copied first unless the kernel reads any strides) and return the output as a
[B, Hq, Sq, Dv] tensor in whatever memory order they produce; the op then makes it contiguous in
the requested output layout (free when the kernel already wrote that order).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import AttnSpec, key_lengths_as_mask

# dq, dk, dv and, when the spec asks for it (``mask_grad``), the additive mask's gradient as [B, Hq, Sq, Sk]
Grads = tuple[Tensor, Tensor, Tensor, Optional[Tensor]]


class Kernel:
    """One attention implementation. Subclasses say what they support and run it."""

    name: str = ""
    varlen_native: bool = False
    seqused_native: bool = False  # takes seqused_k itself; others get key lengths folded into the mask
    strided_head_dim: bool = False  # reads a head dim of any stride; others get a unit-stride copy
    # How it runs attention sinks: "native" (its forward takes ``sinks``); "lse" (the op folds them
    # into out and lse after a forward without them, exactly). Either way the backward gets them
    # through lse: every backward reads the probabilities from lse and rowsum(dO * O) from out.
    sinks: Optional[str] = None
    mask_grad: bool = False  # its backward returns the gradient of an additive mask

    def available(self, device: torch.device) -> Optional[str]:
        """None when usable on this device and install, else the reason it is not."""
        return None

    def unsupported(self, spec: AttnSpec) -> Optional[str]:
        """None when this kernel computes ``spec`` exactly, else the reason it cannot."""
        return None

    def forward(self, spec: AttnSpec, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Return (out [B,Hq,Sq,Dv], lse [B,Hq,Sq] of ``spec.lse_dtype``, rng_state)."""
        raise NotImplementedError(self.name)

    def backward(
        self, spec: AttnSpec, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
        lse: Tensor, rng_state: Tensor, mask: Optional[Tensor],
    ) -> Grads:
        raise NotImplementedError(self.name)


def empty_rng(device: torch.device) -> Tensor:
    return torch.empty(0, dtype=torch.int64, device=device)


def _within_band(window: tuple[int, int], i: Tensor, j: Tensor) -> Tensor:
    """Keys j inside the (left, right) window around query positions i (broadcast; one side bounded)."""
    left, right = window
    keep = j >= i - left if left >= 0 else None
    if right >= 0:
        keep = j <= i + right if keep is None else keep & (j <= i + right)
    return keep


def band_mask(spec: AttnSpec, sq: int, sk: int, device: torch.device) -> Optional[Tensor]:
    """Bool [Sq, Sk] mask of the causal / sliding-window band, or None when unbounded."""
    if not spec.has_band:
        return None
    offset = sk - sq if spec.causal_align == "bottom_right" else 0
    i = torch.arange(sq, device=device).unsqueeze(1) + offset
    j = torch.arange(sk, device=device).unsqueeze(0)
    return _within_band(spec.window, i, j)


def full_mask(spec: AttnSpec, mask: Optional[Tensor], sq: int, sk: int, device: torch.device) -> Optional[Tensor]:
    """The explicit mask and the band combined: bool, or additive float where the mask is."""
    band = band_mask(spec, sq, sk, device)
    if band is None:
        return mask
    if mask is None:
        return band
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, float("-inf"))


def additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A bool keep-mask as an additive bias of ``dtype`` (0 keep, -inf drop)."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def pad_last(t: Tensor, size: int) -> Tensor:
    """Zero-pad the head dim to ``size`` (kernels that need equal q/k and v head dims)."""
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def fold_key_lengths(spec: AttnSpec, mask: Optional[Tensor], seqused_k: Tensor) -> tuple[AttnSpec, Tensor]:
    """Key lengths (and the band, which aligns to them as if each batch's keys were sliced)
    folded into one explicit mask, for kernels without native ``seqused_k``."""
    device = seqused_k.device
    lengths = seqused_k.long()[:, None, None, None]  # [B, 1, 1, 1]
    i = torch.arange(spec.seqlen_q, device=device)[:, None]
    j = torch.arange(spec.seqlen_k, device=device)
    keep = j < lengths  # [B, 1, 1, Sk]
    if spec.has_band:
        if spec.causal_align == "bottom_right":
            i = i + lengths - spec.seqlen_q  # [B, 1, Sq, 1]
        keep = keep & _within_band(spec.window, i, j)
    if mask is not None:
        keep = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
    return key_lengths_as_mask(spec), keep
