"""The manifest that travels with every artifact, and atomic file writes.

A manifest says exactly what an artifact is: its file and sha256, the checkpoint it came from,
versions, export options, the fusion steps, the preprocessing to feed it, its parity report and
the machine it was checked on. Runtimes refuse an artifact whose hash no longer matches.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1  # bump when the manifest's structure changes
ISA_FLAGS = ("sse4_2", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8", "asimd", "neon", "sve", "sve2", "bf16", "i8mm", "asimddp")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "DNNL_DEFAULT_FPMATH_MODE",
               "ONEDNN_DEFAULT_FPMATH_MODE", "LRU_CACHE_CAPACITY", "THP_MEM_ALLOC_ENABLE",
               "TORCH_MKLDNN_MATMUL_MIN_DIM", "OMP_PROC_BIND", "KMP_AFFINITY")


class ManifestError(Exception):
    """A missing, unreadable or inconsistent manifest, or an artifact that does not match it."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def package_versions(*names: str) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_info() -> dict:
    """CPU model and the ISA features that change speed or numerics (bf16 fast paths, AMX, SVE)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model", "hardware") and value.strip():
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    return {"model": model, "arch": platform.machine(), "isa": sorted(f for f in ISA_FLAGS if f in flags)}


def fingerprint(threads: int | None = None) -> dict:
    """The machine an artifact was checked or timed on."""
    return {
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
    }


def is_artifact(path: str | Path) -> bool:
    """True for a folder written by ``export`` (it holds a manifest.json)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: str | Path) -> tuple[dict, Path]:
    """(manifest, folder) for an artifact folder, a manifest file, or a file inside an artifact folder."""
    path = Path(path)
    candidates = [path / MANIFEST_NAME] if path.is_dir() else [path] if path.name == MANIFEST_NAME \
        else [path.parent / MANIFEST_NAME]
    mpath = candidates[0]
    if not mpath.is_file():
        raise ManifestError(f"{path}: no {MANIFEST_NAME} found at {mpath}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or "artifact" not in manifest:
        raise ManifestError(f"{mpath}: not a levit-deploy manifest (no 'artifact' entry)")
    return manifest, mpath.parent


def verify_artifact(manifest: dict, folder: Path) -> Path:
    """Path of the artifact's main file after checking every listed file's sha256."""
    files = manifest["artifact"].get("files", {})
    for name, expected in files.items():
        f = folder / name
        if not f.is_file():
            raise ManifestError(f"{f}: listed in the manifest but missing")
        actual = sha256_file(f)
        if actual != expected:
            raise ManifestError(f"{f}: sha256 {actual[:16]}… does not match the manifest's {expected[:16]}…; "
                                f"the artifact was modified or replaced after export. Re-export it.")
    return folder / manifest["artifact"]["file"]
