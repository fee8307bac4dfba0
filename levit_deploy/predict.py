"""Images in, top-k classes out, through any runtime, robust to bad files.

Inputs stream in batches (memory stays bounded by the batch size); a file that cannot be decoded
becomes an error record and the others carry on. Without an artifact, the model is exported once
into the cache (with the parity gate) and reused on later runs.
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np

from .artifacts import is_artifact, read_manifest
from .backends import by_runtime, default_runtime, open_runtime
from .checkpoints import load
from .export import cached_export
from .labels import load_labels
from .families import family_of, get_family, spec_for_model
from .fuse import fuse_checked
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, PreprocessSpec, decode_image, transform
from .reference import build_reference_set


@dataclass
class Prediction:
    path: str
    ok: bool
    topk: list[dict] = field(default_factory=list)  # [{"rank", "index", "label", "prob"}]
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    """A runtime plus the preprocessing and labels that belong to it."""

    def __init__(self, model: str = "levit_128s", weights=None, init: str = "pretrained", runtime: str | None = None,
                 threads: int | None = None, labels: str | Path | None = None, preprocess: str | None = None,
                 device: str = "cpu", images=(), entry: str | None = None):
        """``runtime``: any runtime of the registry (default: the first installed one with an exporter);
        ``preprocess``: one of the model family's named eval transforms, instead of the checkpoint's own;
        ``images``: a folder of the user's photos added to the parity inputs of the first export."""
        path = Path(model)
        if is_artifact(path):
            manifest, _ = read_manifest(path)
            self.runtime = open_runtime(path, runtime, device, threads)
            spec = PreprocessSpec.from_dict(manifest["preprocessing"])
            family = get_family(manifest["model"]["family"])
            num_classes = manifest["model"]["num_classes"]
            self.description = f"{manifest['model']['variant']} artifact {path}"
        else:
            ref = load(model, weights=weights, init=init, entry=entry)
            spec, family = spec_for_model(ref), family_of(ref)
            num_classes = ref.config.num_classes
            runtime = runtime or default_runtime()
            backend = by_runtime(runtime)
            if backend.write is None:  # a module runtime: fuse and run without exporting
                deploy = fuse_checked(ref, build_reference_set(ref, spec, images=images)).model
                self.runtime = open_runtime(deploy, runtime, device, threads)
            else:
                folder = cached_export(ref, backend.name, images=images)
                self.runtime = open_runtime(folder, runtime, device, threads)
            self.description = f"{ref.config.name} ({ref.load_info.source}) on {runtime}"
        if preprocess is not None and preprocess not in family.specs:
            raise ValueError(f"--preprocess {preprocess!r} is not a {family.name} transform; choose one of "
                             f"{', '.join(family.specs)}")
        self.spec = family.specs[preprocess] if preprocess else spec
        self.labels = load_labels(labels, num_classes)

    def close(self) -> None:
        self.runtime.close()

    def predict(self, paths: Iterable[str | Path], topk: int = 5, batch: int = 32,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Prediction]:
        """Yield one Prediction per input, in order, decoding and inferring ``batch`` images at a time."""
        pending: list[tuple[str, np.ndarray | None, str | None]] = []
        for p in paths:
            pending.append(self.prepare(str(p), p, max_pixels))
            if sum(x is not None for _, x, _ in pending) >= batch:
                yield from self.classify(pending, topk)
                pending = []
        yield from self.classify(pending, topk)

    def predict_items(self, items: Iterable[tuple[str, str | Path | bytes]], topk: int = 5,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Prediction]:
        """One Prediction per (name, path or encoded bytes), inferred as one batch: what Ray's workers and the
        serving replicas call, with the images' bytes already read."""
        return list(self.classify([self.prepare(name, source, max_pixels) for name, source in items], topk))

    def prepare(self, name: str, source, max_pixels: int) -> tuple[str, np.ndarray | None, str | None]:
        """(name, the model's input, None) or (name, None, why it cannot be decoded): whatever goes wrong with one
        image (a decoder's own exception, memory) is that image's error, never the run's end."""
        try:
            return name, transform(decode_image(source, max_pixels, self.spec.background), self.spec), None
        except ImageError as e:
            return name, None, str(e).replace("<bytes>", name, 1)
        except MemoryError:
            return name, None, f"{name}: out of memory while preparing this image"
        except Exception as e:  # noqa: BLE001 - a decoder plugin's own error, unknown in kind: one image's record
            return name, None, f"{name}: cannot decode ({type(e).__name__}: {str(e)[:200]})"

    def classify(self, pending, topk: int) -> Iterator[Prediction]:
        """Predictions for prepared items (``prepare``'s tuples), the decodable ones inferred as one batch."""
        good = [x for _, x, _ in pending if x is not None]
        probs = iter(softmax(self.runtime.infer(np.stack(good))) if good else [])
        k = min(topk, len(self.labels))
        for path, x, error in pending:
            if x is None:
                yield Prediction(path, False, error=error)
                continue
            p = next(probs)
            if not np.all(np.isfinite(p)):
                yield Prediction(path, False, error=f"{path}: the model's output is not finite (NaN or inf); the "
                                                    f"artifact or its preprocessing is broken")
                continue
            order = np.argsort(-p)[:k]
            yield Prediction(path, True, [{"rank": r + 1, "index": int(c), "label": self.labels[c],
                                           "prob": float(p[c])} for r, c in enumerate(order)])


def artifact_folder(model: str, weights=None, init: str = "pretrained", runtime: str | None = None, images=(),
                    entry: str | None = None) -> Path:
    """``model`` if it is an artifact folder, else the checkpoint exported once into the cache for ``runtime``
    (parity-gated): what Ray's workers and serving replicas open."""
    if is_artifact(Path(model)):
        return Path(model)
    ref = load(model, weights=weights, init=init, entry=entry)
    backend = by_runtime(runtime or default_runtime())
    if backend.write is None:
        raise ValueError(f"the {backend.runtime} runtime runs a module in this process; for Ray pick a runtime that "
                         f"has an exporter, or pass an artifact folder")
    return cached_export(ref, backend.name, images=images)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64; a row with a non-finite logit comes out non-finite (the caller reports it)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def write_csv(predictions: Iterable[Prediction], out: TextIO, topk: int) -> Iterator[Prediction]:
    """Yield ``predictions`` unchanged, writing each as one row of ``out`` as it passes (a header first), so that
    the file fills while the run streams and keeps every finished row if the run stops. Columns: path, status,
    label1, prob1 ... label<topk>, prob<topk> (blank past an image's classes), error. ``out`` is opened by the
    caller, before the model loads: an unwritable path is refused before any work."""
    writer = csv.writer(out)
    writer.writerow(["path", "status", *[f"{f}{r}" for r in range(1, topk + 1) for f in ("label", "prob")], "error"])
    for pred in predictions:
        cells = [c for t in pred.topk for c in (t["label"], f"{t['prob']:.6f}")]
        writer.writerow([pred.path, "ok" if pred.ok else "error", *cells, *[""] * (2 * topk - len(cells)),
                         pred.error or ""])
        yield pred
