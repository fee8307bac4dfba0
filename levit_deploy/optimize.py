"""optimize: the fastest artifact that passes its gate on this machine, chosen by measurement, with a report.

Every target x precision that can run here is exported and gated against one reference set (int8 with the
remedy of :mod:`levit_deploy.quantize`); a refusal is listed with its one-line reason and never chosen. The
passing artifacts and the unfused PyTorch model (the baseline) are then timed side by side in one interleaved
run (:mod:`levit_deploy.bench`: the paper's protocol for throughput, batch 1 for latency), each also reopened in a
fresh process for its cold start and memory. The chosen artifact is copied to ``OUT/best`` as a normal artifact
folder; ``OUT/report.md``, ``OUT/report.png`` (speed against accuracy, Pareto front marked) and
``OUT/report.json`` say what was tried and why it won.
"""
from __future__ import annotations

import datetime
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .artifacts import export_lock, publish, read_manifest, staging
from .bench import BenchCase, Protocol, run_cases
from .backends import ExportError, backends, module_runtime, open_runtime
from .calibration import calibration_set
from .checkpoints import resolve
from .env import cpu_info, fingerprint, package_versions, require, text_table, write_json_atomic
from .export import ExportParityError, export
from .families import spec_for_model
from .fuse import FusionError
from .parity import compare
from .reference import build_reference_set

OBJECTIVES = {"throughput": 16, "latency": 1}  # objective -> batch (CPU): the paper's protocol, or one image
PRECISIONS = ("fp32", "bf16", "int8")
BF16_ISA = ("avx512_bf16", "amx_bf16")


@dataclass
class Candidate:
    """One target x precision: how it fared at the gate and, if it passed, on the clock."""

    target: str  # export target, or the PyTorch runtime for the baseline
    precision: str
    status: str = "pending"  # passed, refused, error, skipped, baseline, interrupted
    reason: str | None = None
    artifact: str | None = None
    export_s: float | None = None
    images_per_s: float | None = None
    images_per_s_ci: list | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cold_start_ms: float | None = None
    peak_rss_mb: float | None = None
    size_mb: float | None = None
    worst_cos: float | None = None
    worst_e_over_bound: float | None = None
    top1_agreement: float | None = None
    kept_float: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.target} {self.precision}"

    @property
    def compute(self) -> str | None:
        """bf16 is an fp32 artifact computed in bf16 by its runtime."""
        return "bf16" if self.precision == "bf16" else None


@dataclass
class OptimizeResult:
    best: Candidate | None
    candidates: list[Candidate]
    out_dir: Path
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        best = None if self.best is None else {"target": self.best.target, "precision": self.best.precision,
                                               "images_per_s": self.best.images_per_s,
                                               "p50_ms": self.best.p50_ms, "artifact": str(self.out_dir / "best")}
        return {"best": best, "candidates": [asdict(c) for c in self.candidates], "interrupted": self.interrupted,
                "notes": self.notes, "report": {k: str(self.out_dir / f"report.{k}") for k in ("md", "png", "json")}}


def plan(targets: list[str] | None, precisions: list[str] | None) -> tuple[list[Candidate], list[str]]:
    """The candidates that can run here, and a note for each default one that cannot (asked-for ones that
    cannot are listed as skipped, with the reason)."""
    usable = {b.name: b for b in backends().values() if b.write is not None and b.usable()}
    unknown = sorted(set(targets or ()) - {b.name for b in backends().values() if b.write is not None})
    if unknown:
        raise ExportError(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(usable)}")
    bad = sorted(set(precisions or ()) - set(PRECISIONS))
    if bad:
        raise ExportError(f"unknown precision(s) {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
    has_bf16 = any(f in cpu_info()["isa"] for f in BF16_ISA)
    chosen, notes = [], []
    for name in targets or list(usable):
        backend = backends()[name]
        for precision in precisions or PRECISIONS:
            cand = Candidate(name, precision)
            if name not in usable:
                cand.status, cand.reason = "skipped", f"{name} cannot run on this machine (not installed, or it needs {backend.needs})"
            elif precision == "bf16" and "bf16" not in backend.compute_precisions:
                cand.status, cand.reason = "skipped", f"{backend.runtime} does not compute in bf16"
            elif precision == "bf16" and not has_bf16:
                cand.status, cand.reason = "skipped", f"this CPU has no native bf16 ({' or '.join(BF16_ISA)})"
            elif precision != "bf16" and precision not in backend.precisions:
                cand.status, cand.reason = "skipped", f"{name} exports {', '.join(backend.precisions)}"
            if cand.status == "skipped" and not precisions:  # defaults: drop what cannot be, say why for bf16
                if precision == "bf16" and "bf16" in backend.compute_precisions and name in usable:
                    notes.append(f"{cand.name}: not tried, {cand.reason}")
                continue
            chosen.append(cand)
    return chosen, notes


def optimize(model_target: str, out_dir: Path, weights=None, init: str = "pretrained", entry: str | None = None,
             calib=None, images=(), objective: str = "throughput", targets: list[str] | None = None,
             precisions: list[str] | None = None, duration: float = 10.0, threads: int = 1,
             command: str = "", status: Callable[[str], None] = lambda m: None,
             progress: Callable[[int, int], None] = lambda done, total: None) -> OptimizeResult:
    """Export and gate every candidate, time the passing ones side by side, keep the fastest; see the module."""
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    candidates, notes = plan(targets, precisions)
    out_dir = Path(out_dir)
    model = resolve(model_target, weights, init, entry).model()
    status(f"{model.config.name}: {len(candidates)} candidates ({', '.join(c.name for c in candidates)}); "
           "building the reference set …")
    reference = build_reference_set(model, spec_for_model(model), images=images)
    calibration = None
    if any(c.precision == "int8" and c.status == "pending" for c in candidates):
        calibration = calibration_set(spec_for_model(model), calib)
        status(f"int8 calibrates on {len(calibration.inputs)} images from {calibration.source}")
        if calibration.warning():
            notes.append(calibration.warning())
    result = OptimizeResult(None, candidates, out_dir, notes=notes)
    result.interrupted = _export_all(model, candidates, out_dir / "candidates", reference, calibration, status,
                                     progress)
    if not result.interrupted:
        source = {"model": str(model_target), "weights": weights and str(weights), "init": init, "entry": entry}
        result.interrupted = _time_all(model, source, candidates, objective, duration, threads, status)
    result.best = _choose(candidates, objective)
    if result.best is not None:
        _keep(result.best, out_dir / "best")
    write_report(result, model.config.name, objective, threads, command)
    return result


def _export_all(model, candidates: list[Candidate], folder: Path, reference, calibration, status, progress) -> bool:
    """Export and gate each pending candidate; True if interrupted (the rest are marked so)."""
    pending = [c for c in candidates if c.status == "pending"]
    for i, cand in enumerate(pending):
        progress(i, len(pending))
        status(f"[{i + 1}/{len(pending)}] {cand.name}: exporting and gating …")
        started = time.perf_counter()
        recipes = [c.kept_float for c in candidates if c.precision == "int8" and c.status == "passed" and c.kept_float]
        try:
            _export_one(model, cand, folder / f"{cand.target}-{cand.precision}", reference, calibration, status,
                        recipes[0] if recipes and cand.precision == "int8" else None)
        except KeyboardInterrupt:
            for rest in pending[i:]:
                rest.status, rest.reason = "interrupted", "Ctrl-C before it was exported"
            return True
        finally:
            cand.export_s = round(time.perf_counter() - started, 1)
        status(f"[{i + 1}/{len(pending)}] {cand.name}: {cand.status}" + (f" ({cand.reason})" if cand.reason else ""))
    progress(len(pending), len(pending))
    return False


def _export_one(model, cand: Candidate, folder: Path, reference, calibration, status,
                recipe: list[str] | None = None) -> None:
    """Export (bf16: the fp32 artifact, judged again as computed in bf16); the candidate records the verdict.
    int8 with ``recipe`` (the layers an earlier int8 candidate kept in float): that recipe is replayed first —
    one attempt instead of a search of five to eight, each a minute or more — and searched only if refused."""
    export_precision = "fp32" if cand.precision == "bf16" else cand.precision
    int8 = {"calibration": calibration} if export_precision == "int8" else {}
    try:
        if recipe:
            try:
                status(f"{cand.name}: replaying the recipe of an earlier int8 candidate ({len(recipe)} layers in "
                       "float) before searching")
                artifact = export(model, cand.target, folder, precision="int8", reference=reference, status=status,
                                  keep_float=",".join(recipe), **int8)
                cand.reason = f"recipe replayed from an earlier int8 candidate ({len(recipe)} layers in float)"
            except (ExportParityError, ExportError) as e:
                status(f"{cand.name}: the replayed recipe did not pass ({str(e).splitlines()[0][:120]}); searching")
                artifact = export(model, cand.target, folder, precision="int8", reference=reference, status=status,
                                  **int8)
        else:
            artifact = export(model, cand.target, folder, precision=export_precision, reference=reference,
                              status=status, **int8)
    except ExportParityError as e:
        cand.status, cand.reason = "refused", _first_failure(e.report)
        return
    except FusionError as e:  # the fused model already disagrees with the reference: a gate too
        cand.status, cand.reason = "refused", str(e).splitlines()[0][:240]
        return
    except (ExportError, ImportError, RuntimeError, ValueError) as e:
        cand.status, cand.reason = "error", str(e).splitlines()[0][:240]
        return
    parity = artifact.manifest["parity"]
    if cand.compute:
        with open_runtime(folder, None, "cpu", None, compute=cand.compute) as rt:
            report = compare(reference, rt, rt.precision, stage=f"{cand.target} artifact, {cand.compute} compute")
        if not report.passed:
            cand.status, cand.reason = "refused", _first_failure(report)
            return
        parity = report.to_dict()
    cand.status, cand.artifact = "passed", str(folder)  # a replayed recipe keeps its note in ``reason``
    cand.size_mb = artifact.manifest["artifact"]["size_bytes"] / 1e6
    cand.worst_cos, cand.worst_e_over_bound = parity.get("min_cosine"), parity.get("worst_margin")
    cand.top1_agreement = parity.get("top1_agreement")
    recipe = artifact.manifest["artifact"].get("quantization", {}).get("recipe", {})
    cand.kept_float = list(recipe.get("keep_float", []))


def _first_failure(report) -> str:
    return (report.failures[0] if report.failures else report.summary())[:240]


def _time_all(model, source: dict, candidates: list[Candidate], objective: str, duration: float, threads: int,
              status) -> bool:
    """The baseline (``source``: how a fresh process rebuilds it) and every passing candidate in one interleaved
    run; True if interrupted."""
    protocol = Protocol(threads=threads, batch=OBJECTIVES[objective], warmup_s=min(2.0, duration / 3),
                        duration_s=duration, img_size=model.config.img_size)
    base = Candidate(module_runtime(), "fp32", "baseline", "the unfused model in PyTorch eager, what users start from")
    candidates.insert(0, base)
    passing = [c for c in candidates if c.status == "passed"]
    cases = [BenchCase("baseline", lambda: open_runtime(model, module_runtime(), "cpu", threads), module_runtime(),
                       baseline=True, cold=source)]
    cases += [BenchCase(c.name, lambda c=c: open_runtime(c.artifact, None, "cpu", threads,
                                                         **({"compute": c.compute} if c.compute else {})),
                        c.target, c.precision, cold={"artifact": c.artifact, "compute": c.compute}) for c in passing]
    status(f"timing {len(cases)} cases side by side: {objective} (batch {protocol.batch}, {threads} thread(s)), "
           f"{duration:g} s each (Ctrl-C stops and reports what was measured) …")
    results, interrupted = run_cases(cases, None, protocol)
    for cand, r in zip([base, *passing], results):
        if r.status != "ok":
            cand.status, cand.reason = "error", r.error
        for key in ("images_per_s", "images_per_s_ci", "p50_ms", "p99_ms", "cold_start_ms", "peak_rss_mb"):
            setattr(cand, key, getattr(r, key))
    return interrupted


def _choose(candidates: list[Candidate], objective: str) -> Candidate | None:
    timed = [c for c in candidates if c.status == "passed" and c.images_per_s]
    if not timed:
        return None
    return max(timed, key=lambda c: c.images_per_s) if objective == "throughput" else min(timed, key=lambda c: c.p50_ms)


def _keep(best: Candidate, folder: Path) -> None:
    """The chosen artifact as a normal folder, written as an export is (lock, staging, one-rename publish, so a
    half-copied folder never replaces an earlier choice); a bf16 choice records that its runtime computes in bf16."""
    manifest, source = read_manifest(best.artifact)
    if best.compute:
        manifest["artifact"].setdefault("runtime_options", {})["compute"] = best.compute
    files = list(manifest["artifact"]["files"])
    with export_lock(folder) as out, staging(out) as stage:
        for name in files:
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, stage / name)
        publish(files, stage, out, manifest)


def write_report(result: OptimizeResult, model_name: str, objective: str, threads: int, command: str) -> None:
    """report.json, report.md and report.png in the output folder."""
    result.out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**result.to_dict(), "model": model_name, "objective": objective, "threads": threads,
           "machine": fingerprint(threads), "versions": package_versions("torch", "onnxruntime", "openvino", "nncf",
                                                                         "executorch"),
           "command": command, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(result.out_dir / "report.json", doc)
    (result.out_dir / "report.md").write_text(_markdown(result, doc))
    plot_candidates(result, result.out_dir / "report.png", f"{model_name}: {objective}, {threads} thread(s)")


def table_rows(candidates: list[Candidate]) -> list[tuple]:
    """The candidates table, shared by the terminal and report.md."""
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    rows = [("candidate", "status", "img/s", "95% CI", "p50 ms", "cold ms", "peak MB", "size MB", "worst cos",
             "e/bound", "kept in float", "export s")]
    for c in candidates:
        ci = "-" if not c.images_per_s_ci else f"{c.images_per_s_ci[0]:.1f}-{c.images_per_s_ci[1]:.1f}"
        rows.append((c.name, c.status, f(c.images_per_s, ".1f"), ci, f(c.p50_ms, ".1f"), f(c.cold_start_ms, ".0f"),
                     f(c.peak_rss_mb, ".0f"), f(c.size_mb, ".1f"), f(c.worst_cos, ".4f"),
                     f(c.worst_e_over_bound, ".2g"), str(len(c.kept_float)) if c.precision == "int8" and c.status
                     == "passed" else "-", f(c.export_s, ".0f")))
    return rows


def _markdown(result: OptimizeResult, doc: dict) -> str:
    rows = table_rows(result.candidates)
    lines = [f"# levit-deploy optimize: {doc['model']}", "",
             f"Objective: **{doc['objective']}** (batch {OBJECTIVES[doc['objective']]}, {doc['threads']} thread(s)). "
             f"Machine: {doc['machine']['cpu']['model']} ({doc['machine']['cpu']['arch']}, "
             f"{doc['machine']['cpu_count']} CPUs; ISA {', '.join(doc['machine']['cpu']['isa'])}). {doc['created']}.",
             ""]
    best = result.best
    lines.append(f"**Chosen: {best.name}**, {best.images_per_s:.1f} img/s, p50 {best.p50_ms:.1f} ms — `best/`."
                 if best else "**Nothing chosen**: no candidate both passed its gate and was timed.")
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows[1:]]
    reasons = [f"- {c.name}: {c.status}: {c.reason}" for c in result.candidates
               if c.reason and c.status not in ("baseline", "passed")]
    kept = [f"- {c.name} keeps in float: {', '.join(c.kept_float)}" + (f" ({c.reason})" if c.reason else "")
            for c in result.candidates if c.kept_float]
    lines += ["", "Refusals and skips (never chosen):" if reasons else "", *reasons]
    lines += ["", "Notes:", *kept, *(f"- {n}" for n in result.notes)] if kept or result.notes else []
    lines += ["", "img/s: median of the interleaved run with its bootstrap 95 % interval; cold: a fresh process "
              "opening the artifact and running one batch; worst cos and e/bound: the export's parity gate (int8: "
              "the floor-relative int8 rule).", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v),
              "", "Reproduce:", "", f"    {doc['command']}", "", "![speed against accuracy](report.png)", ""]
    return "\n".join(lines)


def plot_candidates(result: OptimizeResult, path: Path, title: str) -> None:
    """Speed against accuracy, the Pareto front joined, the choice ringed. Accuracy is the gate's own measure, the
    worst e/bound over its inputs (the share of the allowed error used; the same axis for fp32, bf16 and int8,
    where the worst cosine of an fp32 artifact rounds to 1)."""
    plt = require("matplotlib.pyplot", "optimize's report.png", "plot")
    points = [c for c in result.candidates if c.status == "passed" and c.images_per_s and c.worst_e_over_bound]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    error = lambda c: c.worst_e_over_bound  # noqa: E731
    for c in points:
        ax.scatter(error(c), c.images_per_s, s=60, color="tab:blue" if c.precision != "int8" else "tab:orange")
        ax.annotate(c.name, (error(c), c.images_per_s), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = sorted((c for c in points if not any(_dominates(o, c, error) for o in points)), key=error)
    if front:
        ax.plot([error(c) for c in front], [c.images_per_s for c in front], "--", color="gray", label="Pareto front")
    if result.best in points:
        ax.scatter(error(result.best), result.best.images_per_s, s=220, facecolors="none", edgecolors="red",
                   linewidths=2, label=f"chosen: {result.best.name}")
    base = next((c for c in result.candidates if c.status == "baseline" and c.images_per_s), None)
    if base:
        ax.axhline(base.images_per_s, color="black", linewidth=1, linestyle=":", label="PyTorch eager (baseline)")
    ax.set_xscale("log")
    ax.set_xlabel("worst e/bound at the parity gate (share of the allowed error used; lower is more accurate)")
    ax.set_ylabel("images/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _dominates(a: Candidate, b: Candidate, error) -> bool:
    """``a`` is at least as fast and as accurate as ``b``, and better in one of the two."""
    return (a.images_per_s >= b.images_per_s and error(a) <= error(b)
            and (a.images_per_s > b.images_per_s or error(a) < error(b)))


def format_summary(result: OptimizeResult) -> str:
    """What the terminal shows: the table, the reasons, the choice and where the report is."""
    lines = [text_table(table_rows(result.candidates))]
    lines += [f"{c.name}: {c.reason}" for c in result.candidates if c.reason and c.status not in ("baseline", "passed")]
    lines += [f"{c.name} keeps {len(c.kept_float)} layer(s) in float: {', '.join(c.kept_float)}"
              + (f" ({c.reason})" if c.reason else "") for c in result.candidates if c.kept_float]
    lines += result.notes
    if result.best:
        lines.append(f"chosen: {result.best.name}, {result.best.images_per_s:.1f} img/s -> {result.out_dir / 'best'}")
    else:
        lines.append("nothing chosen: no candidate passed its gate and was timed")
    lines.append(f"report: {result.out_dir / 'report.md'} (plot: report.png, data: report.json)")
    return "\n".join(lines)
