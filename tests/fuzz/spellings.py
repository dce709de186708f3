"""Generated attention modules: the spellings attnopt claims, and near misses of each.

A case is a ``Spec``: sizes plus one named ``Choice`` per component of an attention block (how
q/k/v are produced, K/V repetition, the mask, the attention itself, the output, in-place
writes). ``specs`` draws them with hypothesis; ``render`` turns one into standalone Python
source defining ``Model``, ``make_model()`` and ``make_inputs()``, so that a failing case prints
as code anyone can run.

Every case holds exactly one attention site. A choice is a *decoy* when it is a near miss of a
claimed spelling (a different head order, a strict band, a value-changing cast, an in-place
write...): attnopt may lower it or not, but must compute what the code computes. The
``focus`` of a case is the one component allowed to draw decoys; the others draw claimed
spellings only, so each decoy is tried inside otherwise ordinary attention.
"""
from __future__ import annotations

import abc
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from hypothesis import strategies as st

FAMILIES = ("sdpa", "hand", "megatron")
COMPONENTS = ("produce", "repeat", "mask", "core", "output", "inplace")


@dataclass(frozen=True)
class Choice:
    """One component's spelling: its name, whether it is a decoy, and its drawn parameters."""

    name: str
    decoy: bool = False
    params: tuple = ()  # sorted (key, value) pairs: hashable and printable

    def __getitem__(self, key: str) -> Any:
        return dict(self.params)[key]

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.name}{'*' if self.decoy else ''}({args})"


def _choice(name: str, decoy: bool = False, **params: Any) -> Choice:
    return Choice(name, decoy, tuple(sorted(params.items())))


@dataclass(frozen=True)
class Spec:
    """One generated case."""

    family: str  # sdpa | hand | megatron (3-D [B*H, S, D] products)
    focus: str  # the component that may be a decoy
    b: int
    h: int
    g: int  # kv heads
    sq: int
    sk: int
    d: int
    dv: int  # V's head dim: D, or less (MLA)
    seed: int  # of the case's weights and inputs
    origin: str  # the RandomDraw seed the case was built from ("" when hypothesis made the choices)
    arg: str  # name of the first forward argument ("input" as nn.Linear names it)
    noncontiguous: bool  # inputs handed over as transposed views
    linear_bias: bool
    dynamic: bool  # sizes read from the inputs and compiled/exported with dynamic shapes
    grad: bool  # False: inference (no input or parameter requires grad), forward compared only
    produce: Choice
    repeat: Choice
    mask: Choice
    core: Choice
    output: Choice
    inplace: Choice

    @property
    def decoy(self) -> bool:
        return any(getattr(self, c).decoy for c in COMPONENTS)

    @property
    def category(self) -> str:
        return self.focus

    @property
    def spelling(self) -> str:
        return f"{self.focus}:{getattr(self, self.focus).name}"

    def describe(self) -> str:
        parts = [f"{c}={getattr(self, c)}" for c in COMPONENTS]
        return (f"{self.family} B={self.b} H={self.h} G={self.g} Sq={self.sq} Sk={self.sk} D={self.d} "
                f"Dv={self.dv} seed={self.seed} origin={self.origin!r} arg={self.arg} "
                f"noncontiguous={self.noncontiguous} dynamic={self.dynamic} grad={self.grad} " + " ".join(parts))


# ---------------------------------------------------------------------------------------------
# what each component may be
# ---------------------------------------------------------------------------------------------
_BSHD_STAGE = ("linear_bshd", "fused_split", "inputs_bshd")  # K/V exist as [B, S, G, D] on the way
_SELF_ONLY = ("fused_unbind", "fused_chunk", "fused_split")

TRUE_MASKS = ("none", "causal", "window", "bottom_right", "chunked", "padding", "documents", "all_true",
              "causal_flag", "mask_and_causal_flag", "cache_position", "cache_length")
DECOY_MASKS = ("strict_lower", "strict_upper", "strict_band", "empty_rows", "random_input", "per_batch",
               "edited_in_place", "bool_vs_number", "small_int_wrap", "float_to_int", "documents_reindexed",
               "learned_bias", "extra_score_term", "left_padding", "cache_overflow")
HAND_DECOYS = ("int_cast", "float32_round_trip", "bfloat16_round_trip", "floor_div", "probs_changed",
               "softmax_other_dim", "weights_returned", "finite_fill", "softcap_after_mask", "softcap_mismatch")


class Draw(abc.ABC):
    """The kinds of choice a case is built from, made by hypothesis or by a seeded RNG."""

    @abc.abstractmethod
    def pick(self, options: Sequence[Any]) -> Any:
        """One of ``options``."""

    @abc.abstractmethod
    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""

    def bool(self) -> bool:
        return self.int(0, 1) == 1


class HypothesisDraw(Draw):
    """Choices hypothesis makes, and can shrink."""

    def __init__(self, draw: Callable) -> None:
        self.draw = draw

    def pick(self, options: Sequence[Any]) -> Any:
        return self.draw(st.sampled_from(list(options)))

    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))


class RandomDraw(Draw):
    """Choices from a seeded RNG: uniform over the spellings, where hypothesis' own choices
    revisit a few of them (it mutates earlier examples), which a fuzzer of costly cases cannot
    afford. Only the seed shrinks. ``build_spec(RandomDraw(spec.origin), spec.family)`` rebuilds a
    case."""

    def __init__(self, seed: str) -> None:
        self.seed = seed
        self.rng = random.Random(seed)

    def pick(self, options: Sequence[Any]) -> Any:
        return self.rng.choice(list(options))

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


def _produce_options(family: str, g: int, h: int, cross: bool, mla: bool) -> list[tuple[str, bool]]:
    names = ["linear_bshd", "linear_sbhd", "fused_split", "inputs_bshd", "inputs_bhsd"]
    if g == h and not mla:
        names += ["fused_unbind", "fused_chunk"]
    if family == "megatron":
        names.append("megatron_sbhd")
    if cross:
        names = [n for n in names if n not in _SELF_ONLY]
    return [(n, False) for n in names] + [("nonunit_head_dim", True)]


def _repeat_options(family: str, produce: str, g: int, h: int) -> list[tuple[str, bool]]:
    if g == h:
        return [("none", False)]
    if produce == "megatron_sbhd":
        return [("repeat_interleave", False), ("tile_repeat", True)]
    names = ["repeat_kv_unsqueeze", "repeat_kv_getitem", "repeat_interleave", "broadcast_flatten"]
    if produce in _BSHD_STAGE:
        names.append("repeat_kv_bshd")
    if g == 1:
        names.append("mqa_expand")
    if family == "sdpa":
        names.append("enable_gqa")
    return [(n, False) for n in names] + [(n, True) for n in ("tile_repeat", "wrong_axis", "mixed")]


def _mask_options(family: str, sq: int, sk: int, produce: str, mla: bool) -> list[tuple[str, bool]]:
    out = []
    for name in TRUE_MASKS:
        if name in ("causal_flag", "mask_and_causal_flag") and family != "sdpa":
            continue
        if name == "mask_and_causal_flag" and (produce == "nonunit_head_dim" or mla):
            continue  # eager runs SDPA's math kernel there, which refuses a mask with is_causal
        if name == "documents" and sq != sk:
            continue
        if name in ("bottom_right", "cache_position", "cache_length") and sq > sk:
            continue
        out.append((name, False))
    for name in DECOY_MASKS:
        if name == "documents_reindexed" and sq != sk:
            continue
        if name == "extra_score_term" and family == "megatron":
            continue
        out.append((name, True))
    return out


def _core_options(family: str) -> list[tuple[str, bool]]:
    if family == "sdpa":
        return [("sdpa", False)]
    true = [("matmul", False)] if family == "hand" else [("baddbmm", False), ("bmm", False), ("matmul3d", False)]
    return true + [(n, True) for n in HAND_DECOYS]


def _output_options(family: str, produce: str, mla: bool) -> list[tuple[str, bool]]:
    true = [(n, False) for n in ("bshd_reshape", "flatten", "sbhd", "raw", "read_twice")]
    if produce != "megatron_sbhd" and not mla:  # attention reading attention: q is the first output
        true.append(("attend_again", False))
    decoys = ["write_copy_reread", "write_chain_end"]
    if family != "sdpa":  # SDPA saves its output for backward: writing it fails in eager
        decoys += ["write_output_after_copy", "write_view_after_copy"]
    return true + [(n, True) for n in decoys]


def _inplace_options(produce: str) -> list[tuple[str, bool]]:
    if produce == "megatron_sbhd":  # its operands have no [B, H, S, D] stage to write on
        return [("none", False)]
    out = [("none", False), ("write_copy", True)]
    if produce in ("linear_bshd", "linear_sbhd", "nonunit_head_dim"):  # a fused projection's views (split,
        out.append(("write_source", True))  # unbind) may not be written: autograd refuses
    return out


def _pick(dr: Draw, options: list[tuple[str, bool]], focus: bool) -> tuple[str, bool]:
    """A claimed spelling, or when this component is the focus, a decoy half of the time."""
    true = [o for o in options if not o[1]]
    decoys = [o for o in options if o[1]]
    if focus and decoys and (not true or dr.bool()):
        return dr.pick(decoys)
    return dr.pick(true)


# ---------------------------------------------------------------------------------------------
# parameters of each choice
# ---------------------------------------------------------------------------------------------
def _produce_params(dr: Draw, name: str) -> dict:
    p: dict = {}
    if name == "megatron_sbhd":
        p["rope"] = dr.pick(["none", "before"])
    elif name in ("linear_bshd", "linear_sbhd", "fused_split", "inputs_bshd"):
        p["rope"] = dr.pick(["none", "before", "after"])
    else:
        p["rope"] = dr.pick(["none", "after"])
    if name != "megatron_sbhd":
        p["copy"] = dr.pick(["none", "contiguous", "clone"])
        p["copied"] = dr.pick(["q", "k", "v", "qkv"])
        p["copy_after_rope"] = dr.bool()
    if name == "linear_sbhd":
        p["style"] = dr.pick(["permute", "transpose_transpose"])
    if name == "nonunit_head_dim":
        p["operands"] = dr.pick(["q", "k", "v", "qkv"])
    return p


def _doc_positions(dr: Draw, b: int, s: int) -> list[list[int]]:
    """Position ids that restart at document boundaries (transformers' packed sequences)."""
    rows = []
    for _ in range(b):
        row: list[int] = []
        while len(row) < s:
            n = dr.int(1, s)
            start = dr.pick([0, 0, 0, 3])
            row += list(range(start, start + n))
        rows.append(row[:s])
    return rows


def _mask_params(dr: Draw, name: str, b: int, sq: int, sk: int) -> dict:
    p: dict = {}
    if name == "causal":
        p["spelling"] = dr.int(0, 6)
    elif name in ("strict_lower", "strict_upper"):
        p["spelling"] = dr.int(0, 4)
    elif name in ("window", "chunked", "padding", "small_int_wrap", "bool_vs_number", "edited_in_place"):
        p["spelling"] = dr.int(0, 3)
    if name == "window":
        p["window"] = dr.int(1, max(1, sq))
    if name == "chunked":
        p["chunk"] = dr.int(1, 4)
        p["causal"] = dr.bool()
    if name in ("padding", "left_padding"):
        p["lengths"] = tuple(dr.int(1, sk) for _ in range(b))
        p["causal"] = name == "left_padding" or dr.bool()
        p["dtype"] = dr.pick(["int64", "bool"])
    if name == "documents_reindexed":
        p["how"] = dr.pick(["slice_positions", "step_positions", "flip_positions", "slice_ids", "flip_ids",
                            "reverse_index_ids"])
    if name in ("documents", "documents_reindexed"):
        length = {"slice_positions": sq + 1, "slice_ids": sq + 1, "step_positions": 2 * sq}.get(p.get("how"), sq)
        rows = 1 if b > 1 and dr.int(0, 3) == 0 else b  # [1, S] position ids broadcast over the batch
        p["positions"] = tuple(tuple(r) for r in _doc_positions(dr, rows, length))
        bands = ["none", "index_causal"]  # over positions too, where the positions match the document ids
        if name == "documents" or p["how"] not in ("slice_ids", "step_positions"):
            bands += ["position_causal", "position_window", "position_chunk"]
        p["band"] = dr.pick(bands)
        p["window"] = dr.int(1, 4)
        p["chunk"] = dr.int(1, 4)
    if name == "mask_and_causal_flag":
        p["inner"] = dr.pick(["padding", "window", "causal"])
        p["window"] = dr.int(1, max(1, sq))
        p["lengths"] = tuple(dr.int(1, sk) for _ in range(b))
    if name == "edited_in_place":
        p["edit"] = dr.pick(["point_false", "column_true", "row_true", "fill_false"])
        p["row"] = dr.int(0, sq - 1)
        p["col"] = dr.int(0, sk - 1)
    if name == "bool_vs_number":
        p["compare"] = dr.pick(["ne_0", "eq_1", "to_int64_bool", "eq_2", "lt_1", "gt_0_int8"])
    if name == "small_int_wrap":
        p["dtype"] = dr.pick(["uint8", "int8", "int16"])
        p["wrap"] = dr.pick(["scaled", "offset"])
    if name == "float_to_int":
        p["how"] = dr.pick(["trunc_difference", "scaled_keep", "bfloat16_positions", "float32_positions",
                            "bfloat16_compare"])
        p["factor"] = dr.pick([0.5, 1.5])
    if name == "learned_bias":
        p["with_causal"] = dr.bool()
    if name == "strict_band":
        p["width"] = dr.int(1, 4)
    if name == "empty_rows":
        p["from_row"] = dr.int(1, 3)
    if name in ("cache_position", "cache_length"):  # queries at cache positions L.., L + Sq <= Sk
        p["cached"] = dr.int(0, sk - sq)
    if name == "cache_overflow":  # the new tokens run past the end of the cache
        p["cached"] = dr.int(max(sk - sq + 1, 1), sk + 2)
    return p


def _mask_form(dr: Draw, family: str, mask: str) -> str:
    if mask in ("none", "causal_flag", "learned_bias", "extra_score_term"):
        return "none"
    if family == "sdpa":
        return dr.pick(["bool", "bool", "additive_inf", "additive_min", "additive_tensor0", "additive_masked_fill"])
    return dr.pick(["masked_fill", "masked_fill_not", "masked_fill_inplace", "where", "additive_inf",
                    "additive_min"])


def _core_params(dr: Draw, family: str, name: str) -> dict:
    if family == "sdpa":
        return {"call": dr.pick(["keyword", "positional", "module_path"]),
                "scale": dr.pick([None, "rsqrt", 0.3]),
                "dropout": dr.pick(["absent", "zero", "training"]),
                "pad_v": dr.bool()}  # MLA: V zero-padded to D for the call, the output sliced back
    p = {"scale_at": dr.pick(["scores", "scores_div", "q", "q_div", "after_mask", "none"]),
         "softmax": dr.pick(["F", "method", "torch", "dtype_same"]),
         "dropout": dr.pick(["absent", "functional", "module"]),
         "pv": dr.pick(["at", "matmul"])}
    if family == "hand":
        p["product"] = dr.pick(["at", "matmul", "transpose_2_3", "permute"])
    else:
        p["product"] = name if name in ("baddbmm", "bmm", "matmul3d") else dr.pick(["baddbmm", "bmm", "matmul3d"])
        p["mask_on_4d"] = dr.bool()
    if name == "float32_round_trip":
        p["where"] = dr.pick(["scores", "softmax_dtype", "probs"])
    if name == "bfloat16_round_trip":
        p["where"] = dr.pick(["scores", "probs"])
    if name == "probs_changed":
        p["op"] = dr.pick(["mul2", "add_eps", "relu"])
    if name == "finite_fill":
        p["fill"] = dr.pick([-10000.0, -1e9])
    cap = name in ("softcap_after_mask", "softcap_mismatch") or dr.int(0, 3) == 0
    p["softcap"] = dr.pick([5.0, 30.0]) if cap and p["scale_at"] != "after_mask" else None
    if name.startswith("softcap") and p["softcap"] is None:
        p["softcap"] = 5.0
        p["scale_at"] = "scores"
    return p


def _output_params(dr: Draw, name: str) -> dict:
    p = {"o_proj": dr.bool() if name not in ("raw",) else False}
    if name == "bshd_reshape":
        p["style"] = dr.pick(["contiguous_reshape", "reshape", "contiguous_view", "minus_one"])
    return p


def _inplace_params(dr: Draw, name: str) -> dict:
    if name == "none":
        return {}
    return {"operand": dr.pick(["q", "k", "v"]),
            "op": dr.pick(["mul_", "relu_", "add_"])}


def build_spec(dr: Draw, family: Optional[str] = None) -> Spec:
    """A case of ``family`` (any family when None) from the choices ``dr`` makes."""
    family = family or dr.pick(FAMILIES)
    # the mask has the most spellings and decoys, SDPA calls themselves none worth a focus
    focus = dr.pick([c for c in COMPONENTS for _ in range(3 if c == "mask" else 1)
                     if not (c == "core" and family == "sdpa")])
    h = dr.int(1, 4)
    g = dr.pick([x for x in range(1, h + 1) if h % x == 0])
    if dr.int(0, 2) == 0:
        g = h  # plain multi-head attention a third of the time
    sq = dr.int(1, 9)
    cross = dr.int(0, 4) == 0
    sk = dr.int(1, 9) if cross else sq
    cross = sk != sq
    d = dr.pick([4, 6, 8])
    dv = d if dr.int(0, 3) else d // 2
    b = dr.int(1, 2)

    name, decoy = _pick(dr, _produce_options(family, g, h, cross, dv != d), focus == "produce")
    produce = _choice(name, decoy, **_produce_params(dr, name))
    name, decoy = _pick(dr, _repeat_options(family, produce.name, g, h), focus == "repeat")
    repeat = _choice(name, decoy)
    name, decoy = _pick(dr, _mask_options(family, sq, sk, produce.name, dv != d), focus == "mask")
    mask = _choice(name, decoy, form=_mask_form(dr, family, name), **_mask_params(dr, name, b, sq, sk))
    name, decoy = _pick(dr, _core_options(family), focus == "core")
    core = _choice(name, decoy, **_core_params(dr, family, name))
    if core.name in ("finite_fill", "softcap_after_mask") and mask.get("form") == "none":
        mask = _choice("causal", False, form="masked_fill", spelling=0)
    name, decoy = _pick(dr, _output_options(family, produce.name, dv != d), focus == "output")
    output = _choice(name, decoy, **_output_params(dr, name))
    name, decoy = _pick(dr, _inplace_options(produce.name), focus == "inplace")
    inplace = _choice(name, decoy, **_inplace_params(dr, name))
    return Spec(family, focus, b, h, g, sq, sk, d, dv, seed=dr.int(0, 2**16),
                origin=dr.seed if isinstance(dr, RandomDraw) else "",
                arg=dr.pick(["x", "x", "input", "hidden_states"]),
                noncontiguous=dr.bool(), linear_bias=dr.bool(), dynamic=dr.int(0, 3) == 0,
                grad=dr.int(0, 4) > 0 if mask.name not in ("cache_position", "cache_length", "cache_overflow")
                else dr.bool(),
                produce=produce, repeat=repeat, mask=mask, core=core, output=output, inplace=inplace)


@st.composite
def specs(draw: Callable, family: Optional[str] = None, uniform: bool = True, salt: int = 0) -> Spec:
    """A random case of ``family``: built from a drawn seed (``uniform``; ``salt`` keeps the runs of
    different processes apart, since hypothesis starts every run from the same simplest seeds), or
    choice by choice through hypothesis (slower to cover the spellings, but every choice shrinks)."""
    if not uniform:
        return build_spec(HypothesisDraw(draw), family)
    return build_spec(RandomDraw(f"{family or 'any'}/{salt}/{draw(st.integers(0, 2**32 - 1))}"), family)


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
_HEADER = '''import math

import torch
import torch.nn.functional as F
from torch import nn

B, H, G, SQ, SK, D, DV = {b}, {h}, {g}, {sq}, {sk}, {d}, {dv}
R, E, EV = H // G, H * D, H * DV
'''

_ROTATE = '''

def rotate_half(t):
    return torch.cat((-t[..., D // 2:], t[..., : D // 2]), dim=-1)
'''


class _Renderer:
    """Builds the source of one case, component by component."""

    def __init__(self, spec: Spec) -> None:
        self.s = spec
        self.init: list[str] = []
        self.body: list[str] = []
        self.args: list[tuple[str, str]] = []  # (forward argument, expression building it)
        self.outputs: list[str] = []
        self.rope = False

    # -- helpers -----------------------------------------------------------------------------
    def line(self, text: str) -> None:
        self.body.append(text)

    def param(self, text: str) -> None:
        self.init.append(text)

    def tensor_input(self, name: str, shape: str, alt: Optional[tuple[str, str]] = None) -> None:
        """A float64 input (requiring grad unless the case is inference); non-contiguous (built in
        ``alt``'s order and permuted back) when the spec asks for it."""
        grad = ".requires_grad_()" if self.s.grad else ""
        if self.s.noncontiguous and alt is not None:
            expr = f"torch.randn({alt[0]}, generator=gen, dtype=torch.float64).{alt[1]}{grad}"
        else:
            expr = f"torch.randn({shape}, generator=gen, dtype=torch.float64){grad}"
        self.args.append((name, expr))

    # -- q, k, v -------------------------------------------------------------------------------
    def produce(self) -> None:
        s, p = self.s, self.s.produce
        name = p.name
        bias = s.linear_bias
        first = s.arg
        if name in ("linear_sbhd", "megatron_sbhd"):
            self.tensor_input(first, "SQ, B, E", ("B, SQ, E", "transpose(0, 1)"))
            mem = first
            if s.sq != s.sk:
                self.tensor_input("memory", "SK, B, E", ("B, SK, E", "transpose(0, 1)"))
                mem = "memory"
        elif name.startswith("inputs_"):
            dims = ("B, SQ, H, D", "B, SK, G, D", "B, SK, G, DV") if name == "inputs_bshd" else \
                ("B, H, SQ, D", "B, G, SK, D", "B, G, SK, DV")
            for arg, shape in ((first if first != "x" else "query", dims[0]), ("key", dims[1]),
                               ("value", dims[2])):
                a = [x.strip() for x in shape.split(",")]
                alt = (", ".join([a[0], a[2], a[1], a[3]]), "transpose(1, 2)")
                self.tensor_input(arg, shape, alt)
            q_in, k_in, v_in = (a for a, _ in self.args)
        else:
            self.tensor_input(first, "B, SQ, E", ("SQ, B, E", "transpose(0, 1)"))
            mem = first
            if s.sq != s.sk:
                self.tensor_input("memory", "B, SK, E", ("SK, B, E", "transpose(0, 1)"))
                mem = "memory"

        if s.dynamic:
            self.read_sizes()
        if name in ("linear_bshd", "linear_sbhd", "nonunit_head_dim", "megatron_sbhd"):
            self.param(f"self.q_proj = nn.Linear(E, H * D, bias={bias})")
            self.param(f"self.k_proj = nn.Linear(E, G * D, bias={bias})")
            self.param(f"self.v_proj = nn.Linear(E, G * DV, bias={bias})")
            self.line(f"q_lin = self.q_proj({first})")
            self.line(f"k_lin = self.k_proj({mem})")
            self.line(f"v_lin = self.v_proj({mem})")
        elif name in _SELF_ONLY:
            self.param(f"self.qkv = nn.Linear(E, (H + G) * D + G * DV, bias={bias})")
            self.line(f"qkv_lin = self.qkv({first})")

        if name == "linear_bshd":
            self.line("q = q_lin.view(B, SQ, H, D)")
            self.line("k = k_lin.view(B, SK, G, D)")
            self.line("v = v_lin.view(B, SK, G, DV)")
            self.bshd_stage("bshd")
            self.line("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
        elif name == "linear_sbhd":
            self.line("q = q_lin.view(SQ, B, H, D)")
            self.line("k = k_lin.view(SK, B, G, D)")
            self.line("v = v_lin.view(SK, B, G, DV)")
            self.bshd_stage("sbhd")
            if p["style"] == "permute":
                self.line("q, k, v = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)")
            else:
                self.line("q, k, v = (t.transpose(0, 1).transpose(1, 2) for t in (q, k, v))")
        elif name == "fused_unbind":
            self.line("q, k, v = qkv_lin.view(B, SQ, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)")
        elif name == "fused_chunk":
            self.line("q, k, v = qkv_lin.view(B, SQ, H, 3 * D).transpose(1, 2).chunk(3, dim=-1)")
        elif name == "fused_split":
            self.line("q, k, v = qkv_lin.split([H * D, G * D, G * DV], dim=-1)")
            self.line("q, k, v = q.view(B, SQ, H, D), k.view(B, SK, G, D), v.view(B, SK, G, DV)")
            self.bshd_stage("bshd")
            self.line("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
        elif name == "inputs_bshd":
            self.line(f"q, k, v = {q_in}, {k_in}, {v_in}")
            self.bshd_stage("bshd")
            self.line("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
        elif name == "inputs_bhsd":
            self.line(f"q, k, v = {q_in}, {k_in}, {v_in}")
        elif name == "nonunit_head_dim":
            for t, heads, seq, dim in (("q", "H", "SQ", "D"), ("k", "G", "SK", "D"), ("v", "G", "SK", "DV")):
                if t in p["operands"]:
                    self.line(f"{t} = {t}_lin.view(B, {seq}, {dim}, {heads}).permute(0, 3, 1, 2)")
                else:
                    self.line(f"{t} = {t}_lin.view(B, {seq}, {heads}, {dim}).transpose(1, 2)")
        elif name == "megatron_sbhd":
            self.line("q = q_lin.view(SQ, B, H, D)")
            self.line("k = k_lin.view(SK, B, G, D)")
            self.line("v = v_lin.view(SK, B, G, DV)")
            self.bshd_stage("sbhd")
            if self.s.repeat.name == "repeat_interleave":
                self.line("k, v = k.repeat_interleave(R, dim=2), v.repeat_interleave(R, dim=2)")
            elif self.s.repeat.name == "tile_repeat":
                self.line("k, v = k.repeat(1, 1, R, 1), v.repeat(1, 1, R, 1)")
            self.line("q3 = q.reshape(SQ, B * H, D).transpose(0, 1)")
            self.line("k3 = k.reshape(SK, B * H, D).transpose(0, 1)")
            self.line("v3 = v.reshape(SK, B * H, DV).transpose(0, 1)")
            return
        self.bhsd_stage()

    def read_sizes(self) -> None:
        """Batch and sequence lengths from the inputs (locals shadowing the constants), so that
        dynamic shapes stay symbolic where the code allows it."""
        name, args = self.s.produce.name, [a for a, _ in self.args]
        if name in ("linear_sbhd", "megatron_sbhd"):
            self.line(f"SQ, B = {args[0]}.shape[0], {args[0]}.shape[1]")
            seq_k = f"{args[1]}.shape[0]" if len(args) > 1 else "SQ"
        elif name == "inputs_bhsd":
            self.line(f"B, SQ = {args[0]}.shape[0], {args[0]}.shape[2]")
            seq_k = f"{args[1]}.shape[2]"
        else:
            self.line(f"B, SQ = {args[0]}.shape[0], {args[0]}.shape[1]")
            seq_k = f"{args[1]}.shape[1]" if len(args) > 1 else "SQ"
        self.line(f"SK = {seq_k}")

    def rope_buffers(self) -> None:
        if self.rope:
            return
        self.rope = True
        for t, seq in (("q", "SQ"), ("k", "SK")):
            self.param(f"angle_{t} = torch.arange({seq})[:, None] * torch.linspace(0.1, 1.0, D)[None, :]")
            self.param(f'self.register_buffer("cos_{t}", angle_{t}.cos())')
            self.param(f'self.register_buffer("sin_{t}", angle_{t}.sin())')

    def apply_rope(self, index: str) -> None:
        self.rope_buffers()
        for t in ("q", "k"):
            self.line(f"{t} = {t} * self.cos_{t}{index} + rotate_half({t}) * self.sin_{t}{index}")

    def bshd_stage(self, layout: str) -> None:
        """Steps on the [B, S, H, D] (or [S, B, H, D]) tensors before the transpose."""
        if self.s.produce.get("rope") == "before":
            self.apply_rope("[:, None, :]" if layout == "bshd" else "[:, None, None, :]")
        if self.s.repeat.name == "repeat_kv_bshd":
            for t, dim in (("k", "D"), ("v", "DV")):
                self.line(f"{t} = {t}.unsqueeze(3).expand(B, SK, G, R, {dim}).reshape(B, SK, H, {dim})")

    def bhsd_stage(self) -> None:
        """Copies, rope and in-place writes on the [B, H, S, D] operands, then K/V repetition."""
        p, w = self.s.produce, self.s.inplace
        copied, op = p.get("copied", ""), p.get("copy", "none")
        if p.get("copy_after_rope") and p.get("rope") == "after":
            self.apply_rope("")
        for t in "qkv":
            written = w.name != "none" and w["operand"] == t
            if written:  # .contiguous() of a contiguous tensor is no copy: the write would reach the input
                self.line(f"{t} = {t}.clone()")
                self.inplace_write(t)
            elif t in copied and op != "none":
                self.line(f"{t} = {t}.{op}()")
        if not p.get("copy_after_rope") and p.get("rope") == "after":
            self.apply_rope("")
        self.repeat()

    def inplace_write(self, t: str) -> None:
        w = self.s.inplace
        if w.name == "write_source":
            target = "qkv_lin" if self.s.produce.name in _SELF_ONLY else f"{t}_lin"
        else:
            target = t
        self.line({"mul_": f"{target}.mul_(2)", "add_": f"{target}.add_(1.0)",
                   "relu_": f"F.relu({target}, inplace=True)"}[w["op"]])

    def repeat(self) -> None:
        name = self.s.repeat.name
        rep = {
            "repeat_kv_unsqueeze": "{t}.unsqueeze(2).expand(B, G, R, SK, {d}).reshape(B, H, SK, {d})",
            "repeat_kv_getitem": "{t}[:, :, None, :, :].expand(B, G, R, SK, {d}).reshape(B, H, SK, {d})",
            "repeat_interleave": "{t}.repeat_interleave(R, dim=1)",
            "broadcast_flatten": "{t}[:, :, None].broadcast_to(B, G, R, SK, {d}).flatten(1, 2)",
            "mqa_expand": "{t}.expand(B, H, SK, {d})",
            "tile_repeat": "{t}.repeat(1, R, 1, 1)",
            "wrong_axis": "{t}[:, None].expand(B, R, G, SK, {d}).reshape(B, H, SK, {d})",
        }
        if name == "mixed":
            self.line("k = k.repeat_interleave(R, dim=1)")
            self.line("v = v.repeat(1, R, 1, 1)")
        elif name in rep:
            for t, dim in (("k", "D"), ("v", "DV")):
                self.line(f"{t} = " + rep[name].format(t=t, d=dim))

    # -- the mask ------------------------------------------------------------------------------
    def add_input(self, name: str, expr: str) -> str:
        self.args.append((name, expr))
        return name

    def indices(self, dtype: str = "", scale: str = "") -> None:
        dt = f", dtype=torch.{dtype}" if dtype else ""
        sp = self.s.mask.get("spelling", 0)
        qi, ki = f"torch.arange(SQ, device=q.device{dt})", f"torch.arange(SK, device=q.device{dt})"
        if scale:
            qi, ki = f"({qi}{scale})", f"({ki}{scale})"
        if sp % 2:
            self.line(f"qi = {qi}.unsqueeze(-1)")
            self.line(f"ki = {ki}.unsqueeze(0)")
        else:
            self.line(f"qi = {qi}[:, None]")
            self.line(f"ki = {ki}[None, :]")

    def causal(self, spelling: int = 0) -> str:
        return ("ki <= qi", "qi >= ki", "(ki - qi) <= 0", "torch.le(ki, qi)",
                "torch.ones(SQ, SK, dtype=torch.bool, device=q.device).tril()",
                "~torch.triu(torch.ones(SQ, SK, device=q.device), diagonal=1).bool()",  # Megatron
                "torch.tril(torch.ones(SQ, SK, device=q.device)) > 0.5")[spelling]

    def padding_input(self, lengths: tuple, dtype: str, left: bool = False) -> str:
        rows = []
        for n in lengths:
            row = [1] * n + [0] * (self.s.sk - n)
            rows.append(row[::-1] if left else row)
        dt = "torch.bool" if dtype == "bool" else "torch.int64"
        return self.add_input("attention_mask", f"torch.tensor({rows}, dtype={dt})")

    def documents(self, positions: tuple, how: str = "") -> None:
        self.add_input("position_ids", f"torch.tensor({[list(r) for r in positions]})")
        pos = "position_ids"
        if how == "slice_positions":
            self.line("pos = position_ids[:, 1:]")
            pos = "pos"
        elif how == "flip_positions":
            self.line("pos = position_ids.flip(-1)")
            pos = "pos"
        elif how == "step_positions":
            self.line("pos = position_ids[:, ::2]")
            pos = "pos"
        self.line(f"starts = torch.diff({pos}, dim=-1, prepend={pos}[:, :1] - 1) != 1")
        self.line("doc = starts.cumsum(-1)")
        if how == "slice_ids":
            self.line("doc = doc[:, 1:]")
        elif how == "flip_ids":
            self.line("doc = doc.flip(-1)")
        elif how == "reverse_index_ids":
            self.line("doc = doc[:, torch.arange(SQ - 1, -1, -1, device=q.device)]")
        m = self.s.mask
        qp, kp = f"{pos}[:, None, :, None]", f"{pos}[:, None, None, :]"
        qc, kc = f"({pos} // {m['chunk']})[:, None, :, None]", f"({pos} // {m['chunk']})[:, None, None, :]"
        band = {"none": "", "index_causal": " & (ki <= qi)", "position_causal": f" & ({kp} <= {qp})",
                "position_window": f" & ({kp} <= {qp}) & ({qp} - {kp} < {m['window']})",
                "position_chunk": f" & ({qc} == {kc}) & ({kp} <= {qp})"}[m["band"]]
        self.line(f"keep = (doc[:, None, :, None] == doc[:, None, None, :]){band}")

    def keep_mask(self) -> Optional[str]:
        """Lines building ``keep`` (True = attend) for the spec's mask; its name, or None."""
        m = self.s.mask
        name = m.name
        sp = m.get("spelling", 0)
        if name in ("none", "causal_flag", "learned_bias", "extra_score_term"):
            return None
        if name == "random_input":
            self.add_input("mask", "torch.rand(B, 1, SQ, SK, generator=gen) > 0.3")
            return "mask"
        if name == "small_int_wrap":
            dtype = m["dtype"]
            if m["wrap"] == "offset":  # the last representable values: the indices wrap past them
                start = {"uint8": 250, "int8": 124, "int16": 32764}[dtype]
                self.line(f"qi = torch.arange({start}, {start} + SQ, device=q.device, dtype=torch.{dtype})[:, None]")
                self.line(f"ki = torch.arange({start}, {start} + SK, device=q.device, dtype=torch.{dtype})[None, :]")
            else:
                factor = {"uint8": 64, "int8": 40, "int16": 12000}[dtype]
                self.indices(dtype, f" * {factor}")
            self.line(f"keep = {self.causal(sp)}")
            return "keep"
        self.indices()
        if name == "causal":
            self.line(f"keep = {self.causal(sp)}")
        elif name == "window":
            w = m["window"]
            self.line(("keep = (ki <= qi) & (ki > qi - {w})", "keep = (ki <= qi) & (qi - ki < {w})",
                       "keep = torch.logical_and(ki <= qi, ki >= qi - {w} + 1)",
                       "keep = (qi - ki >= 0) & (qi - ki <= {w} - 1)")[sp].format(w=w))
        elif name == "bottom_right":
            self.line("keep = ki <= qi + (SK - SQ)")
        elif name == "chunked":
            c = m["chunk"]
            same = (f"(qi // {c}) == (ki // {c})", f"torch.div(qi, {c}, rounding_mode='floor') == "
                    f"torch.div(ki, {c}, rounding_mode='floor')", f"(qi // {c}).eq(ki // {c})",
                    f"(ki // {c}) == (qi // {c})")[sp]
            self.line(f"keep = ({same}) & (ki <= qi)" if m["causal"] else f"keep = {same}")
        elif name in ("padding", "left_padding"):
            pad = self.padding_input(m["lengths"], m["dtype"], left=name == "left_padding")
            key = (f"{pad}[:, None, None, :].bool()", f"{pad}.bool()[:, None, None, :]",
                   f"{pad}.view(B, 1, 1, SK).to(torch.bool)", f"({pad}[:, None, None, :] != 0)")[sp]
            self.line(f"keep = (ki <= qi)[None, None] & {key}" if m["causal"] else
                      f"keep = {key}.expand(B, 1, SQ, SK)")
        elif name == "documents":
            self.documents(m["positions"])
        elif name == "documents_reindexed":
            self.documents(m["positions"], m["how"])
        elif name == "cache_position":
            self.add_input("cache_position", f"torch.arange({m['cached']}, {m['cached']} + SQ)")
            self.line("keep = ki <= cache_position[:, None]")
        elif name in ("cache_length", "cache_overflow"):
            self.add_input("cumulative_length", f"torch.tensor([{m['cached']}])")
            self.line("keep = ki <= qi + cumulative_length")
        elif name == "all_true":
            self.line("keep = torch.ones(SQ, SK, dtype=torch.bool, device=q.device)")
        elif name == "mask_and_causal_flag":
            inner = m["inner"]
            if inner == "padding":
                pad = self.padding_input(m["lengths"], "int64")
                self.line(f"keep = {pad}[:, None, None, :].bool().expand(B, 1, SQ, SK)")
            elif inner == "window":
                self.line(f"keep = (ki <= qi) & (ki > qi - {m['window']})")
            else:
                self.line("keep = ki <= qi")
        elif name == "strict_lower":
            self.line(("keep = ki < qi", "keep = qi > ki", "keep = torch.lt(ki, qi)", "keep = (qi - ki) > 0",
                       "keep = torch.ones(SQ, SK, dtype=torch.bool, device=q.device).tril(-1)")[sp])
        elif name == "strict_upper":
            self.line(("keep = ki > qi", "keep = qi < ki", "keep = torch.gt(ki, qi)", "keep = (ki - qi) >= 1",
                       "keep = torch.ones(SQ, SK, dtype=torch.bool, device=q.device).triu(1)")[sp])
        elif name == "strict_band":
            self.line(f"keep = (qi - {m['width']} <= ki) & (ki < qi)")
        elif name == "empty_rows":
            self.line(f"keep = (ki <= qi) & (qi >= {m['from_row']})")
        elif name == "per_batch":
            self.line("bi = torch.arange(B, device=q.device)[:, None, None, None]")
            self.line("keep = (ki <= qi) | (bi == 0)")
        elif name == "edited_in_place":
            self.line(f"keep = {self.causal(sp)}")
            if sp >= 2:
                self.line("keep = keep.clone()")
            r, c = m["row"], m["col"]
            self.line({"point_false": f"keep[{r}, {c}] = False", "column_true": f"keep[:, {c}] = True",
                       "row_true": f"keep[{r}] = True", "fill_false": "keep.fill_(False)"}[m["edit"]])
        elif name == "bool_vs_number":
            self.line(f"causal = {self.causal(sp)}")
            self.line("keep = " + {"ne_0": "causal != 0", "eq_1": "causal == 1",
                                   "to_int64_bool": "causal.to(torch.int64).bool()", "eq_2": "causal == 2",
                                   "lt_1": "causal < 1",
                                   "gt_0_int8": "causal.to(torch.int8) > 0"}[m["compare"]])
        elif name == "float_to_int":
            f = m["factor"]
            if m["how"] == "trunc_difference":
                self.line(f"keep = ((ki - qi) * {f}).to(torch.int64) <= 0")
            elif m["how"] == "bfloat16_compare":  # 254, 255, 256, 256, 258: bfloat16 has no 257
                self.line("qi = torch.arange(254, 254 + SQ, device=q.device, dtype=torch.bfloat16)[:, None]")
                self.line("ki = torch.arange(254, 254 + SK, device=q.device, dtype=torch.bfloat16)[None, :]")
                self.line("keep = ki <= qi")
            elif m["how"] in ("bfloat16_positions", "float32_positions"):  # past the float's integers
                dtype, start = ("bfloat16", 256) if m["how"] == "bfloat16_positions" else ("float32", 2**24)
                self.line(f"qi = torch.arange({start}, {start} + SQ, device=q.device, dtype=torch.{dtype})"
                          ".to(torch.int64)[:, None]")
                self.line(f"ki = torch.arange({start}, {start} + SK, device=q.device, dtype=torch.{dtype})"
                          ".to(torch.int64)[None, :]")
                self.line("keep = ki <= qi")
            else:
                self.line(f"keep = ((ki <= qi).to(q.dtype) * {f}).to(torch.int64).bool()")
        else:
            raise ValueError(name)
        return "keep"

    def additive(self, keep: str, form: str) -> str:
        """An additive float mask equal to ``keep`` (0 where kept)."""
        neg = "torch.finfo(q.dtype).min" if form == "additive_min" else 'float("-inf")'
        if form == "additive_tensor0":
            self.line(f"bias = torch.where({keep}, torch.tensor(0.0, dtype=q.dtype, device=q.device), "
                      "torch.finfo(q.dtype).min)")
        elif form == "additive_masked_fill":
            self.line(f"bias = torch.zeros({keep}.shape, dtype=q.dtype, device=q.device).masked_fill("
                      f'~{keep}, float("-inf"))')
        else:
            self.line(f"bias = torch.where({keep}, torch.zeros((), dtype=q.dtype, device=q.device), {neg})")
        return "bias"

    # -- attention -----------------------------------------------------------------------------
    def sdpa(self) -> None:
        s, c, m = self.s, self.s.core, self.s.mask
        keep = self.keep_mask()
        attn_mask = None
        if keep is not None:
            attn_mask = keep if m["form"] == "bool" else self.additive(keep, m["form"])
        if m.name == "learned_bias":
            self.param("self.rel_bias = nn.Parameter(0.1 * torch.randn(H, SQ, SK))")
            if m["with_causal"]:
                self.indices()
                self.line('attn_mask = self.rel_bias.masked_fill(ki > qi, float("-inf"))')
                attn_mask = "attn_mask"
            else:
                attn_mask = "self.rel_bias"
        if m.name == "extra_score_term":
            self.param("self.r = nn.Parameter(0.1 * torch.randn(SK, D))")
            self.line("attn_mask = q @ self.r.transpose(0, 1)")
            attn_mask = "attn_mask"
        causal = m.name in ("causal_flag", "mask_and_causal_flag")
        scale = {None: None, "rsqrt": "1 / math.sqrt(D)", 0.3: "0.3"}[c["scale"]]
        fn = "torch.nn.functional.scaled_dot_product_attention" if c["call"] == "module_path" \
            else "F.scaled_dot_product_attention"
        dropout = {"absent": None, "zero": "0.0", "training": "0.1 if self.training else 0.0"}[c["dropout"]]
        gqa = s.repeat.name == "enable_gqa"
        if c["call"] == "positional":
            args = ["q", "k", "v", attn_mask or "None", dropout or "0.0", str(causal)]
            if scale:
                args.append(f"scale={scale}")
        else:
            args = ["q", "k", "v"]
            if attn_mask:
                args.append(f"attn_mask={attn_mask}")
            if dropout:
                args.append(f"dropout_p={dropout}")
            if causal:
                args.append("is_causal=True")
            if scale:
                args.append(f"scale={scale}")
        if gqa:
            args.append("enable_gqa=True")
        pad = c["pad_v"] and s.dv != s.d
        if pad:
            self.line("v = F.pad(v, [0, D - DV])")
        self.line(f"o = {fn}({', '.join(args)})")
        if pad:
            self.line("o = o[..., :DV]")

    def scores_mask(self, keep: Optional[str], scores: str = "s") -> None:
        """Apply the mask to the scores as hand-written attention does."""
        m, c = self.s.mask, self.s.core
        if keep is None:
            return
        form = m["form"]
        if c.name == "finite_fill" and form == "masked_fill_inplace":  # Megatron: masked_fill_(mask, -10000.0)
            self.line(f"{scores}.masked_fill_(~{keep}, {c['fill']})")
        elif c.name == "finite_fill":
            self.line(f"{scores} = {scores}.masked_fill(~{keep}, {c['fill']})")
        elif form == "masked_fill":
            self.line(f'{scores} = {scores}.masked_fill(~{keep}, float("-inf"))')
        elif form == "masked_fill_not":
            self.line(f'{scores} = {scores}.masked_fill({keep}.logical_not(), float("-inf"))')
        elif form == "masked_fill_inplace":  # Megatron's FusedScaleMaskSoftmax
            self.line(f'{scores}.masked_fill_(~{keep}, float("-inf"))')
        elif form == "where":
            self.line(f'{scores} = torch.where({keep}, {scores}, float("-inf"))')
        else:
            self.line(f"{scores} = {scores} + {self.additive(keep, form)}")

    def hand(self) -> None:
        """softmax(q kᵀ · scale + mask) v on 4-D or (Megatron) 3-D tensors."""
        s, c, m = self.s, self.s.core, self.s.mask
        three_d = s.family == "megatron"
        at = c["scale_at"]
        scale = "D ** -0.5"
        if three_d and s.produce.name != "megatron_sbhd":
            self.line("q3 = q.reshape(B * H, SQ, D)")
            self.line("k3 = k.reshape(B * H, SK, D)")
            self.line("v3 = v.reshape(B * H, SK, DV)")
        qn, kn, vn = ("q3", "k3", "v3") if three_d else ("q", "k", "v")
        if at == "q":
            self.line(f"{qn} = {qn} * {scale}")
        elif at == "q_div":
            self.line(f"{qn} = {qn} / math.sqrt(D)")
        product = c["product"]
        alpha_used = False
        if product == "at":
            self.line(f"s = {qn} @ {kn}.transpose(-2, -1)")
        elif product == "matmul":
            self.line(f"s = torch.matmul({qn}, {kn}.transpose(-2, -1))")
        elif product == "transpose_2_3":
            self.line(f"s = {qn} @ {kn}.transpose(2, 3)")
        elif product == "permute":
            self.line(f"s = {qn} @ {kn}.permute(0, 1, 3, 2)")
        elif product == "baddbmm":
            alpha = scale if at in ("scores", "scores_div") else "1.0"
            alpha_used = at in ("scores", "scores_div")
            self.line(f"s = torch.baddbmm(torch.empty(B * H, SQ, SK, dtype={qn}.dtype, device={qn}.device), "
                      f"{qn}, {kn}.transpose(1, 2), beta=0.0, alpha={alpha})")
        elif product == "bmm":
            self.line(f"s = torch.bmm({qn}, {kn}.transpose(1, 2))")
        else:
            self.line(f"s = torch.matmul({qn}, {kn}.transpose(1, 2))")
        if m.name == "extra_score_term":
            self.param("self.r = nn.Parameter(0.1 * torch.randn(SK, D))")
            self.line(f"s = s + {qn} @ self.r.transpose(0, 1)")
        if not alpha_used:
            if at == "scores":
                self.line(f"s = s * {scale}")
            elif at == "scores_div":
                self.line("s = s / math.sqrt(D)")
        cap = c.get("softcap")
        if cap and c.name != "softcap_after_mask":
            outer = cap * 2 if c.name == "softcap_mismatch" else cap
            self.line(f"s = torch.tanh(s / {cap}) * {outer}")
        if c.name == "floor_div":
            self.line("s = torch.div(s, 0.5, rounding_mode='floor')")
        elif c.name == "int_cast":
            self.line(f"s = (s * 4).to(torch.int64).to({qn}.dtype)")
        elif c.name == "float32_round_trip" and c["where"] == "scores":
            self.line(f"s = s.float().to({qn}.dtype)")
        elif c.name == "bfloat16_round_trip" and c["where"] == "scores":
            self.line(f"s = s.to(torch.bfloat16).to({qn}.dtype)")
        keep = self.keep_mask()
        # masks with a batch axis ([B, 1, Sq, Sk]) and per-head biases need the [B, H, Sq, Sk] view
        on_4d = three_d and (c["mask_on_4d"] or m.name in (
            "padding", "left_padding", "documents", "documents_reindexed", "per_batch", "random_input",
            "learned_bias"))
        if three_d and on_4d:
            self.line("s = s.view(B, H, SQ, SK)")
        if m.name == "learned_bias":
            self.param("self.rel_bias = nn.Parameter(0.1 * torch.randn(H, SQ, SK))")
            self.line("s = s + self.rel_bias")
            if m["with_causal"]:
                self.indices()
                self.line('s = s.masked_fill(ki > qi, float("-inf"))')
        self.scores_mask(keep)
        if c.name == "softcap_after_mask":
            self.line(f"s = torch.tanh(s / {cap}) * {cap}")
        if at == "after_mask":
            self.line(f"s = s * {scale}")
        sm = c["softmax"]
        if c.name == "float32_round_trip" and c["where"] == "softmax_dtype":
            self.line(f"p = F.softmax(s, dim=-1, dtype=torch.float32).to({qn}.dtype)")
        elif c.name == "softmax_other_dim":
            self.line("p = F.softmax(s, dim=-2)")
        elif sm == "F":
            self.line("p = F.softmax(s, dim=-1)")
        elif sm == "method":
            self.line("p = s.softmax(-1)")
        elif sm == "torch":
            self.line("p = torch.softmax(s, dim=-1)")
        else:
            self.line(f"p = F.softmax(s, dim=-1, dtype={qn}.dtype).to({qn}.dtype)")
        if c.name == "float32_round_trip" and c["where"] == "probs":
            self.line(f"p = p.float().to({qn}.dtype)")
        elif c.name == "bfloat16_round_trip" and c["where"] == "probs":
            self.line(f"p = p.to(torch.bfloat16).to({qn}.dtype)")
        elif c.name == "probs_changed":
            self.line({"mul2": "p = p * 2", "add_eps": "p = p + 1e-3", "relu": "p = F.relu(p - 0.1)"}[c["op"]])
        if c["dropout"] == "functional":
            self.line("p = F.dropout(p, p=0.1, training=self.training)")
        elif c["dropout"] == "module":
            self.param("self.drop = nn.Dropout(0.1)")
            self.line("p = self.drop(p)")
        if c.name == "weights_returned":
            self.outputs.append("p")
        if three_d:
            if on_4d:
                self.line("p = p.view(B * H, SQ, SK)")
            self.line(f"o = torch.bmm(p, {vn}).view(B, H, SQ, DV)")
        else:
            self.line("o = p @ v" if c["pv"] == "at" else "o = torch.matmul(p, v)")

    # -- output --------------------------------------------------------------------------------
    def output(self) -> None:
        o = self.s.output
        name = o.name
        if name == "attend_again":
            if self.s.family == "sdpa":
                gqa = ", enable_gqa=True" if self.s.repeat.name == "enable_gqa" else ""
                self.line(f"o = F.scaled_dot_product_attention(o, k, v{gqa})")
            else:
                self.line("o = torch.softmax(o @ k.transpose(-2, -1) * D ** -0.5, dim=-1) @ v")
            name = "bshd_reshape"
            o = _choice(name, style="contiguous_reshape", o_proj=o["o_proj"])
        if name == "bshd_reshape":
            self.line({"contiguous_reshape": "out = o.transpose(1, 2).contiguous().reshape(B, SQ, EV)",
                       "reshape": "out = o.transpose(1, 2).reshape(B, SQ, EV)",
                       "contiguous_view": "out = o.transpose(1, 2).contiguous().view(B, SQ, H * DV)",
                       "minus_one": "out = o.transpose(1, 2).reshape(B, SQ, -1)"}[o["style"]])
        elif name == "flatten":
            self.line("out = o.permute(0, 2, 1, 3).flatten(2)")
        elif name == "sbhd":
            self.line("out = o.permute(2, 0, 1, 3).contiguous().view(SQ, B, -1)")
        elif name == "raw":
            self.line("out = o")
        elif name == "read_twice":
            self.line("out = o.transpose(1, 2).reshape(B, SQ, EV)")
            self.outputs.append("o.sum(dim=-1)")
        elif name == "write_copy_reread":
            self.line("t = o.transpose(1, 2).clone()")  # .contiguous() may alias o (CPU SDPA writes BSHD)
            self.line("t.mul_(2)")
            self.line("out = t.reshape(B, SQ, EV)")
            self.outputs.append("o.sum(dim=-1)")
        elif name == "write_chain_end":  # clone: CPU SDPA may write BSHD, where .contiguous() copies nothing
            self.line("out = o.transpose(1, 2).clone().reshape(B, SQ, EV)")
            self.line("out.add_(1.0)")
            self.outputs.append("o.sum(dim=-1)")
        elif name == "write_output_after_copy":
            self.line("out = o.transpose(1, 2).contiguous().view(B, SQ, EV)")
            self.line("o.mul_(2)")
            self.outputs.append("o.sum(dim=-1)")
        elif name == "write_view_after_copy":
            self.line("t = o.transpose(1, 2)")
            self.line("out = t.contiguous().view(B, SQ, EV)")
            self.line("t.mul_(2)")
            self.outputs.append("t.sum(dim=-1)")
        if o.get("o_proj"):
            self.param(f"self.o_proj = nn.Linear(EV, E, bias={self.s.linear_bias})")
            self.line("out = self.o_proj(out)")
        self.outputs.insert(0, "out")

    # -- the whole case ------------------------------------------------------------------------
    def source(self) -> str:
        s = self.s
        self.produce()
        if s.family == "sdpa":
            self.sdpa()
        else:
            self.hand()
        self.output()
        header = _HEADER.format(b=s.b, h=s.h, g=s.g, sq=s.sq, sk=s.sk, d=s.d, dv=s.dv)
        if self.rope:
            header += _ROTATE
        init = "\n".join(f"        {ln}" for ln in ["super().__init__()", *self.init])
        args = ", ".join(a for a, _ in self.args)
        ret = self.outputs[0] if len(self.outputs) == 1 else "(" + ", ".join(self.outputs) + ")"
        body = "\n".join(f"        {ln}" for ln in [*self.body, f"return {ret}"])
        inputs = "\n".join(f"    {a} = {e}" for a, e in self.args)
        names = ", ".join(a for a, _ in self.args)
        return f'''{header}

class Model(nn.Module):
    # {s.describe()}
    def __init__(self):
{init}

    def forward(self, {args}):
{body}


def make_model():
    torch.manual_seed({s.seed})
    return Model().double().eval(){"" if s.grad else ".requires_grad_(False)"}


def make_inputs():
    gen = torch.Generator().manual_seed({s.seed})
{inputs}
    return ({names},)
'''


def render(spec: Spec) -> str:
    """Standalone source defining ``Model``, ``make_model()`` and ``make_inputs()`` for ``spec``."""
    return _Renderer(spec).source()
