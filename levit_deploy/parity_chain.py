"""The parity chain: every stage between the checkpoint and an artifact, against one fp64 reference.

reference fp32 (unfused) -> each fusion step -> DeployLevit -> each artifact in its runtime. A
stage that fails shows where a discrepancy was introduced instead of only that one exists.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoints import load, load_artifact_source
from .fuse import FusionError, fuse_checked
from .manifest import is_artifact
from .parity import ParityReport, compare, reference_outputs
from .preprocess import decode_image, parity_inputs, spec_for_layout, transform
from .runtimes import open_runtime


def image_inputs(folder: Path, spec) -> tuple[np.ndarray, str]:
    """Every image file under ``folder`` (the same selection as predict), decoded with ``spec``."""
    from .predict import expand_inputs

    arrays = [transform(decode_image(p), spec) for p in expand_inputs([folder])]
    if not arrays:
        raise ValueError(f"{folder}: no images found")
    return np.stack(arrays), f"{len(arrays)} images from {folder}"


def run_chain(model: str, weights=None, init: str = "pretrained", artifacts=(), images: Path | None = None,
              samples: int = 16) -> list[ParityReport]:
    artifacts = [Path(a) for a in artifacts]
    if is_artifact(model):
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
