"""Run one generated case three ways (eager, torch.compile through attnopt, torch.export +
attnopt.optimize), compare forward and backward, classify the outcome and keep counts.

The comparison functions (``outputs_and_grads``, ``compare``, ``run_compiled``,
``run_exported``) are also pasted verbatim into each printed repro, so a repro checks exactly
what the fuzzer checked.
"""
from __future__ import annotations

import inspect
import json
import linecache
import os
import re
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import attnopt

from .spellings import Spec, render


# --- the checks (also pasted into repros: keep them self-contained) ---------------------------
def outputs_and_grads(outs, leaves):
    """The outputs as a tuple and the gradients of every leaf for a fixed random grad_output."""
    outs = outs if isinstance(outs, tuple) else (outs,)
    if not leaves:  # inference: nothing requires grad
        return outs, ()
    gen = torch.Generator().manual_seed(1234)
    seeds = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    return outs, torch.autograd.grad(outs, leaves, seeds, allow_unused=True)


def compare(ref, got, what, rtol=1e-8, atol=1e-10):
    """None when equal (NaN where eager has NaN), else what differs. float64 kernels agree to
    ~1e-14; a float32 round trip is ~1e-7 off."""
    for i, (r, g) in enumerate(zip(ref, got)):
        if (r is None) != (g is None):
            return f"{what}[{i}]: None vs tensor"
        if r is None:
            continue
        try:
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as e:
            nan = f" (eager NaN at {int(r.isnan().sum())}, attnopt NaN at {int(g.isnan().sum())})"
            return f"{what}[{i}]: " + str(e).strip().splitlines()[0] + (nan if r.isnan().any() else "")
    return None


def run_compiled(make_model, make_inputs, dynamic=False):
    """Eager against torch.compile(backend=attnopt.backend("aot_eager")): sites and differences."""
    model, results = make_model(), []
    args = make_inputs()
    leaves = [a for a in args if a.requires_grad] + [p for p in model.parameters() if p.requires_grad]
    ref, ref_grads = outputs_and_grads(model(*args), leaves)
    torch._dynamo.reset()
    backend = attnopt.backend("aot_eager", on_result=lambda before, after, result: results.append(result))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            compiled = torch.compile(model, backend=backend, dynamic=dynamic or None)
            got, got_grads = outputs_and_grads(compiled(*args), leaves)
            error = None
        except Exception as e:  # noqa: BLE001 - a crash is an outcome to report
            error = f"{type(e).__name__}: {e}"
    torch._dynamo.reset()
    report = {"sites": [s for r in results for s in r.sites], "errors": [r.error for r in results if r.error],
              "warnings": [str(w.message) for w in caught if "attnopt" in str(w.message)], "error": error}
    if error is None:
        report["mismatch"] = compare(ref, got, "output") or compare(ref_grads, got_grads, "grad")
    return report


def run_exported(make_model, make_inputs, dynamic=False, target="op"):
    """Eager against torch.export + attnopt.optimize(..., target=target).module(): sites and
    differences."""
    model = make_model()
    args = make_inputs()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    leaves = [a for a in args if a.requires_grad]
    ref, ref_grads = outputs_and_grads(model(*args), leaves + list(params.values()))
    result = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dims = tuple({i: torch.export.Dim.AUTO for i in range(a.dim())} for a in args) if dynamic else None
            ep = torch.export.export(model, args, dynamic_shapes=dims)
            new_ep, result = attnopt.optimize(ep, target=target, return_result=True)
            module = new_ep.module()
            mine = dict(module.named_parameters())
            got, got_grads = outputs_and_grads(module(*args), leaves + [mine[n] for n in params])
            error = None
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
    report = {"sites": list(result.sites) if result else [], "errors": [result.error] if result and result.error
              else [], "warnings": [str(w.message) for w in caught if "attnopt" in str(w.message)], "error": error}
    if error is None:
        report["mismatch"] = compare(ref, got, "output") or compare(ref_grads, got_grads, "grad")
    return report


# read once at import: the file may change on disk while a long run is going
_CHECKS = "\n\n".join(inspect.getsource(f) for f in (outputs_and_grads, compare, run_compiled, run_exported))
_REPRO_MAIN = '''

if __name__ == "__main__":
    for name, run, kw in (("compile", run_compiled, {{}}), ("export", run_exported, {{}}),
                          ("portable", run_exported, {{"target": "portable"}})):
        report = run(make_model, make_inputs, dynamic={dynamic}, **kw)
        print(name, "error:", report["error"], "| mismatch:", report.get("mismatch"))
        print("   ", [(s.status, s.reason, s.mask) for s in report["sites"]], report["warnings"])
'''


# --- one case --------------------------------------------------------------------------------
# mode -> how it runs; a claimed spelling must be lowered in the first two ("portable" emits plain
# SDPA, which declines softcaps, packed documents and more by design: only its numerics are checked)
MODES = {"compile": run_compiled, "export": run_exported,
         "portable": lambda make_model, make_inputs, dynamic: run_exported(make_model, make_inputs, dynamic,
                                                                          target="portable")}
_MUST_LOWER = ("compile", "export")

# Reasons a claimed spelling may legitimately stay as written: (substring of the site's reason,
# the cases it applies to, why that is right). Everything else left as written in a claimed case
# is a failure.
_DATA_MASKS = ("padding", "cache_position", "cache_length", "mask_and_causal_flag")
ACCEPTED_SKIPS: tuple[tuple[str, Callable[[Spec], bool], str], ...] = (
    ("a scale applied after the mask scales the mask too", lambda spec: True,
     "the README claims a scale on the scores or on q before the mask; after a finite mask the factor "
     "changes the mask's values too (only a -inf fill survives it, which is lowered)"),
    ("an additive mask may mask a row entirely with finite values",
     lambda spec: spec.mask.name in _DATA_MASKS or spec.sq != spec.sk or spec.dynamic,
     "a row may keep no key: the mask reads input data (padding, cache positions), or its band or chunks "
     "leave rows of a cross attention (Sq != Sk) or of lengths known only at run time without a key; there a "
     "finite fill averages every key, and the gradient through that average depends on the kernel that runs"),
)


# Run-time refusals the README documents: (substring of the error, the cases it applies to, why).
# A refusal fails loudly where the rewrite would not hold; it is counted apart from crashes.
DOCUMENTED_REFUSALS: tuple[tuple[str, Callable[[Spec], bool], str], ...] = (
    ("ran past the cache", lambda spec: spec.mask.name == "cache_overflow",
     "a KV-cache mask lowered to key lengths asserts on the device when the new tokens run past the end "
     "of the cache (a model's own cache update fails there first)"),
)


def _refused(detail: str, spec: Spec) -> bool:
    return any(key in detail and applies(spec) for key, applies, _ in DOCUMENTED_REFUSALS)


@dataclass
class Outcome:
    """What one case did in every mode, and the verdict."""

    spec: Spec
    source: str
    reports: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # "<mode>: <kind>: <detail>"
    invalid: Optional[str] = None  # the generated code fails in eager: a generator bug
    unsupported: list[str] = field(default_factory=list)  # modes that fail without attnopt too (torch's limits)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time: the cost on a shared machine

    def kinds(self) -> set[str]:
        return {f.split(": ")[1] for f in self.failures}

    def lowered(self, mode: str) -> int:
        return sum(s.status == "lowered" for s in self.reports.get(mode, {}).get("sites", []))

    def record(self) -> dict:
        """One line of the per-case log: what was generated and what each mode did."""
        modes = {}
        for mode, rep in self.reports.items():
            modes[mode] = {"sites": len(rep["sites"]), "lowered": self.lowered(mode),
                           "skipped": [s.reason for s in rep["sites"] if s.status != "lowered"],
                           "warned": list(rep["warnings"]), "raised": rep["error"],
                           "mismatch": rep.get("mismatch")}
        return {"family": self.spec.family, "category": self.spec.category, "spelling": self.spec.spelling,
                "decoy": self.spec.decoy, "spec": self.spec.describe(), "modes": modes, "failures": self.failures,
                "invalid": self.invalid, "unsupported": self.unsupported, "seconds": round(self.seconds, 3),
                "cpu_seconds": round(self.cpu_seconds, 3)}

    def repro(self) -> str:
        head = f"# {self.spec.spelling} ({'decoy' if self.spec.decoy else 'claimed'}): " + "; ".join(
            self.failures or [self.invalid or ""] + self.unsupported)
        main = _REPRO_MAIN.format(dynamic=self.spec.dynamic)
        return f"{head}\nimport warnings\n\nimport attnopt\n{self.source}\n\n{_CHECKS}{main}"


def load(source: str, name: str) -> dict:
    """Execute generated source under a file name tracebacks and Dynamo can show."""
    filename = f"<attnopt-fuzz {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict = {"__name__": "attnopt_fuzz_case"}
    exec(compile(source, filename, "exec"), ns)  # noqa: S102 - the generator's own output
    return ns


def _eager_fails(ns: dict) -> Optional[str]:
    try:
        model, args = ns["make_model"](), ns["make_inputs"]()
        leaves = [a for a in args if a.requires_grad] + [p for p in model.parameters() if p.requires_grad]
        outputs_and_grads(model(*args), leaves)
    except Exception as e:  # noqa: BLE001
        return f"eager: {type(e).__name__}: {e}"
    return None


def _baseline_fails(ns: dict, mode: str, dynamic: bool) -> Optional[str]:
    """The same run without attnopt: when it fails too, the case tests torch, not attnopt."""
    model, args = ns["make_model"](), ns["make_inputs"]()
    try:
        if mode == "compile":
            torch._dynamo.reset()
            run = torch.compile(model, backend="aot_eager", dynamic=dynamic or None)
        else:
            dims = tuple({i: torch.export.Dim.AUTO for i in range(a.dim())} for a in args) if dynamic else None
            run = torch.export.export(model, args, dynamic_shapes=dims).module()
        leaves = [a for a in args if a.requires_grad]  # the exported module has parameters of its own
        ref = outputs_and_grads(model(*args), leaves)
        got = outputs_and_grads(run(*args), leaves)
        return compare(ref[0], got[0], "output") or compare(ref[1], got[1], "grad")
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    finally:
        torch._dynamo.reset()


# Masks the README says are replaced by what kernels take natively (is_causal / window_size,
# packed documents, a [B, 1, 1, Sk] padding vector), in self-attention; a lowered site that still
# runs them as a dense mask is a rewrite that does less than claimed.
_DOCUMENT_BANDS = ("none", "index_causal", "position_causal", "position_window")


def _mask_must_go(spec: Spec) -> bool:
    m = spec.mask
    if spec.decoy or spec.sq != spec.sk or m.name not in ("causal", "window", "bottom_right", "all_true",
                                                          "padding", "documents"):
        return False
    if m["form"] == "additive_masked_fill":  # zeros().masked_fill(~keep, -inf): not a claimed spelling
        return False
    if m.name == "documents":
        return m["band"] in _DOCUMENT_BANDS
    return not (m.name == "padding" and m["form"] in ("additive_min", "additive_tensor0"))  # a padded row may keep no key


def mask_kept(site) -> bool:
    """The lowered site still runs its mask as written (``mask_action``; older reports say so in
    their ``mask`` note)."""
    action = getattr(site, "mask_action", None)
    return action == "kept" if action is not None else site.has_mask and "removed" not in (site.mask or "")


def _accepted(reason: Optional[str], spec: Spec) -> bool:
    return reason is not None and any(key in reason and applies(spec) for key, applies, _ in ACCEPTED_SKIPS)


def run_case(spec: Spec) -> Outcome:
    start, cpu = time.perf_counter(), time.process_time()
    source = render(spec)
    out = Outcome(spec, source)
    ns = load(source, spec.spelling)
    out.invalid = _eager_fails(ns)
    if out.invalid:
        out.seconds, out.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        return out
    for mode, run in MODES.items():
        rep = run(ns["make_model"], ns["make_inputs"], spec.dynamic)
        out.reports[mode] = rep
        crashed = rep["error"] or rep["errors"] or any("passes failed" in w for w in rep["warnings"])
        if rep["error"] or rep.get("mismatch"):
            base = _baseline_fails(ns, "compile" if mode == "compile" else "export", spec.dynamic)
            if base:
                out.unsupported.append(f"{mode} without attnopt: {_short(base)}")
                continue
        if crashed:
            detail = rep["error"] or (rep["errors"] + [w for w in rep["warnings"] if "passes failed" in w])[0]
            if _refused(str(detail), spec):
                out.unsupported.append(f"{mode} refused at run time, as documented: {_short(detail)}")
                continue
            out.failures.append(f"{mode}: crash: {_short(detail)}")
        elif rep.get("mismatch"):
            out.failures.append(f"{mode}: wrong: {rep['mismatch']}")
        elif not spec.decoy and mode in _MUST_LOWER:  # every site lowered, or skipped for an accepted reason
            reasons = [s.reason for s in rep["sites"] if s.status != "lowered" and not _accepted(s.reason, spec)]
            kept = [s.mask for s in rep["sites"] if s.status == "lowered" and s.has_mask and mask_kept(s)]
            if reasons or not rep["sites"]:
                out.failures.append(f"{mode}: not_lowered: {_short('; '.join(map(str, reasons)) or 'no site found')}")
            elif kept and _mask_must_go(spec):
                out.failures.append(f"{mode}: mask_kept: {_short(str(kept[0]))}")
    out.seconds, out.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return out


def _short(text: str, n: int = 300) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= n else text[: n - 3] + "..."


# --- counts ----------------------------------------------------------------------------------
_COUNTERS = ("cases", "true_sites", "decoys", "lowered_true", "lowered_decoys", "left_decoys", "wrong", "crash",
             "not_lowered", "mask_kept", "invalid", "unsupported")


@dataclass
class FailureKind:
    """Failures with one signature: how many, the first one's text and repro, and the spellings
    (family/focus) they came from."""

    first: str
    repro: str
    count: int = 0
    spellings: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {"count": self.count, "first": self.first, "spellings": dict(self.spellings.most_common())}


@dataclass
class Tally:
    """Per-category and per-spelling counts of a run, and the first repro of each failure kind."""

    by_category: dict = field(default_factory=lambda: defaultdict(lambda: dict.fromkeys(_COUNTERS, 0)))
    by_spelling: dict = field(default_factory=lambda: defaultdict(lambda: dict.fromkeys(_COUNTERS, 0)))
    failures: dict[str, FailureKind] = field(default_factory=dict)
    invalid: dict = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    cases: int = 0
    log: Optional[str] = None  # a JSON-lines file that gets one record per case (emptied first)

    def __post_init__(self) -> None:
        if self.log:
            open(self.log, "w").close()

    def add(self, out: Outcome) -> None:
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps(out.record()) + "\n")
        self.cases += 1
        self.seconds += out.seconds
        self.cpu_seconds += out.cpu_seconds
        s = out.spec
        modes = [m for m in _MUST_LOWER if m in out.reports]
        lowered_any = any(out.lowered(m) for m in modes)
        lowered_all = bool(modes) and all(out.lowered(m) for m in modes)
        for table, key in ((self.by_category, f"{s.family}/{s.category}"),
                           (self.by_spelling, f"{s.family}/{s.spelling}")):
            row = table[key]
            row["cases"] += 1
            row["invalid"] += out.invalid is not None
            row["unsupported"] += bool(out.unsupported)
            if s.decoy:
                row["decoys"] += 1
                row["lowered_decoys" if lowered_any else "left_decoys"] += 1
            else:
                row["true_sites"] += 1
                row["lowered_true"] += lowered_all
            for kind in ("wrong", "crash", "not_lowered", "mask_kept"):
                row[kind] += kind in out.kinds()
        for problem in ([out.invalid] if out.invalid else []) + out.unsupported:
            self.invalid.setdefault(f"{s.family}/{s.spelling}: {_short(problem, 160)}", out.repro())
        for failure in out.failures:
            mode, kind, detail = failure.split(": ", 2)
            signature = f"{kind} [{mode}] {_signature(kind, detail, s)}"
            if signature not in self.failures:
                self.failures[signature] = FailureKind(failure, out.repro())
            self.failures[signature].count += 1
            self.failures[signature].spellings[f"{s.family}/{s.spelling}{' dynamic' if s.dynamic else ''}"] += 1

    def to_json(self) -> dict:
        return {"attnopt": os.path.dirname(attnopt.__file__), "torch": torch.__version__,
                "cases": self.cases, "seconds": round(self.seconds, 2),
                "seconds_per_case": round(self.seconds / max(self.cases, 1), 3),
                "cpu_seconds_per_case": round(self.cpu_seconds / max(self.cases, 1), 3),
                "by_category": dict(self.by_category), "by_spelling": dict(sorted(self.by_spelling.items())),
                "failures": {k: f.to_json() for k, f in sorted(self.failures.items())},
                "invalid": sorted(self.invalid)}

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1, sort_keys=False)
        folder = os.path.splitext(path)[0] + "_repros"
        os.makedirs(folder, exist_ok=True)
        for old in os.listdir(folder):  # numbering shifts as failure kinds are added
            if old.endswith(".py"):
                os.remove(os.path.join(folder, old))
        for i, (sig, kind) in enumerate(sorted(self.failures.items())):
            with open(os.path.join(folder, f"{i:03d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', sig)[:80]}.py"), "w") as f:
                f.write(kind.repro)

    def summary(self, repros: int = 3) -> str:
        """Counts of every failure kind, and the repro of the first ``repros`` kinds."""
        failures = sorted(self.failures.items())
        lines = [f"{sum(f.count for _, f in failures)} failures in {self.cases} cases "
                 f"({self.seconds / max(self.cases, 1):.2f} s, {self.cpu_seconds / max(self.cases, 1):.2f} CPU s per "
                 f"case), {len(failures)} kinds:"]
        for sig, kind in failures:
            where = ", ".join(f"{k} x{n}" for k, n in kind.spellings.most_common(4))
            lines.append(f"  {kind.count}x {sig}   [{where}]")
        for sig, kind in failures[:repros]:
            lines.append(f"\n==== {sig}\n{kind.first}\n{kind.repro}")
        lines += [f"not run: {sig}" for sig in sorted(self.invalid)]
        return "\n".join(lines)


def _signature(kind: str, detail: str, spec: Spec) -> str:
    """What groups failures of one cause: for a crash the exception and the start of its message
    (it rarely depends on the spelling), otherwise the case's family and focus spelling and what
    differs."""
    if kind == "crash":
        words = [w for w in re.sub(r"\[[^]]*\]|'[^']*'", "", detail).split()
                 if not re.search(r"[_\d]", w) or w.endswith(":")]  # node names and sizes vary
        return " ".join(words[:8])
    m = re.match(r"(output|grad)\[\d+\]", detail)
    what = (m.group(1) + (" NaN" if "NaN" in detail else "")) if m else detail[:60]
    return f"{spec.family}/{spec.spelling}{' dynamic' if spec.dynamic else ''}: {what}"
