"""megatron-core's ``GPTModel`` with its local (non-TransformerEngine) layer spec, on CPU, in one process.

megatron-core is written for CUDA. Its unit tests initialise model parallelism over a process group
and seed its RNG tracker; on CPU the same setup needs a few stand-ins, all installed by
``megatron_on_cpu()`` and undone when it exits:

- a one-process gloo group (``HashStore``: no network), then ``initialize_model_parallel(1, 1)``;
- an RNG tracker on the CPU generator (megatron's ``CudaRNGStatesTracker`` reads and writes CUDA
  generator states), seeded as ``model_parallel_cuda_manual_seed`` seeds megatron's;
- a CPU global memory buffer (``DotProductAttention`` takes the ignored input of its ``baddbmm`` from
  it, allocated on ``torch.cuda.current_device()``);
- the default causal mask built on CPU (megatron's ``get_default_causal_mask`` uses ``device="cuda"``);
  ``FusedScaleMaskSoftmax`` falls back to its torch softmax by itself (``masked_softmax_fusion=False``,
  and the fused kernels take only float16/bfloat16);
- ``RowParallelLinear`` passes ``tp_group=None`` and megatron's ``get_tensor_model_parallel_group_if_none``
  raises a ``DeprecationWarning`` for it on every call. Under torch.compile that warning is a graph break
  inside ``TransformerBlock``'s activation-offloading context manager, which Dynamo cannot resume: it
  runs the whole block eagerly, so no attention reaches a graph. The stand-in looks the group up the
  same way without the warning (this one is needed on CUDA too).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional
from unittest import mock

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.fusions import fused_softmax
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.tensor_parallel import random as tp_random
from megatron.core.transformer import utils as transformer_utils
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import GlobalMemoryBuffer
from torch import nn

VOCAB, SEQ, BATCH = 100, 16, 2
SEED = 123


class CpuRNGStatesTracker(tp_random.CudaRNGStatesTracker):
    """megatron's named RNG states, kept for the CPU generator.

    Under torch.compile ``fork`` leaves the generator as it is: ``torch.get_rng_state`` is on Dynamo's
    skip list, and a graph break there would split every attention between its softmax and its
    dropout. The models built here drop nothing, so no random number is drawn."""

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG state {name!r} or seed {seed} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if torch.compiler.is_compiling():
            yield
            return
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


class CpuMemoryBuffer(GlobalMemoryBuffer):
    """megatron's global scratch buffer, allocated on the CPU."""

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None) -> torch.Tensor:
        needed = math.prod(tensor_shape)
        if (name, dtype) not in self.buffer or self.buffer[(name, dtype)].numel() < needed:
            self.buffer[(name, dtype)] = torch.empty(needed, dtype=dtype)
        return self.buffer[(name, dtype)][:needed].view(*tensor_shape)


def _causal_mask(sq: int) -> torch.Tensor:
    """megatron's ``get_default_causal_mask`` (True where a key is masked), on the CPU."""
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _tp_group(tp_group, is_expert: bool = False, check_initialized: bool = True):
    """megatron's ``get_tensor_model_parallel_group_if_none`` without its DeprecationWarning."""
    if tp_group is not None or not parallel_state.is_initialized():
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


def _seed_tracker() -> None:
    """Install and seed the tracker as ``model_parallel_cuda_manual_seed(SEED)`` does at rank 0."""
    tracker = CpuRNGStatesTracker()
    tp_random._CUDA_RNG_STATE_TRACKER, tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = tracker, True
    tracker.add(tp_random._DATA_PARALLEL_RNG_TRACKER_NAME, SEED)
    tracker.add(tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, SEED + 2718)
    tracker.add(tp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, SEED + 1024)


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Model parallelism of size 1 on a one-process gloo group, with the CPU stand-ins above."""
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), world_size=1, rank=0)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    parallel_state._GLOBAL_MEMORY_BUFFER = CpuMemoryBuffer()
    _seed_tracker()
    try:
        with mock.patch.object(fused_softmax, "get_default_causal_mask", _causal_mask), \
                mock.patch.object(transformer_utils, "get_default_causal_mask", _causal_mask), \
                mock.patch.object(tp_layers, "get_tensor_model_parallel_group_if_none", _tp_group):
            yield
    finally:
        tp_random._CUDA_RNG_STATE_TRACKER, tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = None, False
        parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


class GPTLogits(nn.Module):
    """``GPTModel`` on token ids at positions 0..S-1: logits [B, S, V].

    ``attention_mask`` None lets megatron build its causal mask inside the model; a [1, 1, S, S]
    bool tensor (True = masked) is the mask megatron's GPT data pipeline hands the model."""

    def __init__(self, gpt: GPTModel):
        super().__init__()
        self.gpt = gpt

    def forward(self, ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.gpt(ids, positions, attention_mask)


def config(dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """Two layers, hidden 64, 4 query heads in 2 query groups (GQA), nothing dropped."""
    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=128, params_dtype=dtype, use_cpu_initialization=True,
                             attention_dropout=0.0, hidden_dropout=0.0, masked_softmax_fusion=False)


def build(dtype: torch.dtype = torch.float32, mask_as_input: bool = False) -> tuple[GPTLogits, tuple]:
    """(model in training mode, inputs); call inside ``megatron_on_cpu()``."""
    torch.manual_seed(0)
    gpt = GPTModel(config=config(dtype), transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                   max_sequence_length=SEQ)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    inputs = (ids, _causal_mask(SEQ).view(1, 1, SEQ, SEQ)) if mask_as_input else (ids,)
    return GPTLogits(gpt).to(dtype).train(), inputs  # torch norms ignore params_dtype
