"""Export a reference LeViT to a deployable artifact, gated on parity, written atomically.

The flow is the same for every target: fuse (checked step by step) -> the target module writes its
files into a hidden staging folder -> the staged artifact runs in its runtime and is compared with
the float64 reference -> only if that passes are the files renamed into place, the manifest last.
A failed or interrupted export therefore never leaves something that looks like a good artifact.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..fuse import fuse_checked
from ..checkpoints import cache_dir
from ..manifest import (FORMAT_VERSION, MANIFEST_NAME, ManifestError, fingerprint, is_artifact, package_versions,
                        read_manifest, sha256_file, verify_artifact, write_json_atomic)
from ..models import Levit, count_flops, count_parameters
from ..parity import ParityReport, ReferenceSet, build_reference_set, compare
from ..preprocess import spec_for_model

EXPORTERS = {
    "onnx": "levit_deploy.exporters.onnx",
    "openvino": "levit_deploy.exporters.openvino",
    "coreml": "levit_deploy.exporters.coreml",
    "tensorrt": "levit_deploy.exporters.tensorrt",
}
VERSION_PACKAGES = {
    "onnx": ("torch", "onnx", "onnxruntime", "onnxsim", "onnxscript"),
    "openvino": ("torch", "openvino"),
    "coreml": ("torch", "coremltools"),
    "tensorrt": ("torch", "onnx", "tensorrt"),
}


class ExportError(RuntimeError):
    """The export could not produce an artifact (bad options, converter failure)."""


class ExportParityError(ExportError):
    """The artifact was produced but disagrees with the reference; it was not kept."""

    def __init__(self, report: ParityReport, report_path: Path):
        super().__init__(f"parity gate failed, artifact discarded: {report.summary()} "
                         f"(full report: {report_path})")
        self.report = report


@dataclass
class ExportOptions:
    precision: str = "fp32"
    batch: str | int = "dynamic"
    opset: int = 18
    simplify: bool = True
    extra: dict = field(default_factory=dict)  # target-specific options (e.g. CoreML image input)


@dataclass
class StagedArtifact:
    """What a target module wrote into the staging folder."""

    file: str  # the main file or package folder, relative to the artifact folder
    runtime: str  # the runtime that runs it by default
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runtime_options: dict = field(default_factory=dict)  # recorded in the manifest, used on open
    parity_pending: str | None = None  # reason numeric parity cannot run here (e.g. CoreML off macOS)
    extra_files: list[str] = field(default_factory=list)


@dataclass
class Artifact:
    folder: Path
    path: Path
    manifest: dict

    @property
    def parity(self) -> dict:
        return self.manifest["parity"]


def _hash_tree(root: Path, rel: str) -> dict[str, str]:
    """sha256 of a file, or of every file inside a package folder (CoreML .mlpackage)."""
    target = root / rel
    if target.is_file():
        return {rel: sha256_file(target)}
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(target.rglob("*")) if p.is_file()}


def _move_into_place(staging: Path, out_dir: Path, names: list[str]) -> None:
    for name in names:
        src, dst = staging / name, out_dir / name
        if src.is_dir() and dst.exists():  # os.replace cannot replace a non-empty folder
            old = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".old-{name}-"))
            os.replace(dst, old / name)
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)


class _FixedBatch:
    """A runtime fed in chunks of the artifact's batch size (the last one zero-padded) for the gate."""

    def __init__(self, runtime, batch: int | None):
        self.runtime, self.batch = runtime, batch
        self.output_transform = getattr(runtime, "output_transform", None)

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.batch is None:
            return self.runtime.infer(x)
        outs = []
        for i in range(0, len(x), self.batch):
            chunk = x[i:i + self.batch]
            pad = self.batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self.runtime.infer(chunk)[:self.batch - pad])
        return np.concatenate(outs)


def _check_parity(staged: StagedArtifact, staging: Path, opts: ExportOptions, reference: ReferenceSet) -> ParityReport:
    from ..runtimes import runtime_class

    options = {"precision": opts.precision, **staged.runtime_options}
    with runtime_class(staged.runtime)(str(staging / staged.file), device="cpu", threads=None, **options) as rt:
        precision = getattr(rt, "precision", opts.precision)
        fixed = None if opts.batch == "dynamic" else int(opts.batch)
        return compare(reference, _FixedBatch(rt, fixed), precision, stage=f"{staged.runtime} artifact")


def export(model: Levit, to: str, out_dir: str | os.PathLike, precision: str = "fp32",
           batch: str | int = "dynamic", opset: int = 18, simplify: bool = True, img_size: int | None = None,
           reference: ReferenceSet | None = None, images=(), **extra) -> Artifact:
    """Fuse ``model``, write a ``to`` artifact and its manifest into ``out_dir``, and gate it on parity.

    ``reference``: the model's reference set, if already built; else the default one (bundled photos,
    noise and synthetic JPEGs) plus every image under ``images``.
    """
    if to not in EXPORTERS:
        raise ExportError(f"unknown export target {to!r}; choose one of {', '.join(EXPORTERS)}")
    size = model.config.img_size
    if img_size is not None and img_size != size:
        raise ExportError(f"LeViT exports at {size}x{size} only: its attention-bias index tables are built "
                          f"for a {size // 16}x{size // 16} token grid, so another input size ({img_size}) "
                          f"cannot run; only the batch axis may be dynamic")
    if batch != "dynamic" and (not str(batch).isdigit() or int(batch) < 1):
        raise ExportError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")
    target = importlib.import_module(EXPORTERS[to])
    opts = ExportOptions(precision, batch if batch == "dynamic" else int(batch), opset, simplify, extra)
    spec = spec_for_model(model)
    reference = reference or build_reference_set(model, spec, images=images)
    fusion = fuse_checked(model, reference)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".staging-"))
    try:
        staged = target.write(fusion.model, staging, opts)
        files = _hash_tree(staging, staged.file)
        for name in staged.extra_files:
            files.update(_hash_tree(staging, name))
        if staged.parity_pending:
            parity = {"status": "pending", "reason": staged.parity_pending, "precision": precision}
        else:
            report = _check_parity(staged, staging, opts, reference)
            parity = {"status": "passed" if report.passed else "failed", **report.to_dict()}
            if not report.passed:
                failed = out_dir / f"parity-failed-{to}.json"
                write_json_atomic(failed, parity)
                raise ExportParityError(report, failed)
        size = sum((staging / rel).stat().st_size for rel in files)
        manifest = _manifest(model, to, opts, staged, files, size, fusion.reports, spec, parity)
        _move_into_place(staging, out_dir, [staged.file, *staged.extra_files])
        write_json_atomic(out_dir / MANIFEST_NAME, manifest)
        stale = out_dir / f"parity-failed-{to}.json"
        if stale.exists():
            stale.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):  # a failed export leaves no empty folder behind
            out_dir.rmdir()
    return Artifact(out_dir, out_dir / staged.file, manifest)


def weights_digest(model: Levit) -> str:
    """sha256 of the model's tensors: the cache key must name the weights, not where they came from
    (a random-init seed names different weights whenever the initialisation changes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_export(model: Levit, to: str, precision: str = "fp32", reference: ReferenceSet | None = None,
                  images=()) -> Path:
    """Folder of a parity-checked artifact for ``model``: exported once into the cache, then reused."""
    key = hashlib.sha256(f"{weights_digest(model)}|{to}|{precision}|{__version__}".encode()).hexdigest()[:12]
    folder = cache_dir() / "artifacts" / f"{model.config.name}-{key}-{to}-{precision}"
    if is_artifact(folder):
        try:
            verify_artifact(read_manifest(folder)[0], folder)
            return folder
        except ManifestError:
            pass  # a damaged cache entry is exported again
    export(model, to, folder, precision=precision, reference=reference, images=images)
    return folder


def _manifest(model: Levit, to: str, opts: ExportOptions, staged: StagedArtifact, files: dict[str, str],
              size: int, fusion_reports: list[ParityReport], spec, parity: dict) -> dict:
    info = getattr(model, "load_info", None)
    cfg = model.config
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "levit-deploy", "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "artifact": {"format": to, "file": staged.file, "runtime": staged.runtime, "files": files,
                     "size_bytes": size,
                     "runtime_options": staged.runtime_options, **staged.details},
        "source": info.to_dict() if info else {"source": "in-memory model"},
        "model": {"variant": cfg.name, "num_classes": cfg.num_classes, "distilled": cfg.distilled,
                  "params": count_parameters(model), "flops": count_flops(cfg), "config": cfg.to_dict()},
        "labels": {"source": "imagenet-1k (bundled with levit-deploy)" if cfg.num_classes == 1000
                   else "class indices (no names for this head size; pass --labels)"},
        "export": {"precision": opts.precision, "batch": opts.batch, "opset": opts.opset if to == "onnx" else None,
                   "simplify": opts.simplify, "options": opts.extra, "notes": staged.notes},
        "input": {"name": "pixel_values", "dtype": "float32", "layout": "NCHW",
                  "shape": ["batch" if opts.batch == "dynamic" else opts.batch, 3, cfg.img_size, cfg.img_size]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", cfg.num_classes],
                   "meaning": "mean of classifier and distillation heads" if cfg.distilled else "classifier"},
        "fusion": [{"step": r.stage, "max_abs": r.max_abs, "max_e_over_s": r.max_e_over_s,
                    "worst_margin": r.worst_margin, "passed": r.passed} for r in fusion_reports],
        "preprocessing": spec.to_dict(),
        "parity": parity,
        "versions": {"levit-deploy": __version__, **package_versions(*VERSION_PACKAGES[to])},
        "machine": fingerprint(),
    }
