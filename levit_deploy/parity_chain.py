"""The parity chain: every stage between the checkpoint and an artifact, against one reference set.

reference fp32 (unfused: the floor itself) -> each fusion step -> the deploy model -> each artifact in its
runtime. A stage that fails shows where a discrepancy was introduced instead of only that one exists.
"""
from __future__ import annotations

from pathlib import Path

from .artifacts import is_artifact
from .backends import open_artifact, open_runtime
from .checkpoints import resolve
from .fuse import FusionError, fuse_checked
from .parity import ParityReport, compare
from .reference import build_reference_set


def run_chain(model: str, weights=None, init: str = "pretrained", artifacts=(), images: Path | None = None,
              noise: int = 4, synthetic: int = 4, entry: str | None = None) -> list[ParityReport]:
    artifacts = [Path(a) for a in artifacts]
    for path in filter(is_artifact, [model, *artifacts]):
        open_artifact(path)  # a bad artifact is one line before any work
    target = resolve(model, weights, init, entry)
    if target.artifact is not None:
        artifacts.insert(0, target.artifact)
    ref = target.model()
    reference = build_reference_set(ref, images=[images] if images else (), noise=noise, synthetic=synthetic)
    reports = [compare(reference, ref, "fp32", stage="reference fp32 (unfused)")]
    try:
        reports += fuse_checked(ref, reference).reports
    except FusionError as e:  # show the chain up to the broken step
        return reports + [e.report]
    for path in artifacts:
        with open_runtime(path, threads=None) as rt:
            reports.append(compare(reference, rt, rt.precision, stage=f"{rt.name}: {path}"))
    return reports
