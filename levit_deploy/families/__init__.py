"""The model-family registry: the one place that knows which families exist.

Each family is one folder here whose ``__init__`` defines ``FAMILY`` (a :class:`~.base.Family`).
Adding a family is that folder plus one entry in ``MODULES``.
"""
from __future__ import annotations

from torch import nn

from ..env import Registry
from ..preprocess import PreprocessSpec
from .base import CheckpointMismatch, Detection, Family, NotRecognised

MODULES = ("levit", "lightvit", "litv2")
REGISTRY: Registry[Family] = Registry(__name__, MODULES, "FAMILY", "model family")


def families() -> dict[str, Family]:
    """name -> family, in registry order."""
    return REGISTRY.all()


def get_family(name: str) -> Family:
    return REGISTRY.get(name)


def resolve_variant(name: str) -> tuple[Family, str] | None:
    """(family, canonical variant) for a user-typed variant name, or None."""
    for family in families().values():
        variant = family.resolve(name)
        if variant is not None:
            return family, variant
    return None


def all_variants() -> list[str]:
    return [v for f in families().values() for v in f.variants]


def family_of(model: nn.Module) -> Family:
    """The family of a reference or deploy model (by its config)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "family", None) not in families():
        raise TypeError(f"{type(model).__name__} is not a model of a known family ({', '.join(families())})")
    return families()[config.family]


def spec_for_model(model: nn.Module) -> PreprocessSpec:
    """The eval transform a loaded model's checkpoint was evaluated with (from ``model.load_info``)."""
    info = getattr(model, "load_info", None)
    return family_of(model).spec_for_layout(info.layout if info else "none")


def detect(sd: dict) -> tuple[Family, Detection]:
    """The family and detection for a state dict; raises the closest family's explanation if none fits."""
    misses: list[NotRecognised] = []
    for family in families().values():
        try:
            return family, family.detect(sd)
        except NotRecognised as e:
            misses.append(e)
    best = max(misses, key=lambda e: e.closeness)
    sample = ", ".join(list(sd)[:4])
    if best.closeness > 0:
        raise NotRecognised(str(best), best.closeness)
    raise NotRecognised(f"no model family recognises these keys (first keys: {sample}); expected "
                        + "; ".join(str(e) for e in misses))


__all__ = ["Family", "Detection", "NotRecognised", "CheckpointMismatch", "families", "get_family", "resolve_variant", "all_variants",
           "family_of", "spec_for_model", "detect"]
