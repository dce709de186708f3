"""Graph helpers shared by the recognisers, the mask analysis and the passes."""
from .build import Builder, erase_if_dead, meta_key
from .grad import may_mask, may_require_grad
from .writes import Writes, written_args

__all__ = ["Builder", "Writes", "erase_if_dead", "may_mask", "may_require_grad", "meta_key", "written_args"]
