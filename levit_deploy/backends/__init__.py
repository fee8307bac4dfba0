"""The backend registry: the one place that knows which backends exist.

Each backend is one module here holding its exporter, its runtime and a ``BACKEND`` descriptor
(:class:`~levit_deploy.backends.base.Backend`). Adding a backend is one new module plus one entry in
``MODULES``. Backend modules import their optional packages only when used, so importing the
registry costs nothing beyond torch and numpy.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import MANIFEST_NAME, ManifestError, read_manifest, verify_artifact
from ..env import Registry
from .base import Backend, ExportError, InputSpec, Runtime, RuntimeConfig, RuntimeUnavailable

MODULES = ("onnx", "openvino", "coreml", "tensorrt", "executorch", "pytorch")
REGISTRY: Registry[Backend] = Registry(__name__, MODULES, "BACKEND", "backend")


def backends() -> dict[str, Backend]:
    """name -> descriptor, in registry order."""
    return REGISTRY.all()


def get_backend(name: str) -> Backend:
    """The backend of an export target (artifact format)."""
    if name not in backends():
        raise ExportError(f"unknown export target {name!r}; choose one of {', '.join(targets())}")
    return backends()[name]


def by_runtime(runtime: str) -> Backend:
    """The backend whose runtime is called ``runtime``."""
    for b in backends().values():
        if b.runtime == runtime:
            return b
    raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(runtimes())}")


def targets() -> list[str]:
    """Export targets: backends with an exporter."""
    return [b.name for b in backends().values() if b.write is not None]


def runtimes() -> list[str]:
    return [b.runtime for b in backends().values()]


def installed_runtimes() -> list[str]:
    """Runtimes that can run here: their packages import and the hardware they need is present."""
    return [b.runtime for b in backends().values() if b.usable()]


def module_runtime() -> str:
    """The runtime that runs a torch module as it is (no exporter): the reference, and the baseline."""
    return next(b.runtime for b in backends().values() if b.write is None)


def default_runtime() -> str:
    """The runtime predict uses when none is named: the first usable one with an exporter."""
    return next((b.runtime for b in backends().values() if b.write is not None and b.usable()), module_runtime())


def open_artifact(path: str | Path) -> tuple[dict, Path, Path, Backend]:
    """(manifest, folder, main file, backend) of an artifact folder (or a file in it): the manifest checked against
    the schema and its format against the registry, every file it names inside the folder and hash-checked, every
    file the runtime opens hashed. ManifestError, one line, otherwise."""
    manifest, folder = read_manifest(path)
    fmt = manifest["artifact"]["format"]
    if fmt not in backends():
        raise ManifestError(f"{folder / MANIFEST_NAME}: artifact.format {fmt[:40]!r} is not a known format "
                            f"({', '.join(backends())})")
    backend = backends()[fmt]
    return manifest, folder, verify_artifact(manifest, folder, backend.companions), backend


def open_runtime(path_or_model, runtime: str | None = None, device: str = "cpu", threads: int | None = 1,
                 **options) -> Runtime:
    """A Runtime for an artifact (its folder or its file) or a torch module; opened on first use.

    For an artifact with a manifest, the runtime defaults to the one of its format, every file's sha256
    is checked (a mismatch is refused), and the manifest's precision, batch contract and runtime
    options are passed on. A bare file is recognised by its suffix.
    """
    if isinstance(path_or_model, torch.nn.Module):
        if runtime not in (None, module_runtime()):
            raise ValueError(f"a torch module runs on the {module_runtime()} runtime, not {runtime!r}; export it first")
        options.setdefault("input_spec", InputSpec(size=path_or_model.config.img_size))
        config, own = RuntimeConfig.split({"device": device, "threads": threads, **options})
        return by_runtime(module_runtime()).runtime_class(path_or_model, config, **own)
    path = Path(path_or_model)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such artifact")
    manifest = None
    try:
        manifest, _, file, backend = open_artifact(path)
    except ManifestError:
        if path.is_dir() or (path.parent / MANIFEST_NAME).exists():
            raise
    if manifest is not None:
        options.setdefault("precision", manifest["export"]["precision"])
        options.setdefault("input_spec", InputSpec.from_manifest(manifest))
        for key, value in manifest["artifact"].get("runtime_options", {}).items():
            options.setdefault(key, value)
    else:
        file = path
        matches = [b for b in backends().values() if path.suffix in b.suffixes]
        if not matches:
            raise ValueError(f"{path}: unknown artifact type and no manifest.json beside it")
        backend = matches[0]
    if runtime not in (None, backend.runtime):
        raise ValueError(f"{file}: a {backend.name} artifact runs on {backend.runtime}, not {runtime!r}")
    config, own = RuntimeConfig.split({"device": device, "threads": threads, "manifest": manifest, **options})
    return backend.runtime_class(str(file), config, **own)


__all__ = ["Backend", "Runtime", "RuntimeConfig", "RuntimeUnavailable", "ExportError", "InputSpec", "backends", "get_backend",
           "by_runtime", "targets", "runtimes", "installed_runtimes", "module_runtime", "default_runtime",
           "open_artifact", "open_runtime"]
