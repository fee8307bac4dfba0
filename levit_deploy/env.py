"""Leaf utilities every other module may use: optional imports, the cache folder, hashing, atomic
writes and the machine fingerprint. Imports nothing from the package.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Generic, TypeVar

ISA_FLAGS = ("sse4_2", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8", "asimd", "neon", "sve", "sve2", "bf16", "i8mm", "asimddp")
#: x86-64 features with an 8-bit dot product that accumulates in 32 bits. Without one, x86 int8 kernels multiply
#: uint8 activations by int8 weights with vpmaddubsw, whose 16-bit sums of two products saturate (2·255·127 >
#: 32767): ONNX Runtime's U8S8/S8S8 and oneDNN's (OpenVINO's) int8 on AVX2 or AVX-512 without VNNI.
INT8_DOT_PRODUCT_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "DNNL_DEFAULT_FPMATH_MODE",
               "ONEDNN_DEFAULT_FPMATH_MODE", "LRU_CACHE_CAPACITY", "THP_MEM_ALLOC_ENABLE",
               "TORCH_MKLDNN_MATMUL_MIN_DIM", "OMP_PROC_BIND", "KMP_AFFINITY")


class MissingDependency(ImportError):
    """An optional package is not installed; the message is the one line telling how to get it."""


def require(module: str, purpose: str, extra: str | None = None) -> ModuleType:
    """Import an optional package, or raise MissingDependency naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingDependency(f"{purpose} needs the '{top}' package ({e.msg}): "
                                f"pip install 'levit-deploy[{extra or top}]'") from None


T = TypeVar("T")


class Registry(Generic[T]):
    """Plug-ins of one kind (model families, backends): one module each under ``package``, whose ``attr`` is the
    plug-in; imported on first use, kept in the order of ``modules``, keyed by their ``name``."""

    def __init__(self, package: str, modules: tuple[str, ...], attr: str, kind: str,
                 error: type[Exception] = KeyError):
        self.package, self.modules, self.attr, self.kind, self.error = package, modules, attr, kind, error
        self._entries: dict[str, T] | None = None

    def all(self) -> dict[str, T]:
        if self._entries is None:
            found = [getattr(importlib.import_module(f"{self.package}.{m}"), self.attr) for m in self.modules]
            self._entries = {entry.name: entry for entry in found}
        return self._entries

    def get(self, name: str) -> T:
        if name not in self.all():
            raise self.error(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.all())}")
        return self.all()[name]


def cache_dir() -> Path:
    """Where downloads and cached exports live: $LEVIT_DEPLOY_CACHE, else $XDG_CACHE_HOME/levit-deploy,
    else ~/.cache/levit-deploy."""
    if os.environ.get("LEVIT_DEPLOY_CACHE"):
        return Path(os.environ["LEVIT_DEPLOY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "levit-deploy"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the current umask (0644 usually)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename: readers see the old file or the new one.

    The file gets the mode ``open()`` would give it (mkstemp alone makes it 0600, which would lock a
    service account that can read the rest of an artifact out of its manifest).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


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


def int8_products_saturate(cpu: dict | None = None) -> bool:
    """True on an x86-64 CPU (``cpu_info()``, this one by default) without an int8 dot product: there uint8 × int8
    kernels saturate (LightViT-T in-distribution fixture, ONNX Runtime U8S8: worst cosine 0.907 against 0.992 for
    the same QDQ graph without its fused kernels)."""
    cpu = cpu_info() if cpu is None else cpu
    return cpu.get("arch") in ("x86_64", "AMD64") and not set(INT8_DOT_PRODUCT_ISA) & set(cpu.get("isa", ()))


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


def text_table(rows: list[tuple], indent: str = "", right: tuple[int, ...] = ()) -> str:
    """Every table levit-deploy prints: columns two spaces apart under a ruled header row (``rows[0]``); ``right``:
    the indices of columns aligned to the right (numbers)."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]

    def cells(row: tuple) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [indent + cells(row) for row in rows]
    lines.insert(1, indent + "-" * (len(lines[0]) - len(indent)))
    return "\n".join(lines)
