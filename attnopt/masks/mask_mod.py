"""A flex_attention call's mask as the graph passes it: the ``mask_mod`` subgraph, the graph values
bound to its extra arguments, and the BlockMask's tensors.

``torch.ops.higher_order.flex_attention`` takes the BlockMask flattened by ``BlockMask.as_tuple()``:
``(q_len, kv_len, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks,
q_indices, full_q_num_blocks, full_q_indices, [write-order metadata,] Q_BLOCK_SIZE, KV_BLOCK_SIZE,
mask_mod)``; torch 2.13 added the write-order entries (None unless asked for), so the tuple is read
from both ends and written in the layout of the torch that runs.

What flex computes from it: a key is kept where its block is listed as full, or listed as partial
and ``mask_mod`` holds; unlisted blocks are skipped. So the mask_mod alone is the mask only where the
block lists agree with it (every block with a kept key listed, full blocks entirely kept), which is
what ``create_block_mask`` builds; lowerings that drop the block mask check that on the device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

BLOCK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices")


@dataclass(frozen=True)
class BlockMaskArgs:
    """The BlockMask of a flex call: sequence lengths it was made for, its block lists (graph
    values, or None where the BlockMask has none) and its (Q, KV) block sizes."""

    seq_lengths: tuple[Any, Any]
    tensors: tuple[Optional[Node], ...]  # in BLOCK_TENSORS order
    block_size: tuple[int, int]

    def get(self, name: str) -> Optional[Node]:
        """The block tensor called ``name`` in ``BLOCK_TENSORS``."""
        return self.tensors[BLOCK_TENSORS.index(name)]


@dataclass(frozen=True)
class MaskMod:
    """A flex call's mask: ``graph`` computes keep(b, h, q_idx, kv_idx, *buffers) for scores of
    ``sizes`` (B, H, Sq, Sk), with ``buffers`` the graph values the call binds, under ``block_mask``."""

    graph: GraphModule
    buffers: tuple[Node, ...]
    block_mask: BlockMaskArgs
    sizes: tuple[Any, Any, Any, Any]


def read_block_mask(items: tuple) -> Optional[tuple[BlockMaskArgs, Node]]:
    """(block mask, mask_mod get_attr node) from the HOP's flattened BlockMask, None if it has
    another form."""
    if len(items) < 13:
        return None
    q_len, kv_len, *middle = items[:10]
    q_block, kv_block, mask_mod = items[-3:]
    if not all(isinstance(x, int) for x in (q_block, kv_block)) or not isinstance(mask_mod, Node) \
            or mask_mod.op != "get_attr" or any(x is not None and not isinstance(x, Node) for x in middle) \
            or middle[0] is None or middle[1] is None:
        return None
    return BlockMaskArgs((q_len, kv_len), tuple(middle), (q_block, kv_block)), mask_mod


@functools.lru_cache(maxsize=1)
def _layout() -> tuple[int, tuple[int, ...], tuple[int, int]]:
    """(length, positions of BLOCK_TENSORS, positions of the block sizes) of this torch's
    ``BlockMask.as_tuple()``, read off a one-block BlockMask."""
    from torch.nn.attention.flex_attention import BlockMask

    one = torch.ones(1, 1, 1, dtype=torch.int32)
    index = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(one, index, one.clone(), index.clone(), BLOCK_SIZE=(3, 5), seq_lengths=(7, 11))
    items = bm.as_tuple()
    tensors = tuple(next(i for i, x in enumerate(items) if x is getattr(bm, name)) for name in BLOCK_TENSORS)
    return len(items), tensors, (items.index(3), items.index(5))


def block_mask_tuple(seq_lengths: tuple[Any, Any], tensors: tuple[Node, ...], block_size: tuple[int, int],
                     mask_mod: Node) -> tuple:
    """The flattened BlockMask the flex HOP of this torch takes (no write-order metadata)."""
    length, positions, (qb, kvb) = _layout()
    items: list[Any] = [None] * length
    items[0], items[1] = seq_lengths
    for i, t in zip(positions, tensors):
        items[i] = t
    items[qb], items[kvb], items[-1] = block_size[0], block_size[1], mask_mod
    return tuple(items)


__all__ = ["BLOCK_TENSORS", "BlockMaskArgs", "MaskMod", "block_mask_tuple", "read_block_mask"]
