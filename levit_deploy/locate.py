"""Where an artifact first disagrees: the module whose output diverges, found by bisecting prefixes of its graph.

The deployed model is a chain of units (the family's ``locate_units``: stem, blocks, head), and the shipped graph
computes the same chain. The value *after* unit i is the input of unit i + 1; in the shipped graph it is the
first tensor after unit i's weights that every path from the input to unit i + 1's weights passes through (a cut,
found by dominance from the parameter names the weights keep, see ``probe.Graph.cut``). A prefix of the shipped graph up to that tensor runs in
the artifact's own runtime on a debug copy (the shipped files are only read); the fp64 reference and the floors
at the same point come from the deployed model, with the output's floor-relative rule. A fault in unit k leaves
every value before it as it was and moves every value after it, so bisection over the N cuts needs about
log2 N prefix runs after the full run that shows the output diverges.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from .artifacts import is_artifact
from .backends import open_artifact, open_runtime
from .checkpoints import resolve
from .families import family_of
from .fuse import fuse
from .parity import ParityReport, Rule, RULES, compare, compare_outputs
from .probe import Graph, LocateError
from .quantize import sensitivity
from .reference import IMAGE_KINDS, ReferenceSet, build_reference_set, floor_draws, reference_outputs

#: inside the model int8 is judged by cosine against the bf16 floor, as at the output; top-1 means nothing there
INTERNAL_RULES = {**RULES, "int8": Rule(None, 0.99, None, floor_precision="bf16", factor=RULES["int8"].factor,
                                        images_only=True)}


@dataclass
class Cut:
    """The value after ``unit``: the input of ``next_unit`` (None: the model's output); in the graph, one of
    ``tensors`` (see probe.Graph.cuts), ``tensor`` once a run has told which."""

    unit: str
    next_unit: str | None
    tensors: list[str]

    @property
    def tensor(self) -> str:
        return self.tensors[-1]


@dataclass
class Checked:
    unit: str
    tensor: str
    passed: bool
    worst_e_over_bound: float
    min_cosine: float
    worst_input: str

    @classmethod
    def of(cls, cut: Cut, report: ParityReport) -> "Checked":
        worst = max(report.per_input, key=lambda r: r["e"] / r["bound"] if r["gating"] and r["bound"] > 0 else -1)
        return cls(cut.unit, cut.tensor, report.passed, report.worst_margin, report.min_cosine, worst["name"])


@dataclass
class LocateReport:
    artifact: str
    precision: str
    units: int  # cuts found in the graph
    prefix_runs: int  # prefix runs of the bisection (the full run of the gate not counted)
    max_runs: int  # ceil(log2 N) + 1
    output: ParityReport
    checked: list[Checked]
    first_divergent: Checked | None
    unmapped: list[str]  # units whose weights no graph node reads (folded away): merged into the next one
    #: int8: the quantized layers by their error contribution (1 - cos of the output when that layer alone is
    #: quantized, quantize.sensitivity), largest first
    int8_ranking: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "precision": self.precision, "units": self.units,
                "prefix_runs": self.prefix_runs, "max_runs": self.max_runs, "unmapped": self.unmapped,
                "first_divergent": None if self.first_divergent is None else {
                    "module": self.first_divergent.unit, "worst_e_over_bound": self.first_divergent.worst_e_over_bound,
                    "input": self.first_divergent.worst_input, "tensor": self.first_divergent.tensor},
                "checked": [asdict(c) for c in self.checked],
                "int8_ranking": [{"layer": name, "one_minus_cos": score} for name, score in self.int8_ranking]}


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` matches ``name`` part by part (``stages.*`` matches ``stages.3``, not ``stages.3.inner``)."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, wanted))


def units_in_order(model: torch.nn.Module, patterns: tuple[str, ...], size: int) -> list[str]:
    """The deployed model's modules matching ``patterns``, in the order a forward reaches them."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
             for name, m in model.named_modules() if any(_matches(name, p) for p in patterns)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def cuts(graph: Graph, units: list[str]) -> tuple[list[Cut], list[str]]:
    """The cut after each unit (the last unit's is the graph output). A unit the graph has no weights of, or whose
    entry is no single tensor, has no cut before it: it shares one cut with the unit before it ("a + b").
    Returns (cuts, the units without a cut before them)."""
    found, unmapped, span = [], [], [units[0]]
    last = max(graph.owned(units[0]), default=-1)
    for following in units[1:]:
        tensors = graph.cuts(last, following)
        if not tensors:
            unmapped.append(following)
            span.append(following)
        else:
            found.append(Cut(" + ".join(span), following, tensors))
            span = [following]
        last = max([last, *graph.owned(following)])
    found.append(Cut(" + ".join(span), None, [graph.output]))
    return _merge(found), unmapped


def _merge(found: list[Cut]) -> list[Cut]:
    """Consecutive cuts at the same tensors are one: the later unit names it."""
    merged: list[Cut] = []
    for cut in found:
        if merged and merged[-1].tensors == cut.tensors:
            merged[-1] = cut
        else:
            merged.append(cut)
    return merged


class _Judge:
    """Judges the value at one cut against the deployed model's fp64 value and floors there."""

    def __init__(self, deploy: torch.nn.Module, reference: ReferenceSet, precision: str):
        self.deploy, self.reference, self.precision = deploy, reference, precision
        self.rule = INTERNAL_RULES[precision]

    def __call__(self, cut: Cut, values: list[np.ndarray]) -> tuple[str, ParityReport]:
        """(the tensor that holds the value after the unit, its report): of the candidate tensors with as many
        values as the unit's input, the one closest to the reference (a wrong candidate, before or after a
        weightless normalisation, is off by the order of the values themselves)."""
        ref = reference_outputs(self.deploy, self.reference.inputs, at=cut.next_unit)
        fitting = [(t, v) for t, v in zip(cut.tensors, values) if v.shape == ref.shape]
        if not fitting:
            raise LocateError(f"no tensor of the graph before {cut.next_unit} holds its {ref.shape[1]} input values "
                              f"per image ({', '.join(cut.tensors)}): the unit's boundary cannot be found")
        floors = floor_draws(self.deploy, self.reference.inputs, self.rule.floor_precision or self.precision,
                             at=cut.next_unit)
        reports = [(t, compare_outputs(ref, v, self.precision, stage=f"after {cut.unit}", floors=floors,
                                       kinds=self.reference.kinds, names=self.reference.names, rule=self.rule))
                   for t, v in fitting]
        return min(reports, key=lambda tr: tr[1].worst_margin)


def locate(artifact, images=None, status: Callable[[str], None] = lambda _: None) -> LocateReport:
    """Find the first unit of the deployed model after which ``artifact`` diverges from the fp64 reference."""
    if not is_artifact(artifact):
        raise LocateError(f"{artifact}: --locate takes an artifact folder (one with a manifest.json)")
    manifest, folder, _, backend = open_artifact(artifact)
    if backend.probe is None:
        raise LocateError(f"--locate is not available for {backend.name} artifacts (no way to run a prefix of "
                          f"their graph here)")
    model = resolve(folder).model()
    reference = build_reference_set(model, images=[images] if images else ())
    status(f"{model.config.name}: the whole artifact on {reference.describe()} …")
    with open_runtime(folder, threads=None) as runtime:
        output = compare(reference, runtime, runtime.precision, stage="artifact output")
        precision = runtime.precision  # what ran (an OpenVINO fp16 IR computing in fp32 is judged as fp16)
    deploy = fuse(model, check=False)
    units = units_in_order(deploy, family_of(model).locate_units, model.config.img_size)
    probe = backend.probe(folder, manifest, deploy)
    found, unmapped = cuts(probe.graph(), units)
    bound = math.ceil(math.log2(max(len(found), 2))) + 1
    if output.passed:
        return LocateReport(str(folder), precision, len(found), 0, bound, output, [], None, unmapped)
    judge, checked = _Judge(deploy, reference, precision), {}
    lo, hi = 0, len(found) - 1  # the output (cut hi) diverges; find the first cut that does
    runs = 0
    while lo < hi:
        mid = (lo + hi) // 2
        status(f"prefix run {runs + 1}: the value after {found[mid].unit} …")
        tensor, report = judge(found[mid], probe.run(found[mid].tensors, reference.inputs))
        found[mid].tensors = [tensor]
        runs += 1
        checked[mid] = Checked.of(found[mid], report)
        lo, hi = (lo, mid) if not report.passed else (mid + 1, hi)
    checked.setdefault(len(found) - 1, Checked.of(found[-1], output))
    first = checked.get(lo) or Checked.of(found[lo], output)
    return LocateReport(str(folder), precision, len(found), runs, bound, output,
                        [checked[i] for i in sorted(checked)], first, unmapped,
                        _int8_ranking(manifest, deploy, reference, status) if precision == "int8" else [])


def _int8_ranking(manifest: dict, deploy: torch.nn.Module, reference: ReferenceSet,
                  status: Callable[[str], None]) -> list[tuple[str, float]]:
    """The quantized layers ranked by how much error each adds alone, on the decoded images."""
    layers = manifest["artifact"].get("quantization", {}).get("layers", [])
    images = np.array([k in IMAGE_KINDS for k in reference.kinds])
    if not layers or not images.any():
        return []
    status(f"int8: ranking {len(layers)} quantized layers by their error contribution …")
    scores = sensitivity(deploy, reference.inputs[images], layers)
    return sorted(scores.items(), key=lambda kv: -kv[1])
