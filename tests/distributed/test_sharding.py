"""attnopt.attention on DTensors, in one process over a fake two-rank process group: which
sharding DTensor picks (heads stay local: no collectives), and rank 0's share of the result.
Real two-rank runs with data exchange are in test_two_ranks.py."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

import attnopt

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

B, S, HQ, HKV, D = 2, 8, 4, 2, 8
SHAPES = {"bhsd": (B, "h", S, D), "bshd": (B, S, "h", D), "sbhd": (S, B, "h", D)}
HEAD = {"bhsd": 1, "bshd": 2, "sbhd": 2}


@pytest.fixture(scope="module")
def mesh():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield init_device_mesh("cpu", (2,))
    dist.destroy_process_group()


def _qkv(layout: str, hq: int = HQ, hkv: int = HKV) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn([{"h": h}.get(d, d) for d in SHAPES[layout]], requires_grad=True) for h in (hq, hkv, hkv)]


def _rank0(t: torch.Tensor, placement) -> torch.Tensor:
    """Rank 0's share of a whole tensor under one placement."""
    return t.chunk(2, placement.dim)[0] if isinstance(placement, Shard) else t


def _run(mesh, whole, placements, **kw):
    parts = [distribute_tensor(t.detach(), mesh, [p]).requires_grad_() for t, p in zip(whole, placements)]
    ref, lse = attnopt.attention(*whole, return_lse=True, **kw)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    with CommDebugMode() as forward:
        out, out_lse = attnopt.attention(*parts, return_lse=True, **kw)
    grad = distribute_tensor(grad, mesh, out.placements)
    with CommDebugMode() as backward:
        out.backward(grad)
    return parts, out, out_lse, ref, lse, forward.get_total_counts() + backward.get_total_counts()


def _assert_local(parts, whole, out, ref, out_lse, lse):
    torch.testing.assert_close(out.to_local(), _rank0(ref, out.placements[0]))
    torch.testing.assert_close(out_lse.to_local(), _rank0(lse, out_lse.placements[0]))
    for p, t in zip(parts, whole):
        torch.testing.assert_close(p.grad.to_local(), _rank0(t.grad, p.grad.placements[0]))


@pytest.mark.parametrize("layout,out_layout", [("bhsd", None), ("bshd", None), ("sbhd", None), ("bshd", "bhsd"),
                                               ("bhsd", "bshd"), ("sbhd", "bshd")])
def test_heads_stay_local(mesh, layout, out_layout):
    whole = _qkv(layout)
    placements = [Shard(HEAD[layout])] * 3
    parts, out, out_lse, ref, lse, comms = _run(mesh, whole, placements, is_causal=True, layout=layout,
                                                out_layout=out_layout)
    assert comms == 0
    assert out.placements == (Shard(HEAD[out_layout or layout]),) and out_lse.placements == (Shard(1),)
    assert all(p.grad.placements == (Shard(HEAD[layout]),) for p in parts)
    _assert_local(parts, whole, out, ref, out_lse, lse)


def test_mqa_keeps_the_one_kv_head_whole(mesh):
    whole = _qkv("bshd", hkv=1)
    parts, out, out_lse, ref, lse, comms = _run(mesh, whole, [Shard(2), Replicate(), Replicate()], layout="bshd")
    assert comms == 0 and out.placements == (Shard(2),)
    assert parts[1].grad.placements == parts[2].grad.placements == (Partial(),)  # a share of each rank's heads
    torch.testing.assert_close(out.to_local(), _rank0(ref, Shard(2)))
    torch.testing.assert_close(parts[0].grad.to_local(), _rank0(whole[0].grad, Shard(2)))


def test_thd_heads_stay_local(mesh):
    torch.manual_seed(0)
    whole = [torch.randn(12, h, D, requires_grad=True) for h in (HQ, HKV, HKV)]
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    kw = dict(layout="thd", is_causal=True, max_seqlen_q=7, max_seqlen_k=7)
    cu_r = distribute_tensor(cu, mesh, [Replicate()])
    parts = [distribute_tensor(t.detach(), mesh, [Shard(1)]).requires_grad_() for t in whole]
    ref, lse = attnopt.attention(*whole, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True, **kw)
    ref.sum().backward()
    with CommDebugMode() as comm:
        out, out_lse = attnopt.attention(*parts, cu_seqlens_q=cu_r, cu_seqlens_k=cu_r, return_lse=True, **kw)
        out.sum().backward()
    assert comm.get_total_counts() == 0
    assert out.placements == (Shard(1),) and out_lse.placements == (Shard(0),)
    _assert_local(parts, whole, out, ref, out_lse, lse)


@pytest.mark.parametrize("mask_shape,mask_placement", [((B, HQ, S, S), Shard(1)), ((1, 1, S, S), Replicate()),
                                                       ((S, S), Replicate())])
def test_mask_follows_the_heads(mesh, mask_shape, mask_placement):
    whole = _qkv("bhsd")
    mask = torch.rand(mask_shape) > 0.3
    mask[..., 0] = True
    dmask = distribute_tensor(mask, mesh, [mask_placement])
    parts = [distribute_tensor(t.detach(), mesh, [Shard(1)]).requires_grad_() for t in whole]
    ref = attnopt.attention(*whole, mask)
    with CommDebugMode() as comm:
        out = attnopt.attention(*parts, dmask)
    assert comm.get_total_counts() == 0
    torch.testing.assert_close(out.to_local(), _rank0(ref, Shard(1)))


@pytest.mark.parametrize("layout", ["bhsd", "sbhd"])
def test_batch_sharding_stays_local(mesh, layout):
    whole = _qkv(layout)
    dim = 1 if layout == "sbhd" else 0
    parts, out, out_lse, ref, lse, comms = _run(mesh, whole, [Shard(dim)] * 3, is_causal=True, layout=layout)
    assert comms == 0 and out.placements == (Shard(dim),) and out_lse.placements == (Shard(0),)
    _assert_local(parts, whole, out, ref, out_lse, lse)


def test_uneven_kv_heads_are_not_split(mesh):
    """Hkv = 3 over 2 ranks would pair query heads with the wrong kv heads: DTensor must gather."""
    whole = _qkv("bhsd", hq=6, hkv=3)
    *_, comms = _run(mesh, whole, [Shard(1)] * 3, layout="bhsd")
    assert comms > 0


def test_layout_decides_which_dim_is_heads(mesh):
    """Same shapes and placements, different layout: dim 1 is heads for bhsd but the sequence for bshd."""
    whole = _qkv("bhsd", hq=4, hkv=4)
    *_, comms_bhsd = _run(mesh, whole, [Shard(1)] * 3, layout="bhsd")
    *_, comms_bshd = _run(mesh, whole, [Shard(1)] * 3, layout="bshd")
    assert comms_bhsd == 0 and comms_bshd > 0


def test_context_parallel_refuses_what_it_cannot_split(mesh):
    from torch.distributed.tensor.experimental._context_parallel import (
        _disable_context_parallel_dispatcher, _enable_context_parallel_dispatcher)

    q, k, v = (distribute_tensor(t.detach(), mesh, [Shard(1)]) for t in _qkv("bshd"))
    mask = distribute_tensor(torch.ones(S, S, dtype=torch.bool), mesh, [Replicate()])
    heads = [distribute_tensor(t.detach(), mesh, [Shard(2)]) for t in _qkv("bshd")]
    _enable_context_parallel_dispatcher()
    try:
        with pytest.raises(NotImplementedError, match="attn_mask"):
            attnopt.attention(q, k, v, mask, layout="bshd")
        with pytest.raises(NotImplementedError, match="sharded on its sequence dim"):
            attnopt.attention(*heads, layout="bshd")
    finally:
        _disable_context_parallel_dispatcher()
    assert isinstance(attnopt.attention(*heads, layout="bshd"), DTensor)  # head sharding again once CP is off


class _TPAttention(torch.nn.Module):
    """Tensor-parallel attention with DTensor activations (the projections keep their DTensor outputs)."""

    def __init__(self, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.head_dim = hidden // heads
        self.q_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(attnopt.attention(q, k, v, is_causal=True, layout="bshd").reshape(b, s, -1))


def test_compiled_tensor_parallel_attention_on_dtensors_stays_local(mesh):
    """Under torch.compile the op's rules run on fake DTensors: the only collective left is the
    output projection's all-reduce."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch._dynamo.reset()
    model = _TPAttention()
    col = ColwiseParallel(use_local_output=False)
    parallelize_module(model, mesh, {"q_proj": col, "k_proj": col, "v_proj": col,
                                     "o_proj": RowwiseParallel(input_layouts=Shard(-1))})
    compiled = torch.compile(model, backend=attnopt.backend("aot_eager", strict=True))
    x = torch.randn(2, 8, 64)
    compiled(x).sum().backward()  # compile outside CommDebugMode (its module hooks would skip compiling)
    with CommDebugMode() as comm:
        compiled(x).sum().backward()
    assert {str(op): n for op, n in comm.get_comm_counts().items()} == {"c10d_functional.all_reduce": 1}
    torch._dynamo.reset()
