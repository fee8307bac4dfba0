"""Real photographs from scikit-image's wheel (no download), for tests that need real images: int8
calibration, the int8 gate, and `val` on folders labelled by construction.

The seven bundled parity photos came from the same set, so the calibration photos here leave them out:
a test that calibrates on the images it then judges on proves little.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: skimage.data functions that return a photograph and ship inside the wheel
GATE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "hubble_deep_field", "retina", "rocket")
OTHER_PHOTOS = ("brick", "cell", "clock", "coins", "colorwheel", "grass", "gravel", "horse", "immunohistochemistry",
                "logo", "moon", "motorcycle", "page", "text")


@lru_cache(maxsize=None)
def skimage_photo(name: str) -> Image.Image:
    data = pytest.importorskip("skimage.data", reason="scikit-image (a dev dependency) ships the test photos")
    arr = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        arr = np.clip(arr / max(float(arr.max()), 1e-9) * 255, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return Image.fromarray(arr).convert("RGB")


def photo_crops(names, per_photo: int, seed: int = 0, size: int = 256) -> list[tuple[str, Image.Image]]:
    """``per_photo`` random crops (area 20-100 %) and flips of each named photo, resized to ``size``."""
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        img = skimage_photo(name)
        w, h = img.size
        for k in range(per_photo):
            frac = rng.uniform(0.2, 1.0)
            cw, ch = max(16, int(w * np.sqrt(frac))), max(16, int(h * np.sqrt(frac)))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out.append((f"{name}-{k}", crop))
    return out


def write_images(folder: Path, images: list[tuple[str, Image.Image]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images:
        img.save(folder / f"{name}.jpg", quality=92)
    return folder
