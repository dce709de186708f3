"""attnopt under torch.distributed: DTensor sharding rules for the attention ops (tensor parallel
over heads) and their place in torch's context-parallel dispatch (sequence-sharded q/k/v), with
``shard_packed`` / ``unshard_packed`` for packed documents and ``set_kv_exchange`` to force the ring
or the all-gather.

Imported by ``attnopt`` itself so that both are in place before any DTensor reaches the op; a
torch built without distributed support skips them. Both hook into torch internals (the DTensor
op-strategy table, context parallel's dispatch table): on a torch whose internals differ, attnopt
still imports and works on one device, and says once that these two features are off.
"""
import warnings

import torch

if torch.distributed.is_available():
    try:
        from . import context_parallel, sharding
        from .exchange import set_kv_exchange  # noqa: F401  (public)
        from .packed import PackedShards, shard_packed, unshard_packed  # noqa: F401  (public)

        sharding.register()
        context_parallel.register()
    except (ImportError, AttributeError) as e:
        warnings.warn(f"attnopt: DTensor sharding and context parallel support are off with torch "
                      f"{torch.__version__}: {type(e).__name__}: {e}", stacklevel=2)
