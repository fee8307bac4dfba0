"""CoreML runtime: predicts through Core ML on macOS; elsewhere it refuses with the reason."""
from __future__ import annotations

import platform

import numpy as np

from .base import Runtime, RuntimeUnavailable, require


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


class CoreMlRuntime(Runtime):
    name = "coreml"

    def __init__(self, path: str, device: str = "cpu", threads: int | None = None, precision: str = "fp32",
                 image_input: bool = False, labels: bool = False, compute_units: str | None = None):
        if platform.system() != "Darwin":
            raise RuntimeUnavailable(f"coreml runtime: Core ML predicts only on macOS, this is {platform.system()}; "
                                     f"the package was validated structurally at export")
        ct = require("coremltools", "the 'coreml' runtime")
        units = compute_units or ("CPU_ONLY" if device == "cpu" else "ALL")
        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, units))
        self.path, self.precision, self.units = str(path), precision, units
        self.image_input, self.labels = image_input, labels
        # a classifier package outputs probabilities: parity maps the reference into log-probabilities
        self.output_transform = log_softmax if labels else None
        spec = self.model.get_spec().description
        self.input_name = spec.input[0].name
        self.prob_name = spec.predictedProbabilitiesName
        self.classes = None

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits; for a classifier package the log-probabilities (logits up to a per-input shift)."""
        x = self.check_batch(x)
        if self.image_input:
            return np.concatenate([self._predict_image(img) for img in x])
        if self.labels:  # classifier packages answer one input at a time
            return np.concatenate([self._log_probs(self.model.predict({self.input_name: x[i:i + 1]}))
                                   for i in range(len(x))])
        return np.asarray(self.model.predict({self.input_name: x})["logits"], dtype=np.float32)

    def _predict_image(self, chw: np.ndarray) -> np.ndarray:
        from PIL import Image

        from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
        rgb = (chw.transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255
        img = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
        out = self.model.predict({self.input_name: img})
        return self._log_probs(out) if self.labels else np.asarray(out["logits"], np.float32).reshape(1, -1)

    def _log_probs(self, out: dict) -> np.ndarray:
        probs = out[self.prob_name]
        if self.classes is None:
            self.classes = list(probs)
        return np.log(np.maximum(np.array([[probs[c] for c in self.classes]], np.float64), 1e-45)).astype(np.float32)

    def info(self) -> dict:
        return {"runtime": self.name, "path": self.path, "compute_units": self.units, "precision": self.precision,
                "image_input": self.image_input, "labels": self.labels}
