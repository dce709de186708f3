"""Differential fuzzing of attnopt against eager PyTorch.

Generated attention modules (``spellings.py``: every spelling attnopt claims, and near misses)
run eager, under ``torch.compile(backend=attnopt.backend("aot_eager"))``, and through
``torch.export`` + ``attnopt.optimize`` (``target="op"`` and ``"portable"``), in float64 on CPU. A
case fails when the output or any gradient (inputs and parameters) differs from eager, when attnopt
raises or falls back with a warning, or when a claimed spelling is not lowered (compile and op).

Default run (part of the normal suite): 30 examples per family (sdpa, hand, megatron),
deterministic. Long run, environment variables:

- ``ATTNOPT_FUZZ_EXAMPLES=N``: about N cases in all (split over the families; ``-k hand`` runs one);
- ``ATTNOPT_FUZZ_SEED=S``: a random seed instead of the fixed examples; a run split over processes
  gives each process its own seed;
- ``ATTNOPT_FUZZ_REPORT=path.json``: per-category counts, failures, one repro per failure kind
  under ``path_repros/``, and one JSON line per case (spec, sites found and lowered, warnings,
  errors, differences) in ``path.cases.jsonl``;
- ``ATTNOPT_FUZZ_RAISE=1``: raise at the first failure, so hypothesis shrinks it.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, seed, settings

from .harness import Tally, run_case
from .spellings import FAMILIES, specs

_EXAMPLES = int(os.environ.get("ATTNOPT_FUZZ_EXAMPLES", "0"))
_SEED = os.environ.get("ATTNOPT_FUZZ_SEED")
_REPORT = os.environ.get("ATTNOPT_FUZZ_REPORT")
_RAISE = os.environ.get("ATTNOPT_FUZZ_RAISE") == "1"

_COMMON = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("attnopt-fuzz", max_examples=30, derandomize=_SEED is None, **_COMMON)
settings.register_profile("attnopt-fuzz-long", max_examples=max(_EXAMPLES // len(FAMILIES), 1),
                          derandomize=_SEED is None, **_COMMON)
PROFILE = settings.get_profile("attnopt-fuzz-long" if _EXAMPLES else "attnopt-fuzz")

TALLY = Tally(log=os.path.splitext(_REPORT)[0] + ".cases.jsonl" if _REPORT else None)
_SHOWN = 3  # failure kinds printed with their full repro; the rest by name


def _explore(family: str) -> Tally:
    tally = Tally()

    @PROFILE
    @given(specs(family, uniform=not _RAISE, salt=int(_SEED or 0)))
    def explore(spec) -> None:
        out = run_case(spec)
        tally.add(out)
        TALLY.add(out)
        if _REPORT and TALLY.cases % 25 == 0:
            TALLY.write(_REPORT)
        if _RAISE and (out.failures or out.invalid):
            raise AssertionError("\n".join(out.failures) or out.invalid)

    if _SEED is not None:
        explore = seed(int(_SEED))(explore)
    try:
        explore()
    finally:
        if _REPORT:
            TALLY.write(_REPORT)
    return tally


@pytest.mark.parametrize("family", FAMILIES)
def test_differential(family: str) -> None:
    tally = _explore(family)
    generator_bugs = [k for k in tally.invalid if ": eager: " in k]
    assert not generator_bugs, "generated code fails in eager:\n" + "\n".join(generator_bugs)
    if tally.failures:
        pytest.fail(tally.summary(repros=_SHOWN), pytrace=False)
