"""Speed measurement with the paper's protocol, every candidate side by side and interleaved.

CPU: one thread, batch 16 by default; GPU: the largest power-of-two batch that fits. Each case is
warmed up, then the cases are timed in rounds (a few calls each, round-robin) until the time budget
is spent, so drift on a shared machine hits every case alike. Reported: images/s from the median
call time with its bootstrap 95 % interval, latency p50/p90/p99 per batch, the spread (p90/p10 of call
times), and per case, in a fresh process each, the cold start (open + first inference) and peak memory.
An earlier run's JSON can be given as a baseline: each case is then tested against the same case there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .artifacts import is_artifact
from .backends import (RuntimeUnavailable, backends, by_runtime, installed_runtimes, module_runtime, open_artifact,
                       open_runtime, runtimes as known_runtimes)
from .checkpoints import resolve
from .coldstart import measure as measure_cold_start
from .env import fingerprint, require, text_table
from .export import export
from .fuse import fuse, fuse_checked
from .parity import compare
from .reference import ReferenceSet, build_reference_set, random_inputs
from .timing_stats import compare_rounds, median_interval


@dataclass
class BenchCase:
    """One thing to time: a label, how to open it, and what it is."""

    label: str
    open: Callable[[], object]  # returns a Runtime
    runtime: str
    precision: str = "fp32"
    size_mb: float | None = None
    baseline: bool = False  # the unfused PyTorch model: speed-ups are relative to it
    cold: dict | None = None  # how a fresh process opens it (coldstart spec), once the case has been opened


@dataclass
class BenchResult:
    label: str
    runtime: str
    precision: str
    status: str  # "ok", "parity failed", "error"
    batch: int
    size_mb: float | None = None
    parity_margin: float | None = None  # worst e/bound over the reference set (<= 1 passes)
    parity_max_e_over_s: float | None = None
    parity_passed: bool | None = None
    images_per_s: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p50_ci_ms: list | None = None  # bootstrap 95 % interval of the median call time
    images_per_s_ci: list | None = None
    spread: float | None = None
    calls: int = 0
    round_ms: list = field(default_factory=list)  # mean call time of each round: the unit of --baseline's test
    cold_start_ms: float | None = None  # a fresh process: open + first inference
    open_ms: float | None = None
    first_ms: float | None = None
    peak_rss_mb: float | None = None  # that process's peak resident memory
    base_rss_mb: float | None = None  # ... and its memory before the case was opened
    cold_error: str | None = None
    vs_baseline: dict | None = None  # timing_stats.Comparison against the same case of --baseline
    speedup: float | None = None
    error: str | None = None
    info: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)  # batch -> images/s

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Protocol:
    threads: int | None = 1
    batch: int = 16
    warmup_s: float = 2.0
    duration_s: float = 10.0  # timed seconds per case
    round_calls: int = 3
    device: str = "cpu"
    precision: str = "fp32"  # torch runtime: fp32, or fp16/bf16 autocast (the paper's GPU protocol is fp16)
    precisions: list[str] = field(default_factory=list)  # several side by side (e.g. fp32, bf16, int8); [] = [precision]
    img_size: int = 224  # the model's input size (set from the model by run_bench)
    cold_start: bool = True  # also open each case in a fresh process: cold start and peak memory


def percentiles(times: list[float], batch: int) -> dict:
    t = np.asarray(times)
    p10, p50, p90, p99 = np.percentile(t, [10, 50, 90, 99])
    lo, hi = median_interval(t)
    return {"images_per_s": batch / p50, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3, "p99_ms": p99 * 1e3,
            "p50_ci_ms": [lo * 1e3, hi * 1e3], "images_per_s_ci": [batch / hi, batch / lo],
            "spread": p90 / p10, "calls": len(t)}


class Progress:
    """A one-line progress bar on stderr when it is a terminal, quiet otherwise."""

    def __init__(self, total: float, label: str):
        self.total, self.label, self.tty = total, label, sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, done: float, note: str = "") -> None:
        if not self.tty:
            return
        frac = min(1.0, done / self.total) if self.total else 1.0
        bar = "#" * int(frac * 30)
        print(f"\r{self.label} [{bar:<30}] {frac:4.0%} {note:<40}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def run_cases(cases: list[BenchCase], reference: ReferenceSet | None, protocol: Protocol
              ) -> tuple[list[BenchResult], bool]:
    """Open, parity-check (against ``reference``), warm up and time every case; returns (results, interrupted)."""
    batch = random_inputs(protocol.batch, seed=1, size=protocol.img_size)
    if protocol.device.startswith("cuda"):  # GPU cases read device-resident input, as in the paper
        device_batch = torch.from_numpy(batch).to(protocol.device)
    opened, results = [], []
    for case in cases:
        result = BenchResult(case.label, case.runtime, case.precision, "ok", protocol.batch, case.size_mb)
        results.append(result)
        try:
            rt = case.open()
            result.info = rt.info()
            manifest = getattr(rt, "manifest", None)
            if result.size_mb is None and manifest:
                result.size_mb = manifest["artifact"]["size_bytes"] / 1e6
            elif result.size_mb is None and result.info.get("path") and os.path.isfile(result.info["path"]):
                result.size_mb = os.path.getsize(result.info["path"]) / 1e6
            result.precision = getattr(rt, "precision", case.precision)
            if reference is not None:
                report = compare(reference, rt, result.precision, stage=case.label)
                result.parity_margin, result.parity_max_e_over_s = report.worst_margin, report.max_e_over_s
                result.parity_passed = report.passed
                if not report.passed:
                    result.status = "parity failed"
            feed = device_batch if protocol.device.startswith("cuda") and rt.accepts_device_tensors else batch
            rt.infer(feed)
            opened.append((case, rt, result, [], feed))
        except KeyboardInterrupt:
            return results, True
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
            result.status, result.error = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    interrupted = False
    progress = Progress(protocol.warmup_s + protocol.duration_s, "measuring")
    try:
        _warm_up(opened, batch, protocol, progress)
        deadline_per_case = protocol.duration_s
        spent = {id(c): 0.0 for c, *_ in opened}
        while opened and min(spent.values()) < deadline_per_case:
            for case, rt, result, times, feed in opened:
                for _ in range(protocol.round_calls):
                    t0 = time.perf_counter()
                    rt.infer(feed)
                    times.append(time.perf_counter() - t0)
                    spent[id(case)] += times[-1]
                result.round_ms.append(float(np.mean(times[-protocol.round_calls:])) * 1e3)
            progress.update(protocol.warmup_s + min(spent.values()), f"{len(opened[0][3])} calls per case")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
        for case, rt, result, times, _ in opened:
            if times:
                for key, value in percentiles(times, protocol.batch).items():
                    setattr(result, key, value)
            rt.close()
    if protocol.cold_start and not interrupted:
        interrupted = _measure_cold_starts(cases, results, protocol)
    base = next((r for case, r in zip(cases, results) if case.baseline and r.images_per_s), None)
    for r in results:
        if base and r.images_per_s:
            r.speedup = r.images_per_s / base.images_per_s
    return results, interrupted


def _measure_cold_starts(cases: list[BenchCase], results: list[BenchResult], protocol: Protocol) -> bool:
    """Each opened case again in a fresh process (after the timing, so it competes with nothing); True if
    interrupted. A probe that fails leaves the case's timing standing and says why in ``cold_error``."""
    todo = [(c, r) for c, r in zip(cases, results) if c.cold is not None and r.status != "error"]
    progress = Progress(len(todo), "cold starts")
    try:
        for i, (case, result) in enumerate(todo):
            progress.update(i, case.label)
            spec = {**case.cold, "device": protocol.device, "threads": protocol.threads, "batch": protocol.batch,
                    "img_size": protocol.img_size}
            try:
                for key, value in measure_cold_start(spec).to_dict().items():
                    setattr(result, key, value)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                result.cold_error = str(e)[:200]
    except KeyboardInterrupt:
        return True
    finally:
        progress.close()
    return False


def _warm_up(opened, batch, protocol: Protocol, progress: Progress) -> None:
    start = time.perf_counter()
    while time.perf_counter() - start < protocol.warmup_s:
        for _, rt, _, _, feed in opened:
            rt.infer(feed)
        progress.update(time.perf_counter() - start, "warm-up")


def sweep(case: BenchCase, batches: list[int], protocol: Protocol) -> dict[int, float]:
    """images/s per batch size for one case (same warm-up and median protocol)."""
    out = {}
    rt = case.open()
    try:
        for b in batches:
            x = random_inputs(b, seed=2, size=protocol.img_size)
            t_end = time.perf_counter() + protocol.warmup_s / 2
            while time.perf_counter() < t_end:
                rt.infer(x)
            times, spent = [], 0.0
            while spent < protocol.duration_s / len(batches) or len(times) < 5:
                t0 = time.perf_counter()
                rt.infer(x)
                times.append(time.perf_counter() - t0)
                spent += times[-1]
            out[b] = b / float(np.median(times))
    finally:
        rt.close()
    return out


def largest_power_of_two_batch(try_batch: Callable[[int], bool], limit: int = 8192) -> int:
    """The largest 2^k <= limit for which ``try_batch`` succeeds (e.g. no CUDA out-of-memory)."""
    batch, best = 1, 0
    while batch <= limit and try_batch(batch):
        best, batch = batch, batch * 2
    if not best:
        raise RuntimeError("not even batch 1 fits on the device")
    return best


def build_cases(model, runtimes: list[str], protocol: Protocol, work_dir: Path | None = None,
                artifacts: list[Path] = (), include_baselines: bool = True,
                reference: ReferenceSet | None = None, source: dict | None = None) -> list[BenchCase]:
    """The standard line-up for a model: what users have (the unfused model in PyTorch), what a plain
    export gives (where a backend offers one), and ours in every asked-for runtime; or given artifacts.
    ``source`` ({"model": target, "weights", "init", "entry"}) lets a fresh process rebuild the PyTorch cases
    for their cold start; without it they have none."""
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="levit-bench-"))
    t, dev, prec = protocol.threads, protocol.device, protocol.precision
    module_rt = module_runtime()
    cases = []
    if include_baselines:  # what a user has: fp32 on CPU, the paper's fp16 autocast on GPU
        base = prec if dev.startswith("cuda") else "fp32"
        cases.append(BenchCase(f"{module_rt} unfused (eager)",
                               lambda: open_runtime(model, module_rt, dev, t, compute=base), module_rt,
                               precision=base, baseline=True, cold=source and {**source, "compute": base}))
    precisions = protocol.precisions or [prec]
    suffix = (lambda p: f" {p}") if len(precisions) > 1 else (lambda p: "")  # noqa: E731
    deploy = None
    for prec in precisions:
        if module_rt in runtimes and prec in by_runtime(module_rt).compute_precisions:
            if deploy is None:
                deploy = fuse_checked(model, reference, check=reference is not None).model
            cases.append(BenchCase(f"{module_rt} fused (eager){suffix(prec)}",
                                   lambda p=prec: open_runtime(deploy, module_rt, dev, t, compute=p),
                                   module_rt, precision=prec, cold=source and {**source, "fused": True, "compute": prec}))
            if dev.startswith("cuda"):
                cases.append(BenchCase(f"{module_rt} fused (CUDA graph){suffix(prec)}", lambda p=prec: open_runtime(
                    deploy, module_rt, dev, t, compute=p, cuda_graph=True), module_rt, precision=prec))
        for backend in backends().values():
            if backend.runtime not in runtimes or backend.write is None:
                continue
            if include_baselines and backend.write_plain is not None and prec == precisions[0]:
                path = work_dir / f"plain-{backend.name}"
                cases.append(BenchCase(f"{backend.runtime} plain export (unfused)",
                                       lambda b=backend, p=path: open_runtime(b.write_plain(model, p), None, dev, t),
                                       backend.runtime, cold={"artifact": str(path.with_suffix(backend.suffixes[0]))}))
            if artifacts:
                continue
            if prec in backend.compute_precisions:  # an fp32 artifact computed in prec (e.g. bf16 on OpenVINO)
                export_precision, compute = "fp32", prec
            elif prec in backend.precisions:  # an artifact exported in prec (e.g. an fp16 TensorRT engine, int8)
                export_precision, compute = prec, None
            else:
                cases.append(BenchCase(f"{backend.runtime} levit-deploy{suffix(prec)}", _refuse(backend, prec),
                                       backend.runtime, prec))
                continue
            folder = work_dir / f"ours-{backend.name}-{export_precision}"
            cases.append(BenchCase(f"{backend.runtime} levit-deploy{suffix(prec)}",
                                   _export_then_open(model, backend.name, folder, dev, t, export_precision, compute,
                                                     reference), backend.runtime, precision=export_precision,
                                   cold={"artifact": str(folder), "compute": compute}))
    for path in artifacts:
        cases.append(BenchCase(f"artifact {Path(path).name}", lambda p=path: open_runtime(p, None, dev, t),
                               "artifact", cold={"artifact": str(path)}))
    return cases


def _refuse(backend, precision: str):
    def opener():
        raise ValueError(f"{backend.runtime} cannot run {precision}: it exports "
                         f"{', '.join(backend.precisions)} and computes in {', '.join(backend.compute_precisions)}")
    return opener


def _export_then_open(model, target: str, folder: Path, device: str, threads: int | None, precision: str = "fp32",
                      compute: str | None = None, reference: ReferenceSet | None = None):
    def opener():
        if not (folder / "manifest.json").exists():
            export(model, target, folder, precision=precision, reference=reference)
        return open_runtime(folder, None, device, threads, **({"compute": compute} if compute else {}))
    return opener


def run_bench(targets: list[str], runtimes: list[str] | None = None, weights=None, init: str = "pretrained",
              protocol: Protocol | None = None, sweep_to: int | None = None, plot: Path | None = None,
              images=(), status: Callable[[str], None] = lambda m: None, entry: str | None = None,
              baseline: Path | None = None) -> tuple[list[dict], bool]:
    """Bench every target (variant name, checkpoint or artifact folder) side by side; one document each.

    On CUDA the batch is the largest power of two whose fp16 forward fits. ``sweep_to``: also measure
    images/s over batches 1, 2, 4, ... up to it, plotted into ``plot`` (one file per target, suffixed with
    the variant when there are several). ``baseline``: an earlier run's JSON; each case is tested against
    the same case (model and label) there. Returns (documents, interrupted).
    """
    earlier = read_baseline(baseline) if baseline is not None else None
    protocol = protocol or Protocol()
    runtimes = runtimes or installed_runtimes()
    unknown = sorted(set(runtimes) - set(known_runtimes()))
    if unknown:
        raise ValueError(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(known_runtimes())}")
    documents, interrupted = [], False
    for target in targets:
        artifacts = [open_artifact(target)[1]] if is_artifact(target) else []  # a bad artifact: one line, now
        model = resolve(target, weights, init, entry).model()
        protocol.img_size = model.config.img_size
        if protocol.device.startswith("cuda"):
            protocol.batch = largest_cuda_batch(model)
            status(f"largest power-of-two batch that fits: {protocol.batch}")
        reference = build_reference_set(model, images=images)
        source = None if artifacts else {"model": os.fspath(target), "weights": weights and os.fspath(weights),
                                         "init": init, "entry": entry}
        cases = build_cases(model, runtimes, protocol, artifacts=artifacts, reference=reference, source=source)
        status(f"{model.config.name}: {len(cases)} cases, {protocol.threads} thread(s), batch {protocol.batch}, "
               f"{protocol.duration_s:g}s each (Ctrl-C stops and prints what was measured)")
        results, interrupted = run_cases(cases, reference, protocol)
        if sweep_to and not interrupted:
            sizes = [2 ** i for i in range(sweep_to.bit_length()) if 2 ** i <= sweep_to]
            for case, result in zip(cases, results):
                if result.status == "ok":
                    status(f"sweep {case.label} over batches {sizes} …")
                    try:
                        result.sweep = sweep(case, sizes, protocol)
                    except KeyboardInterrupt:
                        interrupted = True
                        break
        doc = report_document(results, protocol, interrupted, model.config.name)
        if earlier is not None:
            compare_with_baseline(doc, earlier, str(baseline))
        if plot is not None and sweep_to:
            path = plot if len(targets) == 1 else plot.with_stem(f"{plot.stem}-{model.config.name}")
            plot_sweep(results, path, f"{model.config.name}, {protocol.threads} thread(s)")
            doc["plot"] = str(path)
        documents.append(doc)
        if interrupted:
            break
    return documents, interrupted


class BaselineError(ValueError):
    """--baseline is not the JSON of an earlier bench run."""


def read_baseline(path: Path) -> list[dict]:
    """The documents of an earlier ``bench --json`` run (one or several models), checked for per-round times."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaselineError(f"--baseline {path}: cannot read it as JSON ({e})") from None
    documents = data if isinstance(data, list) else [data]
    if not all(isinstance(d, dict) and isinstance(d.get("results"), list) and "model" in d for d in documents):
        raise BaselineError(f"--baseline {path}: expected the output of `levit-deploy bench --json` "
                            "(a document with \"model\" and \"results\"), found something else")
    if not any(r.get("round_ms") for d in documents for r in d["results"]):
        raise BaselineError(f"--baseline {path}: no case in it has per-round times (\"round_ms\"); "
                            "it predates them or measured nothing: rerun the baseline with this version")
    return documents


def compare_with_baseline(document: dict, earlier: list[dict], name: str) -> None:
    """Add ``vs_baseline`` to every result of ``document`` that has a counterpart (same model and label) in
    ``earlier``; the document records which baseline and with what protocol it was measured."""
    cases = {(d["model"], r["label"]): (d, r) for d in earlier for r in d["results"] if r.get("round_ms")}
    matched = 0
    for result in document["results"]:
        old_doc, old = cases.get((document["model"], result["label"]), (None, None))
        if old is None or len(result["round_ms"]) < 2:
            continue
        comparison = compare_rounds(old["round_ms"], result["round_ms"])
        comparison.baseline_images_per_s = old.get("images_per_s")
        result["vs_baseline"] = comparison.to_dict()
        matched += 1
    document["baseline"] = {"path": name, "matched": matched,
                            "protocol": (old_doc or earlier[0]).get("protocol") if matched else None}


def report_document(results: list[BenchResult], protocol: Protocol, interrupted: bool, model_name: str) -> dict:
    return {"model": model_name, "protocol": asdict(protocol), "interrupted": interrupted,
            "machine": fingerprint(protocol.threads), "results": [r.to_dict() for r in results]}


def format_table(results: list[BenchResult], models: list[str] | None = None) -> str:
    """The side-by-side table; with ``models`` (one name per result) several models share one table,
    each row's speed-up relative to its own model's unfused PyTorch baseline."""
    rows = [(*(("model",) if models else ()), "case", "runtime", "prec", "status", "size MB", "parity e/bound",
             "img/s", "95% CI", "p50 ms", "p99 ms", "spread", "speed-up", "cold ms", "peak MB")]
    icon = {"ok": "✅", "parity failed": "❎", "error": "❌"}
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for i, r in enumerate(results):
        ci = "-" if not r.images_per_s_ci else f"{r.images_per_s_ci[0]:.1f}-{r.images_per_s_ci[1]:.1f}"
        rows.append((*((models[i],) if models else ()), r.label, r.runtime, r.precision, f"{icon[r.status]} {r.status}",
                     f(r.size_mb, ".1f"), f(r.parity_margin, ".2g"), f(r.images_per_s, ".1f"), ci, f(r.p50_ms, ".1f"),
                     f(r.p99_ms, ".1f"), f(r.spread, ".2f"), "-" if r.speedup is None else f"{r.speedup:.2f}x",
                     f(r.cold_start_ms, ".0f"), f(r.peak_rss_mb, ".0f")))
    lines = [text_table(rows)]
    for i, r in enumerate(results):
        if r.vs_baseline:
            v = r.vs_baseline
            lines.append(f"{(models[i] + ' ') if models else ''}{r.label}: {v['ratio']:.3f}x the baseline's speed "
                         f"({f(v['baseline_images_per_s'], '.1f')} -> {f(r.images_per_s, '.1f')} img/s, "
                         f"p = {v['p_value']:.4f}): {v['verdict']}")
    for r in results:
        if r.error:
            lines.append(f"{r.label}: {r.error}")
        if r.cold_error:
            lines.append(f"{r.label}: no cold start ({r.cold_error})")
    return "\n".join(lines)


def plot_sweep(results: list[BenchResult], path: Path, title: str) -> None:
    plt = require("matplotlib.pyplot", "--plot", "plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.sweep:
            xs = sorted(int(b) for b in r.sweep)
            ax.plot(xs, [r.sweep[b] for b in xs], marker="o", label=r.label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def largest_cuda_batch(model, limit: int = 8192) -> int:
    """The paper's GPU protocol: the largest power-of-two batch whose fp16 forward fits in memory."""
    if not torch.cuda.is_available():
        raise RuntimeUnavailable("--device cuda: PyTorch sees no CUDA GPU on this machine")
    deploy = fuse(model, check=False).cuda().eval()
    size = model.config.img_size

    def fits(batch: int) -> bool:
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                deploy(torch.randn(batch, 3, size, size, device="cuda"))
            torch.cuda.synchronize()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    return largest_power_of_two_batch(fits, limit)
