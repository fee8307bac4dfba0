"""One way to run any LeViT artifact or module: ``open_runtime(...).infer(batch)``.

Runtime modules are imported only when asked for, so a missing optional backend costs nothing
until it is used, and then says which extra to install.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..manifest import ManifestError, read_manifest, verify_artifact
from .base import MissingDependency, Runtime, RuntimeUnavailable

# runtime name -> (module, class)
RUNTIMES = {
    "torch": ("levit_deploy.runtimes.pytorch", "TorchRuntime"),
    "ort": ("levit_deploy.runtimes.ort", "OrtRuntime"),
    "openvino": ("levit_deploy.runtimes.openvino", "OpenVinoRuntime"),
    "tensorrt": ("levit_deploy.runtimes.tensorrt", "TensorRtRuntime"),
    "coreml": ("levit_deploy.runtimes.coreml", "CoreMlRuntime"),
}
# artifact format -> runtimes able to run it, default first
FORMAT_RUNTIMES = {"onnx": ("ort",), "openvino": ("openvino",), "tensorrt": ("tensorrt",),
                   "coreml": ("coreml",)}
SUFFIX_FORMATS = {".onnx": "onnx", ".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt",
                  ".mlpackage": "coreml"}


def runtime_class(name: str) -> type[Runtime]:
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[name]
    return getattr(importlib.import_module(module), cls)


def open_runtime(path_or_model, runtime: str | None = None, device: str = "cpu", threads: int | None = 1,
                 **options) -> Runtime:
    """Open an artifact (its file or its folder) or wrap a torch module in a Runtime.

    For an artifact with a manifest, the runtime defaults to the one for its format, every file's
    sha256 is checked against the manifest (a mismatch is refused), and the precision that the
    artifact was exported in is passed on so parity applies the right tolerance.
    """
    if isinstance(path_or_model, torch.nn.Module):
        if runtime not in (None, "torch"):
            raise ValueError(f"a torch module runs on the torch runtime, not {runtime!r}; export it first")
        return runtime_class("torch")(path_or_model, device=device, threads=threads, **options)
    path = Path(path_or_model)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such artifact")
    manifest = None
    try:
        manifest, folder = read_manifest(path)
    except ManifestError:
        if path.is_dir():
            raise
    if manifest is not None:
        file = verify_artifact(manifest, folder)
        fmt = manifest["artifact"]["format"]
        options.setdefault("precision", manifest["export"]["precision"])
        for key, value in manifest["artifact"].get("runtime_options", {}).items():
            options.setdefault(key, value)
    else:
        file = path
        fmt = SUFFIX_FORMATS.get(path.suffix)
        if fmt is None:
            raise ValueError(f"{path}: unknown artifact type and no manifest.json beside it")
    allowed = FORMAT_RUNTIMES[fmt]
    runtime = runtime or allowed[0]
    if runtime not in allowed:
        raise ValueError(f"{file}: a {fmt} artifact runs on {', '.join(allowed)}, not {runtime!r}")
    rt = runtime_class(runtime)(str(file), device=device, threads=threads, **options)
    rt.manifest = manifest
    return rt


__all__ = ["open_runtime", "Runtime", "RuntimeUnavailable", "MissingDependency", "RUNTIMES"]
