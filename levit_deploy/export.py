"""Export: fuse (checked step by step) -> the backend writes into staging -> the parity gate -> rename.

The flow is the same for every target; what differs lives in the target's backend module. The
staged artifact runs in its runtime and is judged against the reference set; only if it passes are
the files renamed into place, the manifest last (see :mod:`levit_deploy.artifacts`).
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .artifacts import (FAILED_REPORT, FORMAT_VERSION, MANIFEST_NAME, Artifact, ManifestError, check_out_dir,
                        export_lock, hash_tree, is_artifact, publish, read_manifest, staging, verify_artifact)
from .backends import get_backend
from .backends.base import ExportError, InputSpec, RuntimeConfig, RuntimeUnavailable, StagedArtifact, in_chunks
from .calibration import calibration_set
from .env import cache_dir, fingerprint, package_versions, write_json_atomic
from .families import family_of, spec_for_model
from .families.base import count_parameters
from .fuse import fuse_checked
from .locate import locate
from .parity import ParityReport, compare, saturation_note
from .quantize import MAX_FLOAT_FRACTION, Outcome, QuantOptions, RecipeError, fit_to_gate, outside_calibration
from .reference import ReferenceSet, build_reference_set

__all__ = ["export", "cached_export", "ExportError", "ExportParityError", "ExportOptions"]


class ExportParityError(ExportError):
    """The artifact was produced but disagrees with the reference; it was not kept."""

    def __init__(self, report: ParityReport, report_path: Path, located: dict | None = None):
        super().__init__(f"parity gate failed, artifact discarded: {report.summary()}{_where(located)} "
                         f"(full report: {report_path})")
        self.report = report
        self.located = located


def _where(located: dict | None) -> str:
    if located is None:
        return "; to find the unit where it diverges, export again with --locate-on-fail"
    if located["first_divergent"] is None:
        return "; locating found no unit that diverges before the output"
    return f"; it first diverges after {located['first_divergent']['module']}"


@dataclass
class ExportOptions:
    """What every target is given: the precision, the batch contract and the target's own options."""

    precision: str = "fp32"
    batch: str | int = "dynamic"
    target: Any = None  # the backend's own options dataclass (None if it has none)
    calibration: Any = None  # int8: the CalibrationSet the quantizer takes its activation ranges from
    keep_float: tuple[str, ...] = ()  # int8: the layers (module paths) this attempt keeps in float
    locate_on_fail: bool = False  # when the gate refuses, bisect the artifact for the first diverging unit
    scratch: Path | None = None  # int8: a folder for what the attempts of one search share (the fp32 graph)


class _FixedBatch:
    """A runtime fed in chunks of the artifact's batch size (the last one zero-padded) for the gate."""

    def __init__(self, runtime, batch: int | None):
        self.runtime, self.batch = runtime, batch
        self.output_transform = runtime.output_transform

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.runtime.infer(x) if self.batch is None else in_chunks(self.runtime.infer, x, self.batch, pad=True)


def export(model: torch.nn.Module, to: str, out_dir: str | os.PathLike, precision: str = "fp32",
           batch: str | int = "dynamic", img_size: int | None = None, reference: ReferenceSet | None = None,
           images=(), options: dict | None = None, calib=None, calibration=None,
           status: Callable[[str], None] | None = None, locate_on_fail: bool = False, **target_options) -> Artifact:
    """Fuse ``model``, write a ``to`` artifact and its manifest into ``out_dir``, and gate it on parity.

    ``reference``: the model's reference set, if already built; else the default one (bundled photos,
    noise and synthetic JPEGs) plus every image under ``images``. ``options`` / keyword arguments: the
    target's own options (e.g. ``opset=17`` for onnx); one the target does not take is refused.
    int8: ``calib`` is a folder of the user's images for calibration, ``calibration`` an already built
    CalibrationSet; without either, the stand-in set (and the manifest says so). The int8 gate is judged
    on the reference set's decoded images only; when the plain int8 artifact fails it, the most sensitive layers
    are kept in float step by step (:mod:`levit_deploy.quantize`). ``status``: called with progress lines.
    ``locate_on_fail``: when the gate refuses, find the first unit after which the artifact diverges
    (:mod:`levit_deploy.locate`) before it is discarded; the failure report and the error name it.
    """
    backend = get_backend(to)
    if backend.write is None:
        raise ExportError(f"{to} is a runtime without an exporter; export to one of the targets instead")
    target = backend.parse_options({**(options or {}), **target_options})
    family = family_of(model)
    reason = family.input_size_error(model.config, img_size) if img_size is not None else None
    if reason:
        raise ExportError(reason)
    if precision not in backend.precisions:
        raise ExportError(f"{to} export supports {', '.join(backend.precisions)}, not {precision}")
    if batch != "dynamic" and (not str(batch).isdigit() or int(batch) < 1):
        raise ExportError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")
    if precision != "int8" and (calib or calibration):
        raise ExportError(f"calibration images are for int8 export; {precision} needs none")
    if precision != "int8" and isinstance(target, QuantOptions) and (
            target.keep_float or target.max_float_fraction != MAX_FLOAT_FRACTION):
        raise ExportError(f"keep_float and max_float_fraction are int8 options; {precision} takes neither")
    spec = spec_for_model(model)
    status = status or (lambda _: None)
    if precision == "int8" and calibration is None:
        calibration = calibration_set(spec, calib)
        _announce(calibration, status)
    opts = ExportOptions(precision, batch if batch == "dynamic" else int(batch), target, calibration,
                         locate_on_fail=locate_on_fail)
    with export_lock(Path(out_dir)) as out:
        check_out_dir(out)
        return _export_into(model, backend, out, opts, reference or build_reference_set(model, spec, images=images),
                            status)


def _announce(calibration, status: Callable[[str], None]) -> None:
    """What int8 calibrates on, and a stand-in's warning, said before the long export starts."""
    status(f"calibrating on {len(calibration.inputs)} images from {calibration.source}"
           + (f" ({len(calibration.skipped)} unreadable files skipped)" if calibration.skipped else ""))
    if calibration.warning():
        status(f"WARNING: {calibration.warning()}")


def cached_export(model, to: str, precision: str = "fp32", reference=None, images=()) -> Path:
    """Folder of a parity-checked artifact for ``model``: exported once into the cache, then reused. Concurrent
    callers wait for each other's export instead of refusing."""
    key = hashlib.sha256(f"{weights_digest(model)}|{to}|{precision}|{__version__}".encode()).hexdigest()[:12]
    folder = cache_dir() / "artifacts" / f"{model.config.name}-{key}-{to}-{precision}"
    with export_lock(folder, wait=True) as out:
        if is_artifact(out):
            try:
                manifest, _ = read_manifest(out)
                verify_artifact(manifest, out, get_backend(manifest["artifact"]["format"]).companions)
                return out
            except ManifestError:
                pass  # a damaged or outdated cache entry is exported again
        backend = get_backend(to)
        spec = spec_for_model(model)
        reference = reference or build_reference_set(model, spec, images=images)
        _export_into(model, backend, out, ExportOptions(precision, "dynamic", backend.parse_options({})), reference,
                     lambda _: None)
    return folder


def weights_digest(model) -> str:
    """sha256 of the model's tensors: the cache key must name the weights, not where they came from
    (a random-init seed names different weights whenever the initialisation changes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _export_into(model: torch.nn.Module, backend, out_dir: Path, opts: ExportOptions, reference: ReferenceSet,
                 status: Callable[[str], None]) -> Artifact:
    """Fuse, write into a staging folder beside ``out_dir``, gate, and swap it in (the caller holds the lock)."""
    family, spec = family_of(model), spec_for_model(model)
    fusion = fuse_checked(model, reference)
    with staging(out_dir) as folder:
        choices = family.choose_for_target(fusion.model, backend.name, opts.precision, opts.target)
        staged, report = _write_and_gate(backend, fusion.model, folder, opts, reference, status)
        if opts.calibration is not None and opts.calibration.warning():
            staged.notes.append(opts.calibration.warning())
        files = {}
        for name in staged.names:
            files.update(hash_tree(folder, name))
        if report is None:
            parity = {"status": "pending", "reason": staged.parity_pending, "precision": opts.precision}
        else:
            parity = {"status": "passed" if report.passed else "failed", **report.to_dict()}
        manifest = _manifest(model, backend, opts, staged, files, sum((folder / f).stat().st_size for f in files),
                             fusion.reports, spec, parity, choices)
        if report is not None and not report.passed:
            _refuse(manifest, folder, out_dir / FAILED_REPORT.format(target=backend.name), report, opts, status)
        publish(staged.names, folder, out_dir, manifest)
    return Artifact(out_dir, out_dir / staged.file, manifest)


def _refuse(manifest: dict, folder: Path, report_path: Path, report: ParityReport, opts: ExportOptions,
            status: Callable[[str], None]) -> None:
    """Write the failure report beside the artifact folder (with where the staged artifact diverges, when asked)
    and raise ExportParityError; the staged artifact is discarded by the caller."""
    parity, located = manifest["parity"], None
    quantization = manifest["artifact"].get("quantization", {})
    if "recipe" in quantization:
        parity["int8_search"] = quantization["recipe"]
    if opts.locate_on_fail:
        status("the gate refused the artifact: locating the first unit where it diverges …")
        write_json_atomic(folder / MANIFEST_NAME, manifest)
        located = parity["locate"] = locate(folder, status=status).to_dict()
    write_json_atomic(report_path, parity)
    raise ExportParityError(report, report_path, located)


def _write_and_gate(backend, model: torch.nn.Module, folder: Path, opts: ExportOptions, reference: ReferenceSet,
                    status: Callable[[str], None]) -> tuple[StagedArtifact, ParityReport | None]:
    """The staged artifact and its gate's report (None: parity pending on this machine). int8: the user's recipe
    (``keep_float``), or the search for the fewest layers in float that pass (recorded in the details)."""
    if opts.precision != "int8":
        staged = _write(backend, model, folder, opts)
        return staged, None if staged.parity_pending else _gate(backend, staged, folder, opts, reference)

    with tempfile.TemporaryDirectory(prefix="levit-int8-") as scratch:
        return _search_int8(backend, model, folder, replace(opts, scratch=Path(scratch)), reference, status)


def _search_int8(backend, model: torch.nn.Module, folder: Path, opts: ExportOptions, reference: ReferenceSet,
                 status: Callable[[str], None]) -> tuple[StagedArtifact, ParityReport]:
    """The int8 artifact of the user's recipe, or of the fewest layers in float that pass the gate. Each attempt
    is written and gated in its own folder of the scratch space; the chosen one (the search may end on a failing
    attempt after a passing one) is moved into ``folder``, so the files shipped are the files gated."""
    numbers = itertools.count()

    def attempt(keep: tuple[str, ...]):
        where = opts.scratch / f"attempt-{next(numbers)}"
        where.mkdir()
        staged = _write(backend, model, where, replace(opts, keep_float=keep))
        report = _gate(backend, staged, where, opts, reference)
        return (staged, report, where), report, staged.details["quantization"]["layers"]

    recipe = opts.target.recipe()
    if recipe is not None:
        result, report, layers = attempt(recipe)
        outcome = Outcome(result, recipe, layers + list(recipe), passed=report.passed)
    else:
        outcome = fit_to_gate(attempt, model, opts.calibration.inputs, opts.target.max_float_fraction, status)
    staged, report, where = outcome.result
    for entry in where.iterdir():
        shutil.move(str(entry), str(folder / entry.name))
    staged.details["quantization"]["recipe"] = outcome.describe()
    status(f"int8: {outcome.summary()}")
    if not report.passed:
        report.notes.extend(_int8_refusal_notes(outcome, staged.details["quantization"], opts))
        report.notes.extend(_outside_calibration_notes(model, opts, reference, report, outcome.quantized))
    return staged, report


def _int8_refusal_notes(outcome: Outcome, quantization: dict, opts: ExportOptions) -> list[str]:
    """What was tried and what to try next, for a refused int8 artifact."""
    notes = []
    if len(outcome.attempts) > 1:
        tried = ", ".join(str(len(a.keep_float)) for a in outcome.attempts)
        notes.append(f"kept {tried} of {len(outcome.quantized)} quantized layers in float, most sensitive first, up "
                     f"to the cap (-o max_float_fraction={opts.target.max_float_fraction:g}); none passed: deploy in "
                     f"fp32 or bf16, or raise the cap")
    saturated = saturation_note(quantization)
    return notes + ([saturated] if saturated else [])


def _outside_calibration_notes(model: torch.nn.Module, opts: ExportOptions, reference: ReferenceSet,
                               report: ParityReport, layers: list[str]) -> list[str]:
    """Which failed gate inputs lie outside what the calibration images showed (their remedy is --calib)."""
    failed = [r["name"] for r in report.per_input if r["gating"] and not r["passed"]]
    rows = [reference.names.index(name) for name in failed]
    return outside_calibration(model, opts.calibration.inputs, reference.inputs[rows], failed, layers) if rows else []


def _write(backend, model: torch.nn.Module, folder: Path, opts: ExportOptions) -> StagedArtifact:
    """The backend's converter; a failure inside a converter (torch.export, a lowering pass, a quantizer) is one
    line naming the target, and the staging folder is discarded (the original stays chained for the API)."""
    try:
        return backend.write(model, folder, opts)
    except (ExportError, ImportError, KeyboardInterrupt):
        raise
    except RecipeError as e:
        raise ExportError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a converter's own error, unknown in kind
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ExportError(f"the {backend.name} converter failed for this {model.config.name} ({opts.precision}) model: "
                          f"{type(e).__name__}: {(lines[0] if lines else '')[:240]}; nothing was kept") from e


def _gate(backend, staged: StagedArtifact, folder: Path, opts: ExportOptions, reference: ReferenceSet
          ) -> ParityReport:
    """The staged artifact in its runtime, judged against the reference set."""
    fixed = None if opts.batch == "dynamic" else int(opts.batch)
    # what the manifest records for opening the artifact (a compute precision, a batch bound) applies to the gate
    config, own = RuntimeConfig.split({"device": "cpu", "threads": None, "precision": opts.precision,
                                       "input_spec": InputSpec(batch=fixed), **staged.runtime_options})
    runtime = backend.runtime_class(str(folder / staged.file), config, **own)
    try:
        runtime.activate()
    except (RuntimeUnavailable, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - a converter bug surfaces here: one line, and nothing is kept
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = next((line for line in lines if not line.startswith("Exception from")), lines[0] if lines else "")
        raise ExportError(f"{backend.runtime} could not load the {opts.precision} artifact written for it "
                          f"({type(e).__name__}: {cause[:240]}); nothing was kept: try another --precision or "
                          f"--to") from None
    with runtime as rt:
        return compare(reference, _FixedBatch(rt, fixed), rt.precision, stage=f"{backend.runtime} artifact")


def _manifest(model: torch.nn.Module, backend, opts: ExportOptions, staged: StagedArtifact, files: dict[str, str],
              size: int, fusion_reports: list[ParityReport], spec, parity: dict, choices: dict) -> dict:
    info = getattr(model, "load_info", None)
    cfg = model.config
    family = family_of(model)
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "levit-deploy", "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "artifact": {"format": backend.name, "file": staged.file, "runtime": backend.runtime, "files": files,
                     "size_bytes": size, "runtime_options": staged.runtime_options, **staged.details},
        "source": info.to_dict() if info else {"source": "in-memory model"},
        "model": {"family": family.name, "variant": cfg.name, "num_classes": cfg.num_classes,
                  "params": count_parameters(model), "flops": family.count_flops(cfg), "config": cfg.to_dict(),
                  **family.describe(cfg), "implementation_choices": choices},
        "labels": {"source": "imagenet-1k (bundled with levit-deploy)" if cfg.num_classes == 1000
                   else "class indices (no names for this head size; pass --labels)"},
        "export": {"precision": opts.precision, "batch": opts.batch,
                   "options": asdict(opts.target) if opts.target is not None else {}, "notes": staged.notes,
                   **({"calibration": {**opts.calibration.describe(), **staged.details.get("quantization", {})}}
                      if opts.calibration is not None else {})},
        "input": {"name": "pixel_values", "dtype": "float32", "layout": "NCHW",
                  "shape": ["batch" if opts.batch == "dynamic" else opts.batch, 3, cfg.img_size, cfg.img_size]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", cfg.num_classes]},
        "fusion": [{"step": r.stage, "max_abs": r.max_abs, "max_e_over_s": r.max_e_over_s,
                    "worst_margin": r.worst_margin, "passed": r.passed} for r in fusion_reports],
        "preprocessing": spec.to_dict(),
        "parity": parity,
        "versions": {"levit-deploy": __version__, "torch": package_versions("torch")["torch"],
                     **package_versions(*backend.packages)},
        "machine": fingerprint(),
    }
