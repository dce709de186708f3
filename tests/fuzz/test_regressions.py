"""Minimised cases the differential fuzzer found, one named test each.

Each module computes attention in a way attnopt must either rewrite exactly or leave as written:
torch.compile through attnopt and torch.export + attnopt.optimize must give eager's output and
gradients (float64, NaN where eager has NaN), without raising and without falling back.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .harness import mask_kept, run_compiled, run_exported

B, H, S, D = 1, 2, 5, 4


def qkv(seed: int = 0, s: int = S) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, s, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))


def flat(o: torch.Tensor) -> torch.Tensor:
    return o.transpose(1, 2).flatten(2)


def hand_written(q, k, v, scores=lambda s: s, probs=lambda p: p) -> torch.Tensor:
    return probs(torch.softmax(scores(q @ k.transpose(-2, -1) * D**-0.5), dim=-1)) @ v


def causal(s: int = S, dtype=None) -> tuple:
    """(q index [s, 1], k index [1, s])."""
    i = torch.arange(s, dtype=dtype)
    return i[:, None], i[None, :]


def assert_like_eager(model: type, inputs=qkv, lowered: bool = False, dynamic: bool = False,
                      mask_replaced: bool = False) -> None:
    """Both entry points give eager's forward and backward, with no crash and no fallback; with
    ``lowered`` the site must also be rewritten, with ``mask_replaced`` its mask must not run as
    written. ``dynamic``: compiled and exported with dynamic shapes."""
    problems = []
    for mode, run in (("compile", run_compiled), ("export", run_exported)):
        rep = run(lambda: model().double(), inputs, dynamic)
        fell_back = [w for w in rep["warnings"] if "passes failed" in w] + rep["errors"]
        if rep["error"] or fell_back:
            problems.append(f"{mode}: crash: {rep['error'] or fell_back[0]}")
        elif rep["mismatch"]:
            problems.append(f"{mode}: wrong: {rep['mismatch']}")
        elif (lowered or mask_replaced) and not any(s.status == "lowered" for s in rep["sites"]):
            problems.append(f"{mode}: not lowered: {[s.reason for s in rep['sites']]}")
        elif mask_replaced and any(mask_kept(s) for s in rep["sites"]):
            problems.append(f"{mode}: mask kept: {[s.mask for s in rep['sites']]}")
    assert not problems, "\n".join(problems)


# --- masks: what the proof must not lose --------------------------------------------------------
class StrictCausal(nn.Module):
    """k < q: row 0 keeps no key; not the causal band k <= q."""

    def forward(self, q, k, v):
        qi, ki = causal()
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=ki < qi))


class StrictUpper(nn.Module):
    def forward(self, q, k, v):
        qi, ki = causal()
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=ki > qi))


class BoolNotEqualZero(nn.Module):
    """A bool mask compared with a number keeps its values (here: causal), it is not all true."""

    def forward(self, q, k, v):
        qi, ki = causal()
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=(ki <= qi) != 0))


class BoolThroughInt(nn.Module):
    def forward(self, q, k, v):
        qi, ki = causal()
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=(ki <= qi).to(torch.int64).bool()))


class Uint8Positions(nn.Module):
    """uint8 positions 253, 254, 255, 0, 1: the order wraps, so this is not the causal band."""

    def forward(self, q, k, v):
        i = torch.arange(253, 253 + S, dtype=torch.uint8)
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= i[:, None]))


class Int16PositionsPlusOffset(nn.Module):
    """int16 positions 0..4 plus 32765: 32765, 32766, 32767, -32768, -32767."""

    def forward(self, q, k, v):
        i = torch.arange(S, dtype=torch.int16) + 32765
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= i[:, None]))


class BFloat16Positions(nn.Module):
    """bfloat16 has no 257: the positions cast back to int64 read 256, 256, 258, 260, 260."""

    def forward(self, q, k, v):
        i = torch.arange(256, 256 + S, dtype=torch.bfloat16).to(torch.int64)
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= i[:, None]))


class PaddingWithIsCausal(nn.Module):
    """attn_mask and is_causal=True together: SDPA applies both."""

    def forward(self, q, k, v, attention_mask):
        keep = attention_mask[:, None, None, :].bool().expand(B, 1, S, S)
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=True))


class WindowWithIsCausal(nn.Module):
    def forward(self, q, k, v):
        qi, ki = causal()
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=ki >= qi - 1, is_causal=True))


class MaskEditedInPlace(nn.Module):
    """The causal mask with every row opened to the last key after it was built."""

    def forward(self, q, k, v):
        qi, ki = causal()
        keep = ki <= qi
        keep[:, S - 1] = True
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


class PackedDocuments(nn.Module):
    """transformers' packed sequences (position ids restart), in a float64 model."""

    def forward(self, q, k, v, position_ids):
        starts = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1) != 1
        doc = starts.cumsum(-1)
        qi, ki = causal()
        keep = (doc[:, None, :, None] == doc[:, None, None, :]) & (ki <= qi)
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


@pytest.mark.parametrize("model", [StrictCausal, StrictUpper, BoolNotEqualZero, BoolThroughInt, Uint8Positions,
                                   Int16PositionsPlusOffset, BFloat16Positions, WindowWithIsCausal, MaskEditedInPlace])
def test_mask_proof_keeps_what_the_mask_computes(model):
    assert_like_eager(model)


def test_mask_and_is_causal_keep_both():
    assert_like_eager(PaddingWithIsCausal, lambda: qkv() + (torch.tensor([[1, 1, 1, 1, 0]]),))


class AdditiveCausalTensorZero(nn.Module):
    """transformers' additive mask: ``where(keep, torch.tensor(0.0), finfo.min)``."""

    def forward(self, q, k, v):
        qi, ki = causal()
        bias = torch.where(ki <= qi, torch.tensor(0.0, dtype=q.dtype), torch.finfo(q.dtype).min)
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


def test_transformers_additive_mask_is_replaced():
    assert_like_eager(AdditiveCausalTensorZero, mask_replaced=True)


class PaddingViewBatchOne(nn.Module):
    """GPT-2's padding mask, ``attention_mask.view(B, 1, 1, S)``, at batch size 1."""

    def forward(self, q, k, v, attention_mask):
        qi, ki = causal()
        keep = (ki <= qi)[None, None] & attention_mask.view(q.shape[0], 1, 1, S).to(torch.bool)
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


def test_key_padding_at_batch_size_one_is_replaced():
    assert_like_eager(PaddingViewBatchOne, lambda: qkv() + (torch.tensor([[1, 1, 1, 1, 0]]),), mask_replaced=True)


class ScoresMaskedInPlace(nn.Module):
    """Megatron's FusedScaleMaskSoftmax: the scores masked in place (``masked_fill_``), the scale
    after the mask or before it."""

    def __init__(self, scale_after: bool = False):
        super().__init__()
        self.scale_after = scale_after

    def forward(self, q, k, v):
        qi, ki = causal()
        s = q @ k.transpose(-2, -1)
        if not self.scale_after:
            s = s * D**-0.5
        s.masked_fill_(~(ki <= qi), float("-inf"))
        if self.scale_after:
            s = s * D**-0.5
        return flat(torch.softmax(s, dim=-1) @ v)


class ScoresMaskedInPlaceScaledAfter(ScoresMaskedInPlace):
    def __init__(self):
        super().__init__(scale_after=True)


@pytest.mark.parametrize("model", [ScoresMaskedInPlace, ScoresMaskedInPlaceScaledAfter])
def test_scores_masked_in_place(model):
    assert_like_eager(model, mask_replaced=True)


def test_packed_documents_in_float64():
    assert_like_eager(PackedDocuments, lambda: qkv() + (torch.tensor([[0, 1, 2, 0, 1]]),), lowered=True)


def test_packed_documents_with_position_ids_broadcast_over_the_batch():
    """transformers passes [1, S] position ids for every row of a batch."""

    def inputs():
        q, k, v = (t.detach().expand(2, -1, -1, -1).clone().requires_grad_() for t in qkv())
        return q, k, v, torch.tensor([[0, 1, 2, 0, 1]])

    assert_like_eager(PackedDocuments, inputs)


class PackedDocumentsDynamic(nn.Module):
    """Packed documents with the batch and sequence length read from the input."""

    def forward(self, x, position_ids):
        b, s = x.shape[0], x.shape[1]
        q = x.view(b, s, H, D).transpose(1, 2)
        starts = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1) != 1
        doc = starts.cumsum(-1)
        keep = doc[:, None, :, None] == doc[:, None, None, :]
        return F.scaled_dot_product_attention(q, q, q, attn_mask=keep).transpose(1, 2).reshape(b, s, H * D)


def test_packed_documents_with_dynamic_shapes():
    def inputs():
        x = torch.randn(2, S, H * D, dtype=torch.float64, requires_grad=True)
        return x, torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])

    assert_like_eager(PackedDocumentsDynamic, inputs, lowered=True, dynamic=True)


class AdditiveCausalDynamic(nn.Module):
    """A causal where(keep, 0, finfo.min) mask built from a symbolic sequence length: it depends on
    the input only through its size, so it does not require grad."""

    def forward(self, x):
        b, s = x.shape[0], x.shape[1]
        q = x.view(b, s, H, D).transpose(1, 2)
        i = torch.arange(s)
        bias = torch.where(i[None, :] <= i[:, None], torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
        return flat(hand_written(q, q, q, scores=lambda t: t + bias))


def test_hand_written_mask_from_a_symbolic_length_is_lowered():
    assert_like_eager(AdditiveCausalDynamic,
                      lambda: (torch.randn(2, S, H * D, dtype=torch.float64, requires_grad=True),),
                      lowered=True, dynamic=True)


# --- masks and biases that require grad -----------------------------------------------------------
class LearnedBiasHandWritten(nn.Module):
    """T5-style learned additive bias on hand-written scores."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(0.1 * torch.randn(H, S, S))

    def forward(self, q, k, v):
        return flat(hand_written(q, k, v, scores=lambda s: s + self.bias))


class ExtraScoreTerm(nn.Module):
    """Transformer-XL style: a second score term q @ rᵀ with a learned r."""

    def __init__(self):
        super().__init__()
        self.r = nn.Parameter(0.1 * torch.randn(S, D))

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) + q @ self.r.transpose(0, 1)
        return flat(torch.softmax(s, dim=-1) @ v)


@pytest.mark.parametrize("model", [LearnedBiasHandWritten, ExtraScoreTerm])
def test_score_terms_that_require_grad(model):
    assert_like_eager(model)


class FrozenPerHeadBias(nn.Module):
    """A [H, Sq, Sk] additive bias that does not require grad (a frozen T5 bias): SDPA broadcasts
    a 3-D mask over the batch."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", 0.1 * torch.randn(H, S, S))

    def forward(self, q, k, v):
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias))


def test_three_dimensional_additive_mask():
    assert_like_eager(FrozenPerHeadBias, lowered=True)


# --- hand-written chains with value-changing steps ------------------------------------------------
class FloorDivScores(nn.Module):
    def forward(self, q, k, v):
        return flat(hand_written(q, k, v, scores=lambda s: torch.div(s, 0.5, rounding_mode="floor")))


class IntCastScores(nn.Module):
    def forward(self, q, k, v):
        return flat(hand_written(q, k, v, scores=lambda s: (s * 4).to(torch.int64).to(s.dtype)))


class Float32Softmax(nn.Module):
    """softmax(dtype=float32) in a float64 model rounds the probabilities to float32."""

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-1, dtype=torch.float32).to(q.dtype)
        return flat(p @ v)


class BFloat16Scores(nn.Module):
    def forward(self, q, k, v):
        return flat(hand_written(q, k, v, scores=lambda s: s.to(torch.bfloat16).to(s.dtype)))


@pytest.mark.parametrize("model", [FloorDivScores, IntCastScores, Float32Softmax, BFloat16Scores])
def test_value_changing_steps_in_hand_written_attention(model):
    assert_like_eager(model)


# --- rows that keep no key ----------------------------------------------------------------------
class HandWrittenStrictCausal(nn.Module):
    """masked_fill(-inf) on a row with no key: eager gives NaN there."""

    def forward(self, q, k, v):
        qi, ki = causal()
        return flat(hand_written(q, k, v, scores=lambda s: s.masked_fill(~(ki < qi), float("-inf"))))


class HandWrittenAdditiveInfRow(nn.Module):
    """An additive -inf mask on a row with no key: eager's output row is NaN and, unlike with
    masked_fill, the NaN flows back into the gradients of q, k and v."""

    def forward(self, q, k, v):
        qi, ki = causal()
        bias = torch.where(ki < qi, torch.zeros((), dtype=q.dtype), float("-inf"))
        return flat(hand_written(q, k, v, scores=lambda s: s + bias))


class HandWrittenFiniteMinRow(nn.Module):
    """An additive finfo.min mask on a row with no key: eager averages every key, and its
    gradient flows through that average."""

    def forward(self, q, k, v):
        qi, ki = causal()
        bias = torch.where(ki > qi, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
        return flat(hand_written(q, k, v, scores=lambda s: s + bias))


@pytest.mark.parametrize("model", [HandWrittenStrictCausal, HandWrittenAdditiveInfRow, HandWrittenFiniteMinRow])
def test_rows_without_keys(model):
    assert_like_eager(model)


class HandWrittenNaNQueryRow(nn.Module):
    """A query row that is NaN (here: the output row of an attention whose row kept no key, read by
    a second attention): matmul and softmax as written give NaN in that row."""

    def forward(self, q, k, v):
        q = q * torch.tensor([float("nan")] + [1.0] * (S - 1), dtype=q.dtype)[:, None]
        return flat(hand_written(q, k, v))


def test_hand_written_nan_query_row_stays_nan():
    assert_like_eager(HandWrittenNaNQueryRow)


class AttentionReadsAStrictBandsOutput(nn.Module):
    """A strict upper band leaves the last row with no key (NaN as written); a second hand-written
    attention reads that output as its query and so has a NaN row of its own."""

    def forward(self, q, k, v):
        qi, ki = causal()
        o = hand_written(q, k, v, scores=lambda s: s.masked_fill(ki <= qi, float("-inf")))
        return flat(hand_written(o, k, v))


def test_attention_reading_a_nan_row_portable():
    """target="portable": the first site stays as written (SDPA gives zeros there) and so must the
    second (SDPA would not spread the NaN query over its row as the written softmax does)."""
    rep = run_exported(lambda: AttentionReadsAStrictBandsOutput().double(), qkv, target="portable")
    assert rep["error"] is None and not rep["errors"], rep["error"] or rep["errors"]
    assert rep["mismatch"] is None, rep["mismatch"]
    assert [s.status for s in rep["sites"]] == ["skipped", "skipped"]


class HandWrittenNaNKey(nn.Module):
    """A key row holding a NaN: a causal fill drops it from the rows before it; the rows that read
    it are NaN, and so are the gradients it reaches."""

    def forward(self, q, k, v):
        k = k * torch.tensor([1.0] * (S - 2) + [float("nan"), 1.0], dtype=k.dtype)[:, None]
        qi, ki = causal()
        return flat(hand_written(q, k, v, scores=lambda s: s.masked_fill(ki > qi, float("-inf"))))


def test_hand_written_nan_key_row():
    assert_like_eager(HandWrittenNaNKey, lowered=True)


class HandWrittenCacheLength(nn.Module):
    """Decode over a static cache, hand-written: keys k <= q + (tokens already cached), filled with
    masked_fill(~keep, -inf); inference."""

    def forward(self, q, k, v, cumulative_length):
        qi, ki = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
        return flat(hand_written(q, k, v, scores=lambda s: s.masked_fill(~(ki <= qi + cumulative_length),
                                                                         float("-inf"))))


@pytest.mark.parametrize("sq, sk, cached", [(1, 1, 0), (1, 4, 0), (2, 4, 2)])
def test_hand_written_kv_cache_mask(sq, sk, cached):
    def inputs():
        q = qkv(s=sq)[0].detach()
        _, k, v = (t.detach() for t in qkv(1, s=sk))
        return q, k, v, torch.tensor([cached])

    assert_like_eager(HandWrittenCacheLength, inputs, lowered=True)


class MlaFiniteMinRow(nn.Module):
    """SDPA with a V head dim below q/k's (eager runs its math kernel) and an additive finfo.min
    mask whose last row keeps no key: the gradient through that row's average of every key."""

    def forward(self, q, k, v):
        qi, ki = causal()
        bias = torch.where(ki > qi, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
        return flat(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


def test_sdpa_rows_without_keys_where_eager_runs_the_math_kernel():
    def inputs():
        q, k, v = qkv()
        return q, k, v[..., : D // 2].detach().requires_grad_()

    assert_like_eager(MlaFiniteMinRow, inputs)


class HandWrittenChunkedFiniteMin(nn.Module):
    """Llama 4 chunks as an additive finfo.min mask: every query keeps its own chunk, so no row is
    ever empty and the finite fill acts as -inf."""

    def forward(self, q, k, v):
        qi, ki = causal()
        bias = torch.where(qi // 2 == ki // 2, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
        return flat(hand_written(q, k, v, scores=lambda s: s + bias))


def test_hand_written_chunked_finite_mask_is_lowered():
    assert_like_eager(HandWrittenChunkedFiniteMin, lowered=True)


# --- layouts and in-place writes ----------------------------------------------------------------
class NonUnitStrideHeadDim(nn.Module):
    """[B, S, D, H] viewed as [B, H, S, D]: the head dim has stride H."""

    def forward(self, x):
        q = x.view(B, S, D, H).permute(0, 3, 1, 2)
        return flat(F.scaled_dot_product_attention(q, q, q))


def test_non_unit_stride_head_dim():
    assert_like_eager(NonUnitStrideHeadDim,
                      lambda: (torch.randn(B, S, H * D, dtype=torch.float64, requires_grad=True),))


class ReluInPlaceOnCopy(nn.Module):
    """The copy of q is written in place (relu) before attention reads it."""

    def forward(self, x, k, v):
        q = x.transpose(1, 2).clone()
        F.relu(q, inplace=True)
        return flat(F.scaled_dot_product_attention(q, k, v))


def test_operand_copy_written_in_place():
    def inputs():
        q, k, v = qkv()
        return (q.detach().transpose(1, 2).contiguous().requires_grad_(), k, v)

    assert_like_eager(ReluInPlaceOnCopy, inputs)


class OutputWrittenAfterCopy(nn.Module):
    """The attention output is written in place after its BSHD copy was taken."""

    def forward(self, q, k, v):
        o = hand_written(q, k, v)
        out = o.transpose(1, 2).contiguous().view(B, S, H * D)
        o.mul_(2)
        return out, o.sum(-1)


class OutputViewWrittenAfterCopy(nn.Module):
    def forward(self, q, k, v):
        o = hand_written(q, k, v)
        t = o.transpose(1, 2)
        out = t.contiguous().view(B, S, H * D)
        t.mul_(2)
        return out, t.sum(-1)


class OutputCopyWrittenThenOutputReread(nn.Module):
    """The BSHD copy of the output is written; the output itself is read afterwards."""

    def forward(self, q, k, v):
        o = F.scaled_dot_product_attention(q, k, v)
        t = o.transpose(1, 2).clone()
        t.mul_(2)
        return t.reshape(B, S, H * D), o.sum(-1)


@pytest.mark.parametrize("model", [OutputWrittenAfterCopy, OutputViewWrittenAfterCopy,
                                   OutputCopyWrittenThenOutputReread])
def test_output_written_in_place(model):
    assert_like_eager(model)


class OutputOfBshdSourceWrittenAfterCopy(nn.Module):
    """q from a [B, S, H, D] view: the portable lowering's SDPA then writes its output in BSHD, so
    ``.contiguous()`` of the transposed output copies nothing."""

    def forward(self, x):
        q = x.view(B, S, H, D).transpose(1, 2)
        o = hand_written(q, q, q)
        out = o.transpose(1, 2).contiguous().view(B, S, H * D)
        o.mul_(2)
        return out, o.sum(-1)


def test_output_written_in_place_portable():
    """target="portable" (plain SDPA on views)."""
    inputs = lambda: (torch.randn(B, S, H * D, dtype=torch.float64, requires_grad=True),)  # noqa: E731
    rep = run_exported(lambda: OutputOfBshdSourceWrittenAfterCopy().double(), inputs, target="portable")
    assert rep["error"] is None and not rep["errors"], rep["error"] or rep["errors"]
    assert rep["mismatch"] is None, rep["mismatch"]


# --- export's graph signature -------------------------------------------------------------------
class ArgumentNamedInput(nn.Module):
    def forward(self, input):
        q = input.view(B, S, H, D).transpose(1, 2)
        return flat(F.scaled_dot_product_attention(q, q, q))


class AttentionIsTheOutput(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_argument_named_input():
    assert_like_eager(ArgumentNamedInput, lambda: (torch.randn(B, S, H * D, dtype=torch.float64,
                                                               requires_grad=True),), lowered=True)


def test_attention_output_is_the_program_output():
    assert_like_eager(AttentionIsTheOutput, lowered=True)
