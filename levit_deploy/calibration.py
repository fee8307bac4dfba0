"""Calibration images for int8: the user's own (``--calib DIR``), or a stand-in that says it is one.

Post-training quantization sets every activation range from what the calibration images produce, so
the images should look like what the model will see: 300 of the user's own is what we recommend (NNCF's
default subset size). Without them the stand-in is random crops and flips of the bundled photos plus
procedural JPEGs: real-image statistics, but only seven scenes, and the same photos the parity gate
decides on (centre crops there, other crops here). Every int8 manifest records which set was used.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .preprocess import (ImageError, PreprocessSpec, bundled_photos, decode_image, expand_inputs, synthetic_jpegs,
                         transform)

RECOMMENDED = 300
STAND_IN_SIZE = 64


@dataclass
class CalibrationSet:
    """Preprocessed calibration inputs (N, 3, H, W) and what they were, for the manifest."""

    inputs: np.ndarray
    source: str
    stand_in: bool
    skipped: list[str] = field(default_factory=list)  # unreadable files under --calib

    def describe(self) -> dict:
        return {"source": self.source, "size": len(self.inputs), "stand_in": self.stand_in,
                "skipped_files": len(self.skipped)}

    def warning(self) -> str | None:
        if self.stand_in:
            return (f"int8 calibrated on a STAND-IN set ({self.source}): activation ranges come from 7 scenes, not "
                    f"your data; pass --calib DIR with ~{RECOMMENDED} of your own images")
        if len(self.inputs) < 100:
            return (f"int8 calibrated on only {len(self.inputs)} images from {self.source}; ~{RECOMMENDED} give "
                    f"steadier activation ranges")
        return None


def calibration_set(spec: PreprocessSpec, calib=None, limit: int = RECOMMENDED, seed: int = 0) -> CalibrationSet:
    """The images under ``calib`` (up to ``limit``, evenly spread over the sorted list), or the stand-in."""
    if calib is None:
        return stand_in(spec, seed=seed)
    paths = list(expand_inputs([calib]))
    if len(paths) > limit:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    arrays, skipped = [], []
    for p in paths:
        try:
            arrays.append(transform(decode_image(p), spec))
        except ImageError as e:
            skipped.append(str(e))
    if not arrays:
        raise ImageError(f"{calib}: no readable images for calibration" + (f" ({skipped[0]})" if skipped else ""))
    return CalibrationSet(np.stack(arrays), str(calib), False, skipped)


def stand_in(spec: PreprocessSpec, n: int = STAND_IN_SIZE, seed: int = 0) -> CalibrationSet:
    """Random resized crops (area 25-100 %, aspect 3/4-4/3) and flips of the bundled photos, and 1 in 8
    procedural JPEGs: the training-time augmentation of ImageNet recipes, so ranges cover more than the
    centre crops the gate uses."""
    rng = np.random.default_rng(seed)
    photos = [decode_image(p) for p in bundled_photos()]
    n_synthetic = n // 8
    arrays = [transform(decode_image(data), spec) for data in synthetic_jpegs(n_synthetic, seed + 1)]
    for i in range(n - n_synthetic):
        img = photos[i % len(photos)]
        w, h = img.size
        area = rng.uniform(0.25, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, int(round(np.sqrt(area * aspect)))), min(h, int(round(np.sqrt(area / aspect))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((spec.resize, spec.resize), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arrays.append(transform(crop, spec))
    return CalibrationSet(np.stack(arrays).astype(np.float32),
                          f"stand-in: {n - n_synthetic} random crops and flips of the 7 bundled photos + "
                          f"{n_synthetic} procedural JPEGs", True)
