"""An artifact folder on disk: staging, the manifest, verification, the export cache, its source model.

An artifact is a folder holding the exported file(s) and ``manifest.json``. The manifest says exactly
what the artifact is: its files and their sha256, the checkpoint it came from, versions, export
options, the fusion steps, the preprocessing to feed it, its parity report and the machine it was
checked on. Files are written into a hidden staging folder and renamed into place only after the
parity gate passes, the manifest last, so a failed or interrupted export never leaves something
that looks like a good artifact; runtimes refuse an artifact whose files no longer match.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .env import cache_dir, file_mode, sha256_file, write_json_atomic

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # 2: per-input parity reports (the floor rule); bump when the structure changes


class ManifestError(Exception):
    """A missing, unreadable or inconsistent manifest, or an artifact that does not match it."""


@dataclass
class StagedArtifact:
    """What a backend wrote into the staging folder."""

    file: str  # the main file or package folder, relative to the artifact folder
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runtime_options: dict = field(default_factory=dict)  # recorded in the manifest, used on open
    parity_pending: str | None = None  # why numeric parity cannot run here (e.g. CoreML off macOS)
    extra_files: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [self.file, *self.extra_files]


@dataclass
class Artifact:
    folder: Path
    path: Path
    manifest: dict

    @property
    def parity(self) -> dict:
        return self.manifest["parity"]


def is_artifact(path: str | Path) -> bool:
    """True for a folder written by ``export`` (it holds a manifest.json)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def hash_tree(root: Path, rel: str) -> dict[str, str]:
    """sha256 of a file, or of every file inside a package folder (CoreML .mlpackage)."""
    target = root / rel
    if target.is_file():
        return {rel: sha256_file(target)}
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(target.rglob("*")) if p.is_file()}


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden staging folder inside ``out_dir``; removed afterwards, with ``out_dir`` itself if this
    export created it and nothing else landed there."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=out_dir, prefix=".staging-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()


def publish(staged: StagedArtifact, folder: Path, out_dir: Path, manifest: dict) -> None:
    """Move the staged files into ``out_dir``, every file with the same mode, then write the manifest."""
    mode = file_mode()
    for name in staged.names:
        for path in [folder / name] if (folder / name).is_file() else (folder / name).rglob("*"):
            os.chmod(path, mode if path.is_file() else mode | 0o111)
        if (folder / name).is_dir():
            os.chmod(folder / name, mode | 0o111)
        src, dst = folder / name, out_dir / name
        if src.is_dir() and dst.exists():  # os.replace cannot replace a non-empty folder
            old = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".old-{name}-"))
            os.replace(dst, old / name)
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)


def read_manifest(path: str | Path) -> tuple[dict, Path]:
    """(manifest, folder) for an artifact folder, a manifest file, or a file inside an artifact folder."""
    path = Path(path)
    mpath = path / MANIFEST_NAME if path.is_dir() else path if path.name == MANIFEST_NAME \
        else path.parent / MANIFEST_NAME
    if not mpath.is_file():
        raise ManifestError(f"{path}: no {MANIFEST_NAME} found at {mpath}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or "artifact" not in manifest:
        raise ManifestError(f"{mpath}: not a levit-deploy manifest (no 'artifact' entry)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{mpath}: manifest format {manifest.get('format_version')}, this levit-deploy "
                            f"reads format {FORMAT_VERSION}; re-export the artifact")
    return manifest, mpath.parent


def verify_artifact(manifest: dict, folder: Path) -> Path:
    """Path of the artifact's main file after checking every listed file's sha256."""
    for name, expected in manifest["artifact"].get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise ManifestError(f"{f}: listed in the manifest but missing")
        actual = sha256_file(f)
        if actual != expected:
            raise ManifestError(f"{f}: sha256 {actual[:16]}… does not match the manifest's {expected[:16]}…; "
                                f"the artifact was modified or replaced after export. Re-export it.")
    return folder / manifest["artifact"]["file"]


def load_source(folder: str | os.PathLike):
    """The reference model an artifact was exported from, rebuilt from its manifest."""
    from .checkpoints import load

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


def weights_digest(model) -> str:
    """sha256 of the model's tensors: the cache key must name the weights, not where they came from
    (a random-init seed names different weights whenever the initialisation changes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_export(model, to: str, precision: str = "fp32", reference=None, images=()) -> Path:
    """Folder of a parity-checked artifact for ``model``: exported once into the cache, then reused."""
    from . import __version__
    from .export import export

    key = hashlib.sha256(f"{weights_digest(model)}|{to}|{precision}|{__version__}".encode()).hexdigest()[:12]
    folder = cache_dir() / "artifacts" / f"{model.config.name}-{key}-{to}-{precision}"
    if is_artifact(folder):
        try:
            verify_artifact(read_manifest(folder)[0], folder)
            return folder
        except ManifestError:
            pass  # a damaged or outdated cache entry is exported again
    export(model, to, folder, precision=precision, reference=reference, images=images)
    return folder
