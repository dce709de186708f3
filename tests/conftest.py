"""Shared test helpers: compile through attnopt and collect what its passes reported."""
from __future__ import annotations

import pytest
import torch

import attnopt


class Capture:
    """A torch.compile backend that runs attnopt (strict) and keeps every before/after graph.

    Its target is "op" unless given: the tests check what attnopt recognised by the op it emits,
    which "auto" replaces with plain SDPA wherever SDPA computes the site for less (the CPU's case)."""

    def __init__(self, inner: str = "aot_eager", target: str = "op", **kw):
        self.graphs: list = []
        self.backend = attnopt.backend(inner, strict=True, target=target, on_result=self._keep, **kw)

    def _keep(self, before, after, result):
        self.graphs.append((before, after, result))

    @property
    def after(self):
        return self.graphs[-1][1]

    @property
    def result(self):
        return self.graphs[-1][2]


@pytest.fixture
def capture():
    torch._dynamo.reset()
    yield Capture()
    torch._dynamo.reset()


def assert_grads_match(model_fn, inputs, params, ref_fn, rtol=1e-4, atol=1e-5):
    """Forward and backward of model_fn equal ref_fn's on the same inputs."""
    out = model_fn(*inputs)
    ref = ref_fn(*inputs)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    grad = torch.randn_like(ref)
    leaves = [t for t in (*inputs, *params) if t.requires_grad]
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
