"""Kernel registry and the policy that picks one per call.

The policy is an ordered list per device type, fastest first as measured on an H100
(bf16, GQA, causal): FA4 1.96 ms < cuDNN 2.01 ms < torch FLASH < EFFICIENT for one
forward+backward of a Llama-3-8B attention core. The first kernel that is available and
computes the call exactly wins; ``math`` computes everything and always comes last.

One exception: a single query over a partly filled KV cache (decode) tries the split-KV kernels
first: attnopt's Triton ``decode`` (reads only each batch's filled keys), then FLASH (splits sized
by the whole cache). FA4 has no split-KV path on sm90: 372 us against FLASH's 73 us for batch 8,
32/8 heads, 4096 of 8192 cached keys on the H100.
"""
from __future__ import annotations

import functools

from ..spec import AttnSpec, key_lengths_as_mask
from .base import Kernel
from .cpu import CpuFlashKernel
from .cuda import CudnnKernel, EfficientKernel, FlashKernel
from .decode import DecodeKernel
from .fa4 import FA4Kernel
from .math import MathKernel

KERNELS: dict[str, Kernel] = {
    k.name: k for k in (FA4Kernel(), CudnnKernel(), FlashKernel(), EfficientKernel(), DecodeKernel(), CpuFlashKernel(),
                        MathKernel())
}
ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("fa4", "cudnn", "flash", "efficient", "decode", "math"),
    "cpu": ("cpu_flash", "math"),
}
KERNEL_NAMES = ("auto", *KERNELS)


def _why_not(kernel: Kernel, spec: AttnSpec) -> str | None:
    if spec.seqused and not kernel.seqused_native:  # key lengths reach it as a mask
        spec = key_lengths_as_mask(spec)
    reason = kernel.available(spec.device)
    if reason is None and spec.sinks and kernel.sinks is None:
        reason = "no attention sinks"
    if reason is None and spec.mask_grad and not kernel.mask_grad:
        reason = "its backward returns no gradient for attn_mask (a learned bias)"
    if reason is None and spec.mask_fill is not None and kernel.name != "math":
        reason = f"masked keys score {spec.mask_fill:g} (a finite fill) where this kernel drops them"
    if reason is None:
        reason = kernel.unsupported(spec)
    return reason


@functools.lru_cache(maxsize=4096)
def select(spec: AttnSpec, kernel: str = "auto") -> Kernel:
    """The kernel that runs ``spec``. A forced kernel that cannot run it raises ValueError.

    Cached: a spec holds only metadata, and availability does not change within a process.
    """
    if kernel != "auto":
        if kernel not in KERNELS:
            raise ValueError(f"attnopt.attention: unknown kernel {kernel!r}; choose from {KERNEL_NAMES}")
        reason = _why_not(KERNELS[kernel], spec)
        if reason is not None:
            raise ValueError(f"attnopt.attention: kernel {kernel!r} cannot run this call: {reason}")
        return KERNELS[kernel]
    for name in _order(spec):
        if _why_not(KERNELS[name], spec) is None:
            return KERNELS[name]
    return KERNELS["math"]


def _order(spec: AttnSpec) -> tuple[str, ...]:
    order = ORDER.get(spec.device.type, ("math",))
    if spec.seqused and spec.seqlen_q == 1 and "flash" in order:  # decode: split-KV first
        order = ("decode", "flash", *(n for n in order if n not in ("decode", "flash")))
    return order


def explain(spec: AttnSpec) -> dict[str, str]:
    """For each kernel on this device, in the order tried: 'ok' or why it was passed over."""
    return {n: (_why_not(KERNELS[n], spec) or "ok") for n in _order(spec)}


__all__ = ["KERNELS", "KERNEL_NAMES", "Kernel", "explain", "select"]
