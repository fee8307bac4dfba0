"""Class names: the 1000 ImageNet-1k names and synset ids shipped with the package, or a user's file."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path


def _packaged_list(name: str) -> tuple[str, ...]:
    """The 1000 lines of a packaged ImageNet-1k list, in class-index order."""
    text = resources.files("levit_deploy").joinpath(f"data/{name}").read_text()
    entries = tuple(line for line in text.splitlines() if line)
    assert len(entries) == 1000, f"packaged {name} is damaged"
    return entries


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """ImageNet-1k class names in index order (short WordNet names, as Keras and PyTorch Hub list them)."""
    return _packaged_list("imagenet_labels.txt")


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """The ImageNet-1k WordNet ids in class-index order (n01440764 is class 0), as dataset folders name them."""
    return _packaged_list("imagenet_synsets.txt")


def load_labels(path: str | Path | None, num_classes: int) -> list[str]:
    """Names for a head of ``num_classes``: a file (one name per line), ImageNet for 1000, else indices."""
    if path is not None:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"{path}: {len(names)} labels for a head with {num_classes} classes")
        return names
    if num_classes == 1000:
        return list(imagenet_labels())
    return [str(i) for i in range(num_classes)]


def unique_labels(names: list[str]) -> list[str]:
    """Names made unique by appending the class index to repeated ones (ImageNet has two 'crane' and two
    'maillot' classes): a classifier that keys its outputs by name must not merge classes."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} ({i})" if counts[name] > 1 else name for i, name in enumerate(names)]
