"""The manifest's schema: what ``manifest.json`` must hold before any command trusts a value of it.

A manifest comes from disk, so it may be damaged, written by another tool or crafted. Every command reads it
through :func:`validate`, which checks structure, types and the ranges of the values that size work (input
sizes, preprocessing) and names the first field that is wrong, so a bad manifest is one line, never a
traceback or a run that allocates gigabytes. Which files a manifest may name is checked against the folder by
:mod:`levit_deploy.artifacts`; which formats exist, by the backend registry.
"""
from __future__ import annotations

import re
from pathlib import Path

from .families import families
from .preprocess import PreprocessSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # 2: per-input parity reports (the floor rule); bump when the structure changes
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
MAX_CLASSES = 100_000
MAX_IMG_SIZE = 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(Exception):
    """A missing, unreadable or inconsistent manifest, or an artifact that does not match it."""


def validate(manifest, where: Path) -> dict:
    """``manifest`` if it has the structure every command relies on, else ManifestError naming the field."""
    if not isinstance(manifest, dict) or "artifact" not in manifest:
        raise ManifestError(f"{where}: not a levit-deploy manifest (no 'artifact' entry)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{where}: manifest format {manifest.get('format_version')!r}, this levit-deploy "
                            f"reads format {FORMAT_VERSION}; re-export the artifact")
    check = _Checker(where)
    artifact = check.section(manifest, "artifact")
    check.text(artifact, "artifact.format")
    check.text(artifact, "artifact.file")
    check.text(artifact, "artifact.runtime")
    check.section(artifact, "artifact.runtime_options", required=False)
    files = check.section(artifact, "artifact.files")
    if not files:
        raise ManifestError(f"{where}: artifact.files is empty: an artifact must list the sha256 of every file "
                            f"the runtime opens")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ManifestError(f"{where}: artifact.files[{name!r}] must be a sha256 (64 hex digits), got "
                                f"{_short(digest)}")
    model = check.section(manifest, "model")
    family = check.text(model, "model.family")
    if family not in families():
        raise ManifestError(f"{where}: model.family {_short(family)} is not a known family "
                            f"({', '.join(families())})")
    check.text(model, "model.variant")
    check.integer(model, "model.num_classes", 1, MAX_CLASSES)
    export = check.section(manifest, "export")
    if export.get("precision") not in PRECISIONS:
        raise ManifestError(f"{where}: export.precision must be one of {', '.join(PRECISIONS)}, got "
                            f"{_short(export.get('precision'))}")
    _check_shape(check, manifest)
    check.section(manifest, "parity")
    source = check.section(manifest, "source", required=False)
    seed = source.get("seed")
    if not isinstance(source.get("source", ""), str) or not (seed is None or _is_int(seed, 0, 2**63)):
        raise ManifestError(f"{where}: source.source must be a path and source.seed null or an integer >= 0")
    try:
        PreprocessSpec.from_dict(check.section(manifest, "preprocessing"))
    except ValueError as e:
        raise ManifestError(f"{where}: preprocessing: {e}") from None
    return manifest


def _check_shape(check: "_Checker", manifest: dict) -> None:
    """input.shape is [batch, 3, size, size] with batch "batch" or a positive int; output.shape [batch, classes]."""
    shape = check.section(manifest, "input").get("shape")
    size_ok = isinstance(shape, list) and len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3] \
        and _is_int(shape[2], 16, MAX_IMG_SIZE) and (shape[0] == "batch" or _is_int(shape[0], 1, 1 << 16))
    if not size_ok:
        raise ManifestError(f"{check.where}: input.shape must be [batch, 3, size, size] with 16 <= size <= "
                            f"{MAX_IMG_SIZE}, got {_short(shape)}")
    out = check.section(manifest, "output").get("shape")
    if not (isinstance(out, list) and len(out) == 2 and out[1] == manifest["model"]["num_classes"]):
        raise ManifestError(f"{check.where}: output.shape must be [batch, model.num_classes], got {_short(out)}")


class _Checker:
    """Field checks that name the manifest and the dotted field in their one-line refusal."""

    def __init__(self, where: Path):
        self.where = where

    def _fail(self, field: str, expected: str, value) -> None:
        raise ManifestError(f"{self.where}: {field} must be {expected}, got {_short(value)}")

    def section(self, parent: dict, field: str, required: bool = True) -> dict:
        key = field.rsplit(".", 1)[-1]
        if key not in parent and not required:
            return {}
        value = parent.get(key)
        if not isinstance(value, dict):
            self._fail(field, "an object", value)
        return value

    def text(self, parent: dict, field: str) -> str:
        value = parent.get(field.rsplit(".", 1)[-1])
        if not isinstance(value, str) or not value:
            self._fail(field, "a non-empty string", value)
        return value

    def integer(self, parent: dict, field: str, low: int, high: int) -> int:
        value = parent.get(field.rsplit(".", 1)[-1])
        if not _is_int(value, low, high):
            self._fail(field, f"an integer in [{low}, {high}]", value)
        return value


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _short(value) -> str:
    """A bounded description of a value from the manifest (it may be huge)."""
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."
