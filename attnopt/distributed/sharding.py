"""DTensor sharding rules for ``attnopt::attention`` and its backward, so tensor-parallel attention
runs on each rank's own heads instead of gathering q, k and v.

Registered the way aten's SDPA rules are (torch/distributed/tensor/_ops/_matrix_ops.py), with every
non-tensor argument in the sharding cache key. ``register_sharding`` would derive a key that starts
at the first int argument, so schemas differing only in ``layout`` compare equal, and where DTensor
falls back to its Python cache two such calls would share one decision.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, PlacementList, RuntimeSchemaInfo
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy, register_op_strategy
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

from .. import runtime_ops  # noqa: F401  (defines the ops registered here)

HEAD_DIM = {"bhsd": 1, "bshd": 2, "sbhd": 2, "thd": 1}
BATCH_DIM = {"bhsd": 0, "bshd": 0, "sbhd": 1}
SEQ_DIM = {"bhsd": 2, "bshd": 1, "sbhd": 0, "thd": 0}
# Tensors read in the query's layout; the rest are named below or replicated.
_IN_LAYOUT = ("query", "key", "value")
_OUT_LAYOUT = ("grad_out", "out")


def bind(op: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by schema name, defaults filled, so that arguments added at the end of the
    schema (or passed by keyword) do not shift what the rules read."""
    bound = {}
    for i, arg in enumerate(op._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def static_names(op: torch._ops.OpOverload) -> list[str]:
    """The op's non-tensor arguments (layout, causal flags, window, scale, softcap, ...)."""
    return [a.name for a in op._schema.arguments if "Tensor" not in str(a.type)]


def tensor_arg_names(op_schema: OpSchema) -> list[str]:
    """Names of the DTensor arguments in the order DTensor lists their strategies: positional, then keyword."""
    names = [a.name for a in op_schema.op._schema.arguments]
    positional = [names[i] for i, a in enumerate(op_schema.args_schema) if isinstance(a, OpStrategy)]
    return positional + [k for k, v in op_schema.kwargs_schema.items() if isinstance(v, OpStrategy)]


def _mask_axis(mask: OpStrategy, axis_from_end: int) -> Placement:
    """Shard the mask along the batch (4 from the end) or head (3 from the end) axis it broadcasts over,
    or replicate it where that axis is absent or has size 1."""
    dim = mask.ndim - axis_from_end
    return Shard(dim) if dim >= 0 and mask.shape[dim] != 1 else Replicate()


def _placements(kind: str, args: dict[str, object], names: list[str], outputs: tuple[str, ...],
                kv_sharded: bool = True) -> PlacementList:
    """One single-mesh-dim strategy: placements of the outputs, then of the DTensor inputs by name."""
    layout = args["layout"]
    out_layout = args["out_layout"] or layout
    thd = layout == "thd"
    if kind == "heads":
        dim, out_dim, lse = HEAD_DIM[layout], HEAD_DIM[out_layout], Shard(0 if thd else 1)
        mask_from_end, per_batch = 3, Replicate()
    else:
        dim, out_dim, lse = BATCH_DIM[layout], BATCH_DIM[out_layout], Shard(0)
        mask_from_end, per_batch = 4, Shard(0)
    by_name: dict[str, Placement] = {n: Shard(dim) for n in _IN_LAYOUT}
    by_name.update({n: Shard(out_dim) for n in _OUT_LAYOUT}, lse=lse, seqused_k=per_batch)
    grads = {"dq": by_name["query"], "dk": by_name["key"], "dv": by_name["value"]}
    if not kv_sharded:
        # Each rank holds the whole kv head but only its query heads' share of that head's gradient.
        by_name["key"] = by_name["value"] = Replicate()
        grads["dk"] = grads["dv"] = Partial()
    mask = args.get("attn_mask")
    if isinstance(mask, OpStrategy):
        by_name["attn_mask"] = _mask_axis(mask, mask_from_end)
        if _mask_has_grad(args, mask):  # a mask whole on every rank gets a share of its gradient from each
            grads["dmask"] = by_name["attn_mask"] if isinstance(by_name["attn_mask"], Shard) else Partial()
    if isinstance(args.get("sinks"), OpStrategy):  # one logit per query head; batch shards share its gradient
        by_name["sinks"] = Shard(0) if kind == "heads" else Replicate()
        grads["dsinks"] = Shard(0) if kind == "heads" else Partial()
    absent = _absent_outputs(args)
    return ([None if o in absent else grads.get(o, by_name.get(o, Replicate())) for o in outputs]
            + [by_name.get(n, Replicate()) for n in names])


def _mask_has_grad(args: dict[str, object], mask: object) -> bool:
    """Whether the backward returns the mask's gradient: an additive mask the autograd asked it for."""
    return (isinstance(mask, OpStrategy) and bool(args.get("mask_grad"))
            and mask.strategies[0].output_spec.tensor_meta.dtype != torch.bool)


def _absent_outputs(args: dict[str, object]) -> set[str]:
    """The backward's optional outputs this call leaves None."""
    absent = set() if _mask_has_grad(args, args.get("attn_mask")) else {"dmask"}
    return absent if args.get("sinks") is not None else absent | {"dsinks"}


def _even_heads(names: list[str], layout: str) -> Callable[[list[DTensorSpec], object], bool]:
    """Head sharding must split Hq and Hkv into equal contiguous blocks, so that every rank keeps the
    query head h -> key/value head h // (Hq / Hkv) correspondence; DTensor itself allows uneven shards."""
    dim = HEAD_DIM[layout]
    checked = [i for i, n in enumerate(names) if n in _IN_LAYOUT]

    def valid(input_specs: list[DTensorSpec], _outputs: object) -> bool:
        for i in checked:
            spec = input_specs[i]
            shards = spec.num_shards_map[dim]
            if shards > 1 and spec.tensor_meta.shape[dim] % shards != 0:
                return False
        return True

    return valid


def _strategy(outputs: tuple[str, ...]) -> Callable[[OpSchema], OpStrategy]:
    def strategy(op_schema: OpSchema) -> OpStrategy:
        args = bind(op_schema.op, op_schema.args_schema, op_schema.kwargs_schema)
        names = tensor_arg_names(op_schema)
        layout = args["layout"]
        absent = _absent_outputs(args)
        replicated = [None if o in absent else Replicate() for o in outputs] + [Replicate()] * len(names)
        strategies = [replicated, _placements("heads", args, names, outputs)]
        key: Optional[OpStrategy] = args["key"] if isinstance(args["key"], OpStrategy) else None
        if key is not None and key.shape[HEAD_DIM[layout]] == 1:
            # MQA: every query head reads the one key/value head, which each rank can hold whole.
            strategies.append(_placements("heads", args, names, outputs, kv_sharded=False))
        if layout != "thd":
            strategies.append(_placements("batch", args, names, outputs))
        return expand_to_full_mesh_op_strategy(
            op_schema.get_mesh_from_args(validate=False), op_schema, strategies, input_index=len(outputs),
            is_valid_strategy_cb=_even_heads(names, layout),
        )

    return strategy


def _schema_info(op: torch._ops.OpOverload) -> RuntimeSchemaInfo:
    """Every non-tensor argument is part of the sharding cache key."""
    names = static_names(op)
    first = [a.name for a in op._schema.arguments].index(names[0])
    return RuntimeSchemaInfo(static_argnum=first, static_kwargkey=names)


def register() -> None:
    """Register the rules for both ops (idempotent: a second registration replaces the first)."""
    forward, backward = torch.ops.attnopt.attention.default, torch.ops.attnopt.attention_backward.default
    register_op_strategy(forward, schema_info=_schema_info(forward))(_strategy(("out", "lse", "rng_state")))
    register_op_strategy(backward, schema_info=_schema_info(backward))(_strategy(("dq", "dk", "dv", "dmask", "dsinks")))
