"""Numerical parity: one reference set, per-input statistics, and the parity rule.

The reference is the unfused model run in float64. A candidate (a fusion step, an artifact in its
runtime) is judged input by input against *the original model's own error* in the candidate's
precision, because on inputs unlike the data a checkpoint's BatchNorm statistics came from, the
original model evaluated in fp32 is itself far from fp64 (its BatchNorm scales amplify rounding):

    r_i  fp64 reference output of input i          s_i = max|r_i|
    c_i  candidate output                          e_i = max|c_i - r_i|
    floor_i = max over F draws of max|f_i - r_i|, where the draws are the unfused model run in the
              candidate's precision (fp16/bf16: CPU autocast), plainly and with every weight and
              buffer perturbed by a random relative amount of that precision's unit roundoff.

    fp32       passes when every input has e_i <= max(1e-4·s_i, K·floor_i)
    fp16/bf16  e_i <= max(2e-2·s_i, K·floor_i) and 1 - cos_i <= max(1e-3, K·(1 - floorcos_i))
    int8       on decoded images only: 1 - cos_i <= max(0.01, K8·(1 - bf16cos_i)), where bf16cos_i is the
               worst cosine of the original model's own bf16 draws on input i; and top-1 agreement >= 95 %
               over the decisive images (those whose top-1 every bf16 draw keeps); near-ties are reported

K = 4 and F = 5 draws come from measurement (benchmarks/parity_floor.py): a single fp32 run is one
noisy draw of the rounding error (a correct fusion was 6.4x a single-run floor on one input), while
every correct candidate measured stayed within 2x of the five-draw floor. Inputs whose floor is
small are decided by the tolerance and are what catch bugs; a report says how many there were.
K8 = 8 the same way (benchmarks/int8_floor_factor.py): the int8 artifacts of four in-distribution checkpoints
that pass on every input their calibration covers needed K8 up to 3.4 on the inputs where the model's own bf16
loss decides; a doubled activation scale and a calibration on blank images fail 37 and 41 of 41 inputs at
K8 = 8 (36 and 38 at 16): they fail where the model is stable, which K8 does not touch.

The second look: on an input where the model is chaotic, its rounding-level draws are heavy-tailed (LeViT-192
on one synthetic image: 35 of 40 fp32 draws within 1.2e-3·s, one at 5.7e-2·s), so five draws can miss what
the model itself does and a correct fold fails. An input that fails is therefore judged again on
F + 27 = 32 draws, drawn once for that input and kept in the reference set; an input the model computes
stably gains little from them, so a real bug still fails there. When more than half of the inputs fail, there is
no second look: a heavy tail is a property of the few inputs where the model is chaotic, not of most of them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from .env import int8_products_saturate
from .reference import EXTRA_DRAWS, FLOOR_DRAWS, IMAGE_KINDS, ReferenceSet, floor_draws, run_module

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
FLOOR_FACTOR = 4  # K
INT8_FLOOR_FACTOR = 8  # K8: int8's cosine slack per unit of the model's own bf16 cosine loss (measured, see above)
MIN_DECISIVE = 0.5  # int8: at least this fraction of the images must be decisive, or top-1 cannot be judged


@dataclass(frozen=True)
class Rule:
    """The parity rule of one precision (see the module docstring)."""

    tol: float | None  # e_i <= max(tol·s_i, K·floor_i); None: no bound on e
    min_cosine: float | None  # 1 - cos_i <= max(1 - min_cosine, K·(1 - floorcos_i))
    min_top1: float | None  # fraction of the decisive gating inputs whose top-1 agrees
    floor_precision: str | None = None  # the precision whose floor draws bound this one (default: its own)
    factor: float = FLOOR_FACTOR  # K
    images_only: bool = False  # judge on decoded images only (int8)


#: int8 has no floor of its own (no "int8 draw" of a float model exists); its bounds are relative to bf16, the
#: coarsest float format and the closest to int8's rounding: an image the model cannot compute stably in bf16
#: is excused by that, one it computes stably keeps int8 to 1 - cos <= 0.01
RULES = {
    "fp32": Rule(1e-4, None, None),
    "fp16": Rule(2e-2, 0.999, None),
    "bf16": Rule(2e-2, 0.999, None),
    "int8": Rule(None, 0.99, 0.95, floor_precision="bf16", factor=INT8_FLOOR_FACTOR, images_only=True),
}


@dataclass
class KindSummary:
    """How one kind of input fared: the largest e, floor and s, the bound that decided, the verdict."""

    kind: str
    n: int
    gating: bool
    max_e_over_s: float
    max_floor_over_s: float
    max_s: float
    worst_margin: float  # max e_i / bound_i (<= 1 passes)
    decided_by_tolerance: int  # inputs whose bound was tol·s_i (small floor: where bugs show)
    decided_by_floor: int
    min_cosine: float
    failed: int


@dataclass
class ParityReport:
    """A candidate against the reference set: per-input statistics, per-kind summaries, the verdict."""

    stage: str
    precision: str
    inputs: str  # what the inputs were, e.g. "7 photos + 4 noise + 4 synthetic"
    n: int
    max_abs: float
    mean_abs: float
    p99_abs: float
    ref_scale: float  # max s_i
    max_e_over_s: float
    worst_margin: float  # max over gating inputs of e_i / bound_i: <= 1 passes
    min_cosine: float
    top1_agreement: float
    top5_overlap: float
    passed: bool
    weak: bool  # no gating input had a small floor: the gate only caught errors as large as the floor
    kinds: list[KindSummary] = field(default_factory=list)
    per_input: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ParityReport":
        d = dict(d)
        d["kinds"] = [KindSummary(**k) for k in d.get("kinds", [])]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures[:3])
        kinds = ", ".join(f"{k.kind} {k.n - k.failed}/{k.n} (worst e/bound {k.worst_margin:.2g})"
                          for k in self.kinds if k.gating)
        return (f"{self.stage} [{self.precision}] {verdict} — {kinds}; max e/s {self.max_e_over_s:.2g}, "
                f"cos ≥ {self.min_cosine:.6f}, top-1 {self.top1_agreement:.0%}")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-300)


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, precision: str = "fp32",
                    stage: str = "candidate", floors: np.ndarray | None = None,
                    kinds: Sequence[str] | None = None, names: Sequence[str] | None = None,
                    inputs: str = "", rule: Rule | None = None) -> ParityReport:
    """Judge candidate outputs (N, classes) against fp64 reference outputs by the rule of ``precision``.

    ``floors``: the floor draws [draws, N, classes] in the rule's floor precision; None means a zero floor (the
    plain tolerance), which is right only for well-conditioned inputs.
    """
    if precision not in RULES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    rule = rule or RULES[precision]
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"{stage}: output shape {cand.shape} differs from the reference {ref.shape}")
    n = ref.shape[0]
    kinds = list(kinds) if kinds is not None else ["inputs"] * n
    names = list(names) if names is not None else [f"input {i}" for i in range(n)]
    finite = np.all(np.isfinite(cand), axis=1)
    cand = np.nan_to_num(cand, nan=0.0, posinf=0.0, neginf=0.0)
    floor = _Floor.of(ref, floors)
    gating = np.array([not rule.images_only or k in IMAGE_KINDS for k in kinds])
    verdict = _Verdict.judge(rule, ref, cand, floor, finite)
    failures = _failures(rule, precision, verdict, floor, gating, finite, kinds, names)
    decisive = gating & floor.keeps_top1
    top1 = float(verdict.top1_hits[decisive].mean()) if decisive.any() else 0.0
    k = min(5, ref.shape[1])
    ref_top5, cand_top5 = np.argsort(-ref, 1)[:, :k], np.argsort(-cand, 1)[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top5, cand_top5)]))
    weak = bool(floors is not None and gating.any() and not (verdict.by_tol & gating).any())
    notes = _notes(rule, precision, verdict, gating, decisive, weak)
    return ParityReport(
        stage=stage, precision=precision, inputs=inputs or f"{n} inputs", n=n, max_abs=float(verdict.e.max()),
        mean_abs=float(np.abs(cand - ref).mean()), p99_abs=float(np.quantile(np.abs(cand - ref), 0.99)),
        ref_scale=float(verdict.s.max()), max_e_over_s=float((verdict.e / verdict.s).max()),
        worst_margin=float(verdict.margin[gating].max()) if gating.any() else np.inf,
        min_cosine=float(verdict.cos.min()), top1_agreement=top1, top5_overlap=overlap, passed=not failures,
        weak=weak, kinds=_kind_summaries(verdict, floor, gating, kinds),
        per_input=_per_input(verdict, floor, gating, kinds, names), failures=failures, notes=notes)


@dataclass
class _Floor:
    """What the floor draws say per input: the largest error, the worst cosine, whether every draw keeps the
    reference's top-1 (the input is decisive) or some draw flips it (a near-tie)."""

    error: np.ndarray
    cos: np.ndarray
    keeps_top1: np.ndarray

    @classmethod
    def of(cls, ref: np.ndarray, floors: np.ndarray | None) -> "_Floor":
        n = ref.shape[0]
        if floors is None:
            return cls(np.zeros(n), np.ones(n), np.ones(n, dtype=bool))
        return cls(np.abs(floors - ref[None]).max(2).max(0), np.stack([_cosine(ref, f) for f in floors]).min(0),
                   np.all(floors.argmax(2) == ref.argmax(1)[None], axis=0))


@dataclass
class _Verdict:
    """Per-input statistics and bounds: e, s, cosine, the bound on e, the cosine slack, which bound decided,
    e/bound (<= 1 passes), pass/fail, top-1 agreement."""

    e: np.ndarray
    s: np.ndarray
    cos: np.ndarray
    bound: np.ndarray
    cos_slack: np.ndarray
    by_tol: np.ndarray
    margin: np.ndarray
    ok: np.ndarray
    top1_hits: np.ndarray

    @classmethod
    def judge(cls, rule: Rule, ref: np.ndarray, cand: np.ndarray, floor: _Floor, finite: np.ndarray) -> "_Verdict":
        n = ref.shape[0]
        e = np.abs(cand - ref).max(1)
        s = np.maximum(np.abs(ref).max(1), 1e-30)
        cos = _cosine(ref, cand)
        tol_bound = rule.tol * s if rule.tol is not None else np.full(n, np.inf)
        bound = np.maximum(tol_bound, rule.factor * floor.error)
        margin = e / bound
        ok = finite & (margin <= 1)
        by_tol = tol_bound >= rule.factor * floor.error
        cos_slack = np.full(n, np.inf)
        if rule.min_cosine is not None:
            plain = 1 - rule.min_cosine
            cos_slack = np.maximum(plain, rule.factor * (1 - floor.cos))
            margin = np.maximum(margin, (1 - cos) / cos_slack)
            ok &= (1 - cos) <= cos_slack
            if rule.tol is None:  # a cosine-only rule (int8) is decided by whichever cosine bound is larger
                by_tol = plain >= rule.factor * (1 - floor.cos)
        return cls(e, s, cos, bound, cos_slack, by_tol, margin, ok, ref.argmax(1) == cand.argmax(1))


def _failures(rule: Rule, precision: str, v: _Verdict, floor: _Floor, gating: np.ndarray, finite: np.ndarray,
              kinds: list[str], names: list[str]) -> list[str]:
    failures = []
    if not finite.all():
        failures.append(f"{int((~finite).sum())} inputs with non-finite outputs")
    if not gating.any():
        failures.append(f"no decoded images among the inputs: {precision} is judged on images only")
    for i in np.flatnonzero(gating & ~v.ok):
        failures.append(f"{names[i]} ({kinds[i]}): e {v.e[i]:.3g} = {v.e[i] / v.s[i]:.2g}·s > bound {v.bound[i]:.3g}"
                        if np.isfinite(v.bound[i]) and v.e[i] > v.bound[i]
                        else f"{names[i]} ({kinds[i]}): cosine {v.cos[i]:.6f} below its bound "
                             f"{1 - v.cos_slack[i]:.6f}")
    if rule.min_top1 is not None and gating.any():
        decisive = gating & floor.keeps_top1
        if decisive.sum() < MIN_DECISIVE * gating.sum():
            failures.append(f"only {int(decisive.sum())} of {int(gating.sum())} images are decisive (the original "
                            f"model keeps its own top-1 in every {rule.floor_precision or precision} draw): top-1 "
                            f"cannot be judged on these images")
        elif (top1 := float(v.top1_hits[decisive].mean())) < rule.min_top1:
            failures.append(f"top-1 agreement {top1:.1%} < {rule.min_top1:.0%} over the {int(decisive.sum())} "
                            f"decisive images")
    return failures


def _notes(rule: Rule, precision: str, v: _Verdict, gating: np.ndarray, decisive: np.ndarray, weak: bool
           ) -> list[str]:
    notes = []
    if weak:
        tightest = float((v.bound / v.s)[gating].min()) if rule.tol is not None else float(v.cos_slack[gating].min())
        what = f"errors above {tightest:.2g}·s" if rule.tol is not None else f"1 - cos above {tightest:.2g}"
        notes.append(f"no input had a small floor: every bound came from the original model's own "
                     f"{rule.floor_precision or precision} error, so only {what} could be caught; add "
                     f"well-conditioned images (--images DIR) to make the gate strict")
    ties = int((gating & ~decisive).sum())
    if rule.min_top1 is not None and ties:
        flipped = int((gating & ~decisive & ~v.top1_hits).sum())
        notes.append(f"{ties} near-tie image(s) (a {rule.floor_precision or precision} draw of the original model "
                     f"flips their top-1) left out of top-1 agreement; {flipped} of them flipped here")
    return notes


def _kind_summaries(v: _Verdict, floor: _Floor, gating: np.ndarray, kinds: list[str]) -> list[KindSummary]:
    out = []
    for kind in dict.fromkeys(kinds):
        m = np.array([kk == kind for kk in kinds])
        out.append(KindSummary(
            kind=kind, n=int(m.sum()), gating=bool(gating[m].any()), max_e_over_s=float((v.e / v.s)[m].max()),
            max_floor_over_s=float((floor.error / v.s)[m].max()), max_s=float(v.s[m].max()),
            worst_margin=float(v.margin[m].max()), decided_by_tolerance=int((v.by_tol & m).sum()),
            decided_by_floor=int((~v.by_tol & m).sum()), min_cosine=float(v.cos[m].min()),
            failed=int((m & gating & ~v.ok).sum())))
    return out


def _per_input(v: _Verdict, floor: _Floor, gating: np.ndarray, kinds: list[str], names: list[str]) -> list[dict]:
    return [{"name": names[i], "kind": kinds[i], "s": float(v.s[i]), "e": float(v.e[i]), "floor": float(floor.error[i]),
             "bound": float(v.bound[i]), "decided_by": "tolerance" if v.by_tol[i] else "floor",
             "cosine": float(v.cos[i]), "floor_cosine": float(floor.cos[i]), "cosine_slack": float(v.cos_slack[i]),
             "decisive": bool(floor.keeps_top1[i]), "top1_agrees": bool(v.top1_hits[i]), "gating": bool(gating[i]),
             "passed": bool(v.ok[i])} for i in range(len(names))]


def run_candidate(candidate, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """Outputs of a torch module (run in float32), a Runtime, or any callable, on ``inputs``."""
    if isinstance(candidate, torch.nn.Module):
        return run_module(candidate.eval(), inputs, batch)
    if hasattr(candidate, "infer"):
        return np.concatenate([candidate.infer(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])
    return np.asarray(candidate(inputs))


def compare(reference: ReferenceSet, candidate, precision: str = "fp32", stage: str = "candidate",
            batch: int = 16) -> ParityReport:
    """Run ``candidate`` on the reference set's inputs (``batch`` at a time) and judge it by the rule of ``precision``.

    A runtime whose outputs are not logits (a CoreML classifier gives log-probabilities) declares
    ``output_transform``; the reference and the floors are mapped through it before comparing.
    """
    out = run_candidate(candidate, reference.inputs, batch)
    report = judge(reference, out, precision, stage, getattr(candidate, "output_transform", None))
    if precision == "int8" and not report.passed and reference.model is not None:
        report.notes.append(_conditioning_note(reference))
    manifest = getattr(candidate, "manifest", None) or {}
    note = saturation_note(manifest.get("artifact", {}).get("quantization", {}), manifest.get("machine", {}).get("cpu"))
    if note:
        report.notes.append(note)
    return report


def saturation_note(quantization: dict, gated_on: dict | None = None) -> str | None:
    """Why an int8 artifact may be off here: its kernels (``quantization["kernels"]``, as the backend recorded them)
    saturate on this CPU. ``gated_on``: the ``cpu_info`` of the machine its export was gated on, when not this one."""
    kernels = (quantization or {}).get("kernels", {})
    if not (kernels.get("saturate_without_vnni") and int8_products_saturate()):
        return None
    unlike = ", unlike on the CPU its export was gated on" if gated_on and not int8_products_saturate(gated_on) else ""
    return (f"this CPU has no int8 dot product (VNNI/AMX): the artifact's {kernels['weights']} weights saturate its "
            f"int8 kernels here{unlike}; for kernels exact on every CPU, export with {kernels['exact_with']}")


def judge(reference: ReferenceSet, outputs: np.ndarray, precision: str = "fp32", stage: str = "candidate",
          transform=None) -> ParityReport:
    """Judge a candidate's ``outputs`` on the reference set's inputs, with the second look (module docstring):
    inputs that fail on the five-draw floor are judged again on 32 draws of the model's own error."""
    floor_precision = RULES[precision].floor_precision or precision
    report = _judge_once(reference, outputs, precision, stage, transform, floor_precision)
    gating = [row for row in report.per_input if row["gating"]]
    failing = [i for i, row in enumerate(report.per_input) if row["gating"] and not row["passed"]
               and np.all(np.isfinite(outputs[i]))]
    if report.passed or len(failing) > len(gating) / 2:  # a heavy tail is one input's, not most inputs'
        return report
    if not (widened := reference.widen_floors(floor_precision, failing)):
        return report
    second = _judge_once(reference, outputs, precision, stage, transform, floor_precision)
    excused = [reference.names[i] for i in widened if second.per_input[i]["passed"]]
    second.notes.append(f"second look: {len(widened)} input(s) that failed on {FLOOR_DRAWS} draws of the original "
                        f"model's own {floor_precision} error were judged on {FLOOR_DRAWS + EXTRA_DRAWS}; "
                        + (f"excused: {', '.join(excused)} (the model itself is that unstable there)" if excused
                           else "none was within the wider floor"))
    return second


def _judge_once(reference: ReferenceSet, outputs: np.ndarray, precision: str, stage: str, transform,
                floor_precision: str) -> ParityReport:
    transform = transform or (lambda a: a)
    floors = reference.floors(floor_precision)
    return compare_outputs(transform(reference.outputs), outputs, precision, stage,
                           np.stack([transform(f) for f in floors]), reference.kinds, reference.names,
                           reference.describe())


def _conditioning_note(reference: ReferenceSet) -> str:
    """Why an int8 artifact may fail for the checkpoint's sake: how the original model itself fares in bf16
    (8 significant bits, finer than int8's steps) on the same images."""
    images = np.array([k in IMAGE_KINDS for k in reference.kinds])
    bf16 = floor_draws(reference.model, reference.inputs[images], "bf16", draws=1)[0]
    ref = reference.outputs[images]
    agree = float(np.mean(ref.argmax(1) == bf16.argmax(1)))
    return (f"for scale: the original model itself, computed in bf16, reaches cosine >= {_cosine(ref, bf16).min():.4f} "
            f"and top-1 agreement {agree:.0%} on these images; when that is far from the int8 bound, the checkpoint "
            f"amplifies rounding too much for any 8-bit format and fp32 (or fp16 with its floor-relative rule) is "
            f"the way to deploy it")
