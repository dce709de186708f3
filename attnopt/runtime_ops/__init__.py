"""Runtime attention ops: ``torch.ops.attnopt.attention`` and its Python front."""
from .attention import KernelCall, attention, kernel_for, trace_kernels
from .kernels import KERNEL_NAMES

__all__ = ["KERNEL_NAMES", "KernelCall", "attention", "kernel_for", "trace_kernels"]
