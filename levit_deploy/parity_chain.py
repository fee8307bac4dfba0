"""The parity chain: every stage between the checkpoint and an artifact, against one fp64 reference.

reference fp32 (unfused) -> each fusion step -> DeployLevit -> each artifact in its runtime. A
stage that fails shows where a discrepancy was introduced instead of only that one exists.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoints import load
from .fuse import FusionError, fuse_checked
from .manifest import ManifestError, read_manifest
from .parity import ParityReport, compare, reference_outputs
from .preprocess import decode_image, parity_inputs, spec_for_layout, transform
from .runtimes import open_runtime


def load_artifact_source(folder: Path):
    """The reference model an artifact was exported from, rebuilt from its manifest."""
    manifest, _ = read_manifest(folder)
    src = manifest.get("source", {})
    variant = manifest["model"]["variant"]
    if src.get("layout") == "none" and src.get("seed") is not None:
        return load(variant, init="random", seed=src["seed"])
    path = src.get("source")
    if not path or not Path(path).exists():
        raise ManifestError(f"{folder}: the source checkpoint {path!r} recorded in the manifest is not on this "
                            f"machine; pass it as MODEL and the artifact with --artifact")
    return load(path)


def image_inputs(folder: Path, spec) -> tuple[np.ndarray, str]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    arrays = [transform(decode_image(p), spec) for p in files]
    if not arrays:
        raise ValueError(f"{folder}: no images found")
    return np.stack(arrays), f"{len(arrays)} images from {folder}"


def run_chain(model: str, weights=None, init: str = "pretrained", artifacts=(), images: Path | None = None,
              samples: int = 16) -> list[ParityReport]:
    artifacts = [Path(a) for a in artifacts]
    is_artifact = Path(model).is_dir() and (Path(model) / "manifest.json").is_file()
    if is_artifact:
        ref = load_artifact_source(Path(model))
        artifacts.insert(0, Path(model))
    else:
        ref = load(model, weights=weights, init=init)
    spec = spec_for_layout(ref.load_info.layout)
    inputs, kind = parity_inputs(samples - samples // 2, samples // 2, seed=0, spec=spec)
    if images is not None:
        extra, extra_kind = image_inputs(images, spec)
        inputs, kind = np.concatenate([inputs, extra]), f"{kind} + {extra_kind}"
    ref64 = reference_outputs(ref, inputs)
    reports = [compare(ref64, ref, inputs, "fp32", stage="reference fp32 (unfused)", input_kind=kind)]
    try:
        reports += fuse_checked(ref, inputs).reports
    except FusionError as e:  # show the chain up to the broken step
        return reports + [e.report]
    for path in artifacts:
        with open_runtime(path, threads=None) as rt:
            stage = f"{rt.name}: {path}"
            reports.append(compare(ref64, rt, inputs, rt.precision, stage=stage, input_kind=kind))
    return reports
