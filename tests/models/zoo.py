"""Every model the tests run, by name: tiny transformers LMs and the hand-built modules."""
from __future__ import annotations

import torch
from torch import nn

from . import hand_built
from . import transformers_models as tm

F64 = torch.float64
HAND_BUILT = ["titan_qwen3", "megatron", "megatron_seed", "timm_vit", "padded_mla"]
MODELS = [*tm.BUILDERS, *HAND_BUILT]


def _hand_built(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    if name == "titan_qwen3":
        return hand_built.TitanQwen3Attention().to(F64), (torch.randn(2, 8, 64, dtype=F64, requires_grad=True),)
    if name.startswith("megatron"):
        model = hand_built.MegatronAttention(seed=name.endswith("seed")).to(F64)
        return model, (torch.randn(8, 2, 64, dtype=F64, requires_grad=True),)  # [S, B, hidden]
    if name == "timm_vit":
        return hand_built.TinyViT().to(F64), (torch.randn(2, 3, 8, 8, dtype=F64, requires_grad=True),)
    if name == "padded_mla":
        return hand_built.PaddedMLAAttention().to(F64), (torch.randn(2, 8, 64, dtype=F64, requires_grad=True),)
    raise KeyError(name)


def build(name: str) -> tuple[nn.Module, tuple]:
    """(model in float64, example inputs that require grad)."""
    return tm.build(name) if name in tm.BUILDERS else _hand_built(name)
