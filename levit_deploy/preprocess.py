"""Image decoding, eval transforms, and the images parity is judged on.

A :class:`PreprocessSpec` describes an eval transform (resize the shorter side, centre-crop,
interpolation, mean/std, channel order); each model family says which spec its checkpoints were
evaluated with. Decoding turns every PIL mode into RGB deliberately (see :func:`to_rgb`) and refuses
images over a pixel limit before decoding them, so a decompression bomb costs nothing.
"""
from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_EVAL_RESIZE = 256
DEFAULT_MAX_PIXELS = 64_000_000  # about 8000x8000
MAX_ASPECT = 50  # longer / shorter side: resizing the shorter side of a 100000x1 strip would take gigabytes
MAX_RESIZE = 1024  # shorter side after resizing; with MAX_ASPECT a resized image stays under 160 MB
INTERPOLATIONS = ("bicubic",)
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                  ".jfif", ".ico", ".tga"}


@dataclass(frozen=True)
class PreprocessSpec:
    resize: int  # shorter side after resizing
    crop: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"
    scale: float = 1 / 255
    background: tuple[int, int, int] = BACKGROUND
    source: str = "official"

    def __post_init__(self):
        """Refuse values that would make a transform fail, divide by zero or allocate without bound (a spec
        may come from a manifest on disk)."""
        if not (_is_int(self.crop, 1, MAX_RESIZE) and _is_int(self.resize, 1, MAX_RESIZE)):
            raise ValueError(f"resize and crop must be integers in [1, {MAX_RESIZE}], got resize={self.resize!r}, "
                             f"crop={self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if self.channel_order not in ("RGB", "BGR") or self.layout != "NCHW":
            raise ValueError(f"channel_order must be RGB or BGR and layout NCHW, got {self.channel_order!r}, "
                             f"{self.layout!r}")
        for name, low in (("mean", -np.inf), ("std", 0.0)):
            values = getattr(self, name)
            if not (len(values) == 3 and all(_is_real(v) and v > low for v in values)):
                raise ValueError(f"{name} must be three finite numbers{' > 0' if low == 0 else ''}, got {values!r}")
        if not (_is_real(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        if not (len(self.background) == 3 and all(_is_int(v, 0, 255) for v in self.background)):
            raise ValueError(f"background must be three integers in [0, 255], got {self.background!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """A spec from its dict form; ValueError naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"expected an object, got {type(d).__name__}")
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown fields {', '.join(sorted(map(str, unknown)))}")
        d = dict(d)
        for key in ("mean", "std", "background"):
            if key in d:
                if not isinstance(d[key], (list, tuple)):
                    raise ValueError(f"{key} must be a list of three numbers, got {type(d[key]).__name__}")
                d[key] = tuple(d[key])
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(str(e)) from None


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


#: the ImageNet recipe most checkpoints were evaluated with: shorter side 256 (crop fraction 0.875),
#: centre crop 224, bicubic; families declare their own specs from it
IMAGENET_EVAL = PreprocessSpec(resize=IMAGENET_EVAL_RESIZE, crop=224, source="official")


class ImageError(Exception):
    """An input that is not a usable image; the message names the file and the reason."""


def to_rgb(img: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """RGB from any PIL mode.

    Transparency (RGBA, LA, PA, P with a transparent colour) is composited on ``background``;
    16-bit ``I;16*`` is scaled by 255/65535; 32-bit ``I`` is read as 16-bit data when any value
    exceeds 255, else as 8-bit; float ``F`` as [0, 1] when its maximum is at most 1, else [0, 255].
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr * 255.0 / 65535.0
        elif mode == "I":
            arr = arr * 255.0 / 65535.0 if arr.max(initial=0) > 255 else arr
        else:
            arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        return gray.convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Open, size-check, EXIF-orient and convert an image to RGB; ImageError on any failure."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        if not isinstance(source, bytes):
            path = Path(source)
            if not path.exists():
                raise ImageError(f"{name}: no such file")
            if path.is_dir():
                raise ImageError(f"{name}: is a folder")
            if path.stat().st_size == 0:
                raise ImageError(f"{name}: empty file (0 bytes)")
            data = path.read_bytes()
        else:
            data = source
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                                 f"(decompression-bomb guard; raise it with --max-pixels)")
            if max(w, h) > MAX_ASPECT * max(min(w, h), 1):
                raise ImageError(f"{name}: {w}x{h} has an aspect ratio over {MAX_ASPECT}:1; resizing its shorter "
                                 f"side would need {_resized_pixels(w, h):,} pixels (crop it first)")
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img, background)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot decode ({e})") from None
    except MemoryError:
        raise ImageError(f"{name}: out of memory while decoding") from None


def _resized_pixels(w: int, h: int, size: int = IMAGENET_EVAL_RESIZE) -> int:
    short, long = max(min(w, h), 1), max(w, h)
    return size * int(size * long / short)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size``, longer side int(size·long/short), as torchvision's Resize(int)."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop as torchvision: offsets int(round((dim - size) / 2))."""
    w, h = img.size
    if w < size or h < size:  # smaller than the crop: pad with black (zeros), as torchvision's CenterCrop does
        padded = Image.new("RGB", (max(w, size), max(h, size)), (0, 0, 0))
        padded.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = padded, padded.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def transform(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB PIL image -> float32 (3, crop, crop), normalised."""
    img = center_crop(resize_shorter(img, spec.resize), spec.crop)
    arr = np.asarray(img, dtype=np.float32) * np.float32(spec.scale)
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.channel_order == "BGR":
        arr = arr[..., ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Procedural photographs-in-miniature (gradients, shapes, noise) encoded as JPEG.

    They exercise the real decode -> resize -> crop -> normalise path with natural-image statistics
    when no real images are at hand; real ones can always be passed instead.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(200, 480)), int(rng.integers(200, 480))
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3)
        grad = rng.uniform(-0.5, 0.5, (3, 2))
        arr = np.stack([base[c] + grad[c, 0] * xx + grad[c, 1] * yy for c in range(3)], -1)
        arr += rng.normal(0, 12, arr.shape)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 7))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(10, w - x0)), y0 + int(rng.integers(10, h - y0)))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(70, 96)))
        out.append(buf.getvalue())
    return out


def bundled_photos() -> list[Path]:
    """The real photographs shipped with the package (public domain / CC0; see data/photos/SOURCES.md)."""
    from importlib import resources

    folder = Path(str(resources.files("levit_deploy").joinpath("data/photos")))
    return sorted(folder.glob("*.jpg"))


def expand_inputs(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named explicitly, and image files (by suffix) under folders, in sorted order."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        yield Path(root) / name
        else:
            yield p  # a missing or unreadable path becomes an error record downstream
