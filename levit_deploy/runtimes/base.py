"""The one interface every runtime implements, and the lazy import of optional backends."""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from types import ModuleType

import numpy as np

# extra to install for each optional package
EXTRAS = {"onnxruntime": "onnx", "onnx": "onnx", "onnxsim": "onnx", "onnxscript": "onnx",
          "openvino": "openvino", "coremltools": "coreml", "tensorrt": "tensorrt",
          "matplotlib": "plot"}


class MissingDependency(ImportError):
    """An optional backend is not installed; the message is the one line telling how to get it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional package, or raise MissingDependency with the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = EXTRAS.get(top, top)
        raise MissingDependency(f"{purpose} needs the '{top}' package ({e.msg}): "
                                f"pip install 'levit-deploy[{extra}]'") from None


class RuntimeUnavailable(RuntimeError):
    """The runtime is installed but cannot run here (no GPU, not macOS, wrong engine host...)."""


class Runtime(ABC):
    """Runs a LeViT artifact or module: float32 (B, 3, 224, 224) in, (B, classes) logits out."""

    name: str = "runtime"
    #: the precision that actually ran; parity uses its tolerance
    precision: str = "fp32"
    #: the artifact's manifest, already checked against its files (None for modules and bare files)
    manifest: dict | None = None

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def info(self) -> dict: ...

    def close(self) -> None:
        """Release sessions and device memory; the runtime cannot be used afterwards."""

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def check_batch(x: np.ndarray, size: int = 224) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise ValueError(f"expected a float32 batch of shape (B, 3, {size}, {size}), got {x.shape}")
        return np.ascontiguousarray(x, dtype=np.float32)
