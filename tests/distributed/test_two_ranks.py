"""Two real ranks on CPU with gloo (spawned, torchrun-style): FSDP2 and tensor parallel training of a
transformers Llama compiled with attnopt, attnopt.attention on head-sharded DTensors, and one attention
layer under torch's context parallel; each against the same computation in one process.

The ranks' start-up (imports, gloo) costs more than what they run, so each module fixture launches
once and the tests read its results.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard

from . import llama, workers
from .checks import MESHES, TP_CASES, by_mesh, check_training
from .cp_layer import layer_inputs
from .launch import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def reference() -> list[float]:
    """The single-process losses the distributed runs must reproduce."""
    want = llama.reference_losses()
    assert want[-1] < want[0] - 1  # the model learns: matching losses are not matching noise
    return want


@pytest.fixture(scope="module")
def trained() -> dict[tuple[int, int], list[dict]]:
    """Both 2-rank training runs, in one launch."""
    return by_mesh(run_ranks(workers.train_llama, MESHES, "aot_eager"), MESHES)


def test_fsdp2_and_tensor_parallel_training_matches_one_process(trained, reference):
    """20 steps with FSDP2 (dp=1) and tensor parallel (tp=2) on a 1 x 2 mesh, the model compiled with attnopt."""
    check_training(trained[1, 2], tp=2, want=reference)


def test_fsdp2_training_matches_one_process(trained, reference):
    """20 steps with FSDP2 sharding parameters and the batch over both ranks, compiled with attnopt."""
    check_training(trained[2, 1], tp=1, want=reference)


@pytest.mark.slow
def test_training_with_inductor_matches_one_process(reference):
    """The same runs through the default inner compiler (what backend="attnopt" uses)."""
    results = by_mesh(run_ranks(workers.train_llama, MESHES, "inductor"), MESHES)
    for (dp, tp), ranks in results.items():
        check_training(ranks, tp=tp, want=reference)


@pytest.mark.slow
def test_fsdp2_by_tensor_parallel_on_four_ranks(reference):
    """A real 2 x 2 mesh: FSDP2 across two data-parallel groups of two tensor-parallel ranks."""
    ranks = run_ranks(workers.train_llama, [(2, 2)], "aot_eager", world=4)
    check_training([r[0] for r in ranks], tp=2, want=reference)


CP_SEQ = 1024
CP_CONFIGS = [(True, False), (False, False), (True, True)]  # (head-tail load balancing, compiled)


@pytest.fixture(scope="module")
def attention_runs() -> list[dict]:
    """The head-sharded and context-parallel attention checks, in one launch."""
    return run_ranks(workers.attention_checks, TP_CASES, CP_SEQ, CP_CONFIGS)


def test_head_sharded_attention_matches_one_process(attention_runs):
    """GQA with kv heads split (bhsd, bshd -> bhsd), MQA with the kv head replicated (sbhd): no collectives;
    Hkv = 3 cannot be split in two, so DTensor gathers, and the result is still exact."""
    for rank in attention_runs:
        tp = rank["tp"]
        assert [r["collectives"] == 0 for r in tp] == [True, True, True, False]
        assert [r["out_placements"] for r in tp[:3]] == [(Shard(1),), (Shard(1),), (Shard(2),)]
        for r in tp:
            assert r["out_err"] < 1e-5 and r["grad_err"] < 1e-5, r


def test_context_parallel_attention_layer_matches_one_process(attention_runs):
    """S=1024 over two ranks, causal GQA through torch's context parallel (head-tail load balancing on
    and off), eager and compiled with attnopt: output and all gradients as on one process."""
    layer, x, grad = layer_inputs(CP_SEQ)
    x.requires_grad_()
    want = layer(x)
    want.backward(grad)
    for rank in attention_runs:
        for config in CP_CONFIGS:
            got = rank["cp"][config]
            assert got["kernels"] == [("backward", "cpu_flash"), ("forward", "cpu_flash")]
            torch.testing.assert_close(got["out"], want.detach(), rtol=1e-5, atol=1e-5, msg=f"output, {config}")
            torch.testing.assert_close(got["dx"], x.grad, rtol=1e-5, atol=1e-5, msg=f"input grad, {config}")
            for name, p in layer.named_parameters():
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-5, msg=f"{name}, {config}")
