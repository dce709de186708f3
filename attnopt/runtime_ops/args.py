"""The arguments of ``attnopt::attention``, declared once.

``ARGS`` is the only place an argument is named, typed, defaulted and documented: the op's
schema (and its backward's), the kernels' and autograd's reading of a call (:class:`Call`), and the
Python front's signature and docstring are all derived from it. New arguments go at the end, with
a default, so that graphs and callers written against the older schema keep their meaning.
"""
from __future__ import annotations

import collections
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import Tensor

_REQUIRED = inspect.Parameter.empty

# Python annotations for the schema types used below.
_ANNOTATIONS = {
    "Tensor": Tensor, "Tensor?": Optional[Tensor], "float": float, "float?": Optional[float], "bool": bool,
    "str": str, "str?": Optional[str], "int[2]": Sequence[int], "SymInt?": Optional[int],
}


@dataclass(frozen=True)
class Arg:
    """One argument: its schema name and type, default, and what it means."""

    name: str
    type: str  # torch.library schema type
    default: Any = _REQUIRED
    doc: str = ""
    front: Optional[str] = None  # its name in the Python front when that differs; "" keeps it out of the front

    def schema(self) -> str:
        if self.default is _REQUIRED:
            return f"{self.type} {self.name}"
        return f"{self.type} {self.name}={_schema_literal(self.default)}"

    @property
    def is_tensor(self) -> bool:
        return self.type.startswith("Tensor")


def _schema_literal(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value)


ARGS: tuple[Arg, ...] = (
    Arg("query", "Tensor", doc="[B, Hq, Sq, Dqk] in the order ``layout`` names ([T, Hq, Dqk] for 'thd'), any strides"),
    Arg("key", "Tensor", doc="[B, Hkv, Sk, Dqk] likewise; query head h reads key/value head h // (Hq // Hkv)"),
    Arg("value", "Tensor", doc="[B, Hkv, Sk, Dv] likewise; Dv may differ from Dqk (MLA)"),
    Arg("attn_mask", "Tensor?", None,
        "bool (True = attend) or additive (query's dtype or float32), broadcast to [B, Hq, Sq, Sk]; an "
        "additive mask may require grad (a learned bias: its gradient comes back in the mask's own shape)"),
    Arg("dropout_p", "float", 0.0, "dropout probability on the attention weights"),
    Arg("is_causal", "bool", False, "keep keys at or left of the diagonal ``causal_align`` places"),
    Arg("scale", "float?", None, "score scale; None means 1 / sqrt(Dqk)"),
    Arg("layout", "str", "bhsd", "where the head axis is: 'bhsd', 'bshd', 'sbhd' or packed 'thd'"),
    Arg("out_layout", "str?", None, "the output's layout (contiguous in it); None means ``layout``"),
    Arg("causal_align", "str", "top_left",
        "'top_left' (SDPA) or 'bottom_right' (flash-attn): where the diagonal sits when Sq != Sk"),
    Arg("window_size", "int[2]", (-1, -1), "(left, right) keys kept around the diagonal; -1 is unbounded"),
    Arg("cu_seqlens_q", "Tensor?", None, "'thd' only: int32 [N+1] offsets of the packed query sequences"),
    Arg("cu_seqlens_k", "Tensor?", None, "'thd' only: int32 [N+1] offsets of the packed key sequences"),
    Arg("max_seqlen_q", "SymInt?", None, "'thd' only: the longest query sequence"),
    Arg("max_seqlen_k", "SymInt?", None, "'thd' only: the longest key sequence"),
    Arg("kernel_name", "str", "auto", "force one of ``KERNEL_NAMES``; 'auto' runs the first that is exact",
        front="kernel"),
    Arg("seqused_k", "Tensor?", None,
        "int32 [B]: batch b attends to its first seqused_k[b] keys (a partly filled cache), 0 <= seqused_k <= Sk"),
    Arg("softcap", "float", 0.0, "> 0 caps the scaled scores to softcap * tanh(scores / softcap) (Gemma 2)"),
    Arg("empty_rows", "str", "zero",
        "what a query row gives whose keys are all masked: 'zero' (SDPA: out 0, no gradient); 'nan' as "
        "softmax(s.masked_fill(~keep, -inf)) @ v in eager (out NaN; dV NaN over the row's batch (sequence for "
        "'thd') and key/value head); 'nan_additive' as softmax(s + bias) @ v with -inf in the bias (also dQ of "
        "the row, dK over its batch and key/value head, and the mask's gradient fed by the row NaN)"),
    Arg("sinks", "Tensor?", None,
        "[Hq] learned per-head logits in every row's softmax denominator, with no value (GPT-OSS): "
        "p = exp(s - m) / (sum exp(s - m) + exp(sinks[h] - m)); float32 or the query's dtype; may require grad"),
    Arg("mask_grad", "bool", False,
        "run a kernel whose backward returns attn_mask's gradient; the op's autograd sets it when the mask "
        "requires grad", front=""),
    Arg("mask_fill", "float?", None,
        "the score a key masked by a bool attn_mask or the band takes: None drops it (-inf); a finite value "
        "keeps it in the softmax with that score, as s.masked_fill(~keep, fill) does (Megatron's -10000.0). "
        "Where the scores provably cannot reach within the float's underflow of the fill and every row keeps a "
        "key (checked per call: one host read), the fill acts as -inf and any kernel runs; else the math kernel"),
)

NAMES: tuple[str, ...] = tuple(a.name for a in ARGS)
INDEX: dict[str, int] = {n: i for i, n in enumerate(NAMES)}
DEFAULTS: tuple = tuple(a.default for a in ARGS)
TENSORS: tuple[int, ...] = tuple(i for i, a in enumerate(ARGS) if a.is_tensor)
SCHEMA: str = ", ".join(a.schema() for a in ARGS)

Call = collections.namedtuple("Call", NAMES)
Call.__doc__ = "One call's arguments by name (see ``ARGS``)."


def complete(args: tuple) -> Call:
    """A call as the dispatcher delivers it (positional, trailing defaults dropped), defaults filled."""
    return Call._make(args + DEFAULTS[len(args):])


def bind(args: Sequence, kwargs: dict) -> Call:
    """A call given positionally and by keyword, by op or front names (slow path: checks every name)."""
    if len(args) > len(NAMES):
        raise TypeError(f"attnopt.attention() takes at most {len(NAMES)} arguments, got {len(args)}")
    values = dict(zip(NAMES, args))
    for name, value in kwargs.items():
        name = FRONT_TO_OP.get(name, name)
        if name not in INDEX:
            raise TypeError(f"attnopt.attention() got an unexpected keyword argument {name!r}")
        if name in values:
            raise TypeError(f"attnopt.attention() got multiple values for argument {name!r}")
        values[name] = value
    missing = [a.name for a in ARGS if a.default is _REQUIRED and a.name not in values]
    if missing:
        raise TypeError(f"attnopt.attention() missing required arguments: {', '.join(missing)}")
    return Call._make(values.get(a.name, a.default) for a in ARGS)


# The Python front: the first POSITIONAL arguments (SDPA's) may be given by position, the rest by keyword.
POSITIONAL = INDEX["scale"] + 1
FRONT_TO_OP: dict[str, str] = {a.front: a.name for a in ARGS if a.front}


def front_signature(*extra: inspect.Parameter) -> inspect.Signature:
    """The front's signature: the table's public arguments under their front names, then ``extra``."""
    params = []
    for i, a in enumerate(ARGS):
        if a.front == "":
            continue
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if i < POSITIONAL else inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(a.front or a.name, kind, default=a.default, annotation=_ANNOTATIONS[a.type]))
    return inspect.Signature([*params, *extra])


def front_doc(summary: str) -> str:
    """``summary`` followed by one line per public argument, from the table."""
    lines = [summary.rstrip(), "", "Arguments:"]
    lines += [textwrap.fill(f"{a.front or a.name}: {a.doc}", 100, initial_indent="    ", subsequent_indent="        ")
              for a in ARGS if a.front != ""]
    return "\n".join(lines)
