"""Accuracy on a labelled image set: top-1 / top-5 of models and artifacts, each beside its reference.

A dataset is a folder of class folders (torchvision's ImageFolder layout) named by ImageNet synset
(``n01440764/…``) or by class index (``0/…``), or a CSV of ``path,label`` rows (label: a synset or a
class index; paths relative to the CSV). Labels are ImageNet-1k indices, never "the position of the
folder in sorted order": a folder holding 10 of the 1000 classes must not relabel them 0-9.

Several models share one pass over the images: each image is decoded once and transformed once per
distinct eval transform. Every contender is shown beside its *reference*: the checkpoint it came from,
run unfused in PyTorch fp32 (an artifact's is rebuilt from its manifest), so "how many predictions
differ" is the deployment's cost, separate from the checkpoint's own accuracy.
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .artifacts import is_artifact
from .backends import open_artifact, open_runtime
from .checkpoints import resolve
from .families import spec_for_model
from .labels import imagenet_synsets
from .preprocess import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageError, PreprocessSpec, decode_image, transform


class DatasetError(ValueError):
    """A dataset that cannot be read: the message names the file or folder and what was expected."""


def class_index(label: str, where: str) -> int:
    """An ImageNet synset or a non-negative class index as the class index; DatasetError otherwise."""
    label = label.strip()
    if label.isdigit():
        return int(label)
    if label not in imagenet_synsets():
        raise DatasetError(f"{where}: label {label!r} is neither an ImageNet-1k synset (like n01440764) nor a "
                           f"class index")
    return imagenet_synsets().index(label)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def read_dataset(data: str | Path, limit: int | None = None) -> list[Sample]:
    """The labelled images of an ImageFolder-style folder or a ``path,label`` CSV, in a stable order."""
    data = Path(data)
    if not data.exists():
        raise DatasetError(f"{data}: no such file or folder")
    if data.is_file():
        samples = _read_csv(data)
    else:
        samples = _read_folders(data)
    if not samples:
        raise DatasetError(f"{data}: no labelled images found (expected class folders such as n01440764/ "
                           f"holding images, or a CSV of path,label)")
    return samples[:limit] if limit else samples


def _read_folders(root: Path) -> list[Sample]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root}: no class folders (expected the ImageFolder layout: {root}/n01440764/x.jpg)")
    samples = []
    for folder in folders:
        label = class_index(folder.name, str(folder))
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        samples += [Sample(f, label) for f in files]
    return samples


def _read_csv(path: Path) -> list[Sample]:
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: not a readable CSV of path,label ({e})") from None
    samples = []
    for n, row in enumerate(rows, 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DatasetError(f"{path}:{n}: expected path,label, got {','.join(row)!r}")
        if n == 1 and row[1].strip().lower() in ("label", "class", "target"):
            continue  # a header
        file = Path(row[0].strip())
        samples.append(Sample(file if file.is_absolute() else path.parent / file, class_index(row[1], f"{path}:{n}")))
    return samples


@dataclass
class Contender:
    """One model or artifact under evaluation: how to run it and which reference it is compared with."""

    name: str
    runtime: object  # a Runtime
    spec: PreprocessSpec
    reference: str  # key into the references
    precision: str


@dataclass
class ValResult:
    name: str
    runtime: str
    precision: str
    n: int
    top1: float
    top5: float
    reference_top1: float
    reference_top5: float
    differ: int  # images whose top-1 differs from the reference's
    is_reference: bool


@dataclass
class ValReport:
    dataset: str
    images: int  # labelled images found (after --limit)
    evaluated: int  # decoded and evaluated
    failed: list[dict] = field(default_factory=list)  # {"path", "error"}
    results: list[ValResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Scores:
    """Running top-1 / top-5 hits and the top-1 predictions of one model."""

    def __init__(self):
        self.top1 = self.top5 = 0
        self.pred: list[int] = []

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        self.top1 += int((top5[:, 0] == labels).sum())
        self.top5 += int((top5 == labels[:, None]).any(1).sum())
        self.pred += top5[:, 0].tolist()


def evaluate(samples: Sequence[Sample], contenders: Sequence[Contender], references: dict[str, Contender],
             batch: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS, dataset: str = "",
             progress: Callable[[int, int], None] | None = None) -> ValReport:
    """One pass over ``samples``: each image decoded once, transformed once per distinct eval transform,
    and run through every contender and every reference. A bad image is counted and listed, not fatal."""
    runs = list({id(c): c for c in [*references.values(), *contenders]}.values())  # a checkpoint is its own reference
    specs = list(dict.fromkeys(c.spec for c in runs))
    scores = {id(run): _Scores() for run in runs}
    report = ValReport(dataset, len(samples), 0)
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        arrays: dict[PreprocessSpec, list[np.ndarray]] = {s: [] for s in specs}
        labels = []
        for sample in chunk:
            try:
                img = decode_image(sample.path, max_pixels)
            except ImageError as e:
                report.failed.append({"path": str(sample.path), "error": str(e)})
                continue
            for s in specs:
                arrays[s].append(transform(img, s))
            labels.append(sample.label)
        if labels:
            y = np.asarray(labels)
            for run in runs:
                scores[id(run)].add(run.runtime.infer(np.stack(arrays[run.spec])), y)
            report.evaluated += len(labels)
        if progress:
            progress(min(start + batch, len(samples)), len(samples))
    n = max(report.evaluated, 1)
    for c in contenders:
        reference = references[c.reference]
        own, ref = scores[id(c)], scores[id(reference)]
        differ = int(np.sum(np.asarray(own.pred) != np.asarray(ref.pred)))
        report.results.append(ValResult(
            c.name, getattr(c.runtime, "name", "?"), c.precision, report.evaluated, own.top1 / n, own.top5 / n,
            ref.top1 / n, ref.top5 / n, differ, is_reference=c is reference))
    return report


def contenders_for(models: Sequence[str], init: str = "pretrained", threads: int | None = None
                   ) -> tuple[list[Contender], dict[str, Contender]]:
    """A Contender per model name, checkpoint or artifact folder, and the references they share.

    A checkpoint (or variant name) is its own reference: its model in PyTorch fp32. An artifact runs in
    its runtime and its reference is its source checkpoint, rebuilt once however many artifacts share it.
    """
    references: dict[str, Contender] = {}
    contenders = []

    def reference_for(key: str, build) -> None:
        if key not in references:
            model = build()
            references[key] = Contender(f"{model.config.name} checkpoint ({key})", open_runtime(model, threads=threads),
                                        spec_for_model(model), key, "fp32")

    for name in models:
        if is_artifact(name):
            open_artifact(name)  # the format check (before the reference is loaded)
        target = resolve(name, init=init)
        key = target.source_key()
        reference_for(key, target.model)
        if target.artifact is None:
            contenders.append(references[key])
            continue
        manifest, precision = target.manifest, target.manifest["export"]["precision"]
        contenders.append(Contender(
            f"{manifest['model']['variant']} {manifest['artifact']['format']} {precision} ({target.artifact})",
            open_runtime(target.artifact, threads=threads), PreprocessSpec.from_dict(manifest["preprocessing"]), key,
            precision))
    return contenders, references
