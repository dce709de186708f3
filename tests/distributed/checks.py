"""What the two-rank tests (CPU and GPU) run and how they judge it."""
from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate, Shard

from . import llama

# FSDP2 over a dp=1 mesh dim composed with tensor parallel over tp=2 (fully_shard refuses the TP mesh
# itself: "Cannot concatenate overlapping meshes"), and FSDP2 alone sharding over both ranks.
MESHES = [(1, 2), (2, 1)]


def by_mesh(per_rank: list[list[dict]], meshes: list[tuple[int, int]]) -> dict[tuple[int, int], list[dict]]:
    """Each rank's list of runs regrouped as each run's list of ranks."""
    return {m: [rank[i] for rank in per_rank] for i, m in enumerate(meshes)}


def check_training(ranks: list[dict], tp: int, want: list[float], rtol: float = 1e-5) -> None:
    """Every rank saw the single-process losses, and attnopt rewrote both attention sites of its graph."""
    for rank in ranks:
        torch.testing.assert_close(rank["losses"], want, rtol=rtol, atol=rtol)
        sites = [s for g in rank["graphs"] for s in g["sites"]]
        # per rank: HEADS/tp query heads read KV_HEADS/tp kv heads natively: repeat_kv (group 2) removed
        assert sites == [("lowered", (llama.HEADS // tp, llama.KV_HEADS // tp), 2, None)] * 2, sites
        assert all(g["overhead_left"] == [] for g in rank["graphs"])  # no copy or K/V repeat left
        assert sum(g["attnopt_calls"] for g in rank["graphs"]) == 2


# attnopt.attention on head-sharded DTensors: GQA with kv heads split (bhsd, bshd -> bhsd) and MQA with
# the kv head replicated (sbhd) run without collectives; Hkv = 3 cannot be split in two, so DTensor gathers.
TP_CASES = [
    dict(shapes=[(2, 4, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8)], head_dim=1, kv_placement=[Shard(1)], is_causal=True),
    dict(shapes=[(2, 16, 4, 8), (2, 16, 2, 8), (2, 16, 2, 8)], head_dim=2, kv_placement=[Shard(2)], layout="bshd",
         out_layout="bhsd"),
    dict(shapes=[(16, 2, 4, 8), (16, 2, 1, 8), (16, 2, 1, 8)], head_dim=2, kv_placement=[Replicate()], layout="sbhd",
         is_causal=True),
    dict(shapes=[(2, 6, 16, 8), (2, 3, 16, 8), (2, 3, 16, 8)], head_dim=1, kv_placement=[Shard(1)]),
]
