"""transformers decoders in training mode (``model.train()``, dropout 0) through torch.compile and
torch.export + attnopt.optimize: the logits and every parameter gradient equal eager's.

The matrix: Llama, Qwen3, Mistral (sliding window), Gemma 3 (a sliding-window and a global layer)
and OLMo 2; transformers' "sdpa" and "eager" attention code; plain, left-padded and packed batches
(position ids that restart). The loss reads every position, padded ones included (a random
gradient over all logits), so the rows of a left-padded batch that keep no key count too.

Each case also states what attnopt did at every site (``EXPECTED``): lowered, and what became of the
mask transformers built, or left as written, and why.

Eager attention computes its softmax in float32 whatever the model's dtype
(``softmax(scores, dtype=torch.float32)``): in a float64 model that cast narrows the scores, so those
sites are left as written. float64 runs exclude eager attention on left-padded batches: there
transformers itself returns NaN (its float64 ``finfo.min`` mask overflows to -inf in the float32
softmax, so padded rows are all -inf).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnopt
from tests.conftest import Capture

from . import transformers_models as tm

MODELS = list(tm.CAUSAL_LM_CONFIGS)
IMPLS = ("sdpa", "eager")
_PACKED = torch.cat([torch.arange(10), torch.arange(6)]).repeat(2, 1)
_LEFT_PADDED = torch.tensor([[0, 0, 0] + [1] * 13, [1] * 16])  # rows 0-2 of the first sequence keep no key
BATCHES = {"plain": None, "left_padded": ("attention_mask", _LEFT_PADDED), "packed": ("position_ids", _PACKED)}

# the band each layer's mask is proven to be, in layer order
_CAUSAL, _WINDOW = "k - q <= 0", "k - q <= 0 & k - q >= -4"
BANDS = {"llama": (_CAUSAL, _CAUSAL), "qwen3": (_CAUSAL, _CAUSAL), "mistral": (_WINDOW, _WINDOW),
         "gemma3": (_WINDOW, _CAUSAL), "olmo2": (_CAUSAL, _CAUSAL)}

# (batch, attention code) -> what every site shows: ("lowered", what runs instead of transformers' mask)
# or ("left as written", a fragment of the reason). Eager attention adds a float mask, finfo.min where
# masked; in a left-padded batch the padding queries keep no key, and there the softmax written in the
# model averages every key and differentiates through the masked scores, which no fused kernel
# reproduces (their saved log-sum-exp, finfo.min + log(Sk), rounds to finfo.min)
EXPECTED = {
    ("plain", "sdpa"): ("lowered", "mask removed"),
    ("plain", "eager"): ("lowered", "mask removed"),
    ("packed", "sdpa"): ("lowered", "mask removed, documents run as packed sequences (thd)"),
    ("packed", "eager"): ("lowered", "mask removed, documents run as packed sequences (thd)"),
    ("left_padded", "sdpa"): ("lowered", "dense mask removed, key padding passed as a [B, 1, 1, Sk] mask"),
    ("left_padded", "eager"): ("left as written", "may mask a row entirely with finite values"),
}
_NARROWING = ("left as written", "a cast of the scores from torch.float64 to torch.float32 changes their values")


def _structure_matches(structure: str, batch: str, band: str) -> bool:
    """The mask a site was proven to have is the layer's band (over positions in a packed batch,
    within a document), and the padding where the batch is padded."""
    if batch == "plain":
        return structure == band
    if batch == "left_padded":
        return structure.startswith(f"{band} & key padding (")
    return structure.startswith("same document (") and structure.endswith(">= -4") == (band == _WINDOW)


_FLOAT32, _TIGHT = (1e-4, 1e-5), (1e-9, 1e-12)  # (rtol, atol relative to the tensor's largest magnitude)


def _build(name: str, impl: str, batch: str, dtype: torch.dtype) -> tuple[nn.Module, tuple]:
    extra = BATCHES[batch]
    model = tm.causal_lm(tm.CAUSAL_LM_CONFIGS[name](), impl, dtype, extra and extra[0]).train()
    ids = torch.randint(0, 100, (2, 16))
    return model, (ids, *([extra[1]] if extra else []))


def _param_grads(out: torch.Tensor, params: dict, grad: torch.Tensor) -> dict:
    got = torch.autograd.grad(out, list(params.values()), grad, allow_unused=True)
    return dict(zip(params, got))


def _compiled(model: nn.Module, inputs: tuple) -> tuple[torch.Tensor, dict, list]:
    """Logits, the parameters they were computed from, and the distinct site reports (Dynamo may
    compile a frame twice when it restarts its analysis: the second compile repeats the sites)."""
    capture = Capture("aot_eager")
    torch._dynamo.reset()
    out = torch.compile(model, backend=capture.backend)(*inputs)
    sites = {(s.module, s.name): s for _, _, result in capture.graphs for s in result.sites}
    return out, dict(model.named_parameters()), list(sites.values())


def _exported(model: nn.Module, inputs: tuple) -> tuple[torch.Tensor, dict, list]:
    ep = torch.export.export(model, inputs)
    new_ep, result = attnopt.optimize(ep, strict=True, return_result=True)
    module = new_ep.module()
    return module(*inputs), dict(module.named_parameters()), result.sites


ENTRIES = {"compile": _compiled, "export": _exported}


def _check_sites(name: str, impl: str, batch: str, dtype: torch.dtype, sites: list) -> None:
    assert len(sites) == len(BANDS[name]), [(s.module, s.name) for s in sites]
    assert {s.kind for s in sites} == {"sdpa" if impl == "sdpa" else "hand_written"}
    done, note = _NARROWING if (impl, dtype) == ("eager", torch.float64) else EXPECTED[(batch, impl)]
    if done == "left as written":
        assert all(s.status == "skipped" and note in (s.reason or "") for s in sites), [s.reason for s in sites]
        return
    assert all(s.status == "lowered" for s in sites), [(s.module, s.reason) for s in sites]
    for site, band in zip(sites, BANDS[name]):  # graph order is layer order
        structure, _, fate = (site.mask or "").partition(": ")
        assert fate == note and _structure_matches(structure, batch, band), site.mask


def _check(name: str, impl: str, batch: str, entry: str, dtype: torch.dtype) -> None:
    model, inputs = _build(name, impl, batch, dtype)
    ref = model(*inputs)
    grad = torch.randn_like(ref)
    want = _param_grads(ref, dict(model.named_parameters()), grad)
    out, params, sites = ENTRIES[entry](model, inputs)
    _check_sites(name, impl, batch, dtype, sites)
    tol = _TIGHT if dtype == torch.float64 else _FLOAT32
    _assert_close(out, ref, tol, "logits")
    got = _param_grads(out, params, grad)
    assert got.keys() == want.keys()
    for param, g in got.items():
        assert (g is None) == (want[param] is None), param
        if g is not None:
            _assert_close(g, want[param], tol, f"grad of {param}")


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float], what: str) -> None:
    """Elementwise within ``rtol``, or within ``scale`` times the tensor's largest magnitude (a
    gradient summed over many positions, such as a tied embedding's, has entries near zero that
    only its scale can judge)."""
    rtol, scale = tol
    torch.testing.assert_close(got, want, rtol=rtol, atol=scale * want.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def _case(name: str, impl: str, batch: str, entry: str, dtype: torch.dtype, slow: bool):
    dt = str(dtype).removeprefix("torch.")
    return pytest.param(name, impl, batch, entry, dtype, marks=[pytest.mark.slow] if slow else [],
                        id=f"{name}-{impl}-{batch}-{entry}-{dt}")


CASES = [_case(m, i, b, e, torch.float32, slow=False) for m in MODELS for i in IMPLS for b in BATCHES for e in ENTRIES]
CASES += [_case(m, i, b, e, torch.float64, slow=m != "llama")
          for m in MODELS for i in IMPLS for b in BATCHES for e in ENTRIES if (i, b) != ("eager", "left_padded")]


@pytest.mark.parametrize("name,impl,batch,entry,dtype", CASES)
def test_training_logits_and_parameter_gradients_match_eager(name, impl, batch, entry, dtype):
    _check(name, impl, batch, entry, dtype)
