"""The reference set: the inputs every judgement uses, the original model's fp64 outputs on them, and its floors.

Inputs come in kinds: "photos" (the bundled real photographs), "noise" (seeded N(0,1) tensors), "synthetic"
(procedural JPEGs) and "user images". The floor of a precision is how far the original model itself lands
from fp64 when evaluated in that precision: F draws, the plain evaluation and evaluations with every weight
and buffer perturbed by a random relative amount of the precision's unit roundoff (how much folding or
another converter's rounding may move them). ``parity.py`` holds the rules that judge a candidate by them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .families import spec_for_model
from .preprocess import (IMAGENET_EVAL, ImageError, PreprocessSpec, bundled_photos, decode_image, expand_inputs,
                         synthetic_jpegs, transform)

FLOOR_DRAWS = 5  # the plain evaluation plus four perturbed ones
EXTRA_DRAWS = 27  # the second look: an input that fails on the five-draw floor is judged on 32 draws
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_KINDS = ("photos", "synthetic", "user images")  # decoded images; noise is the other kind


def random_inputs(n: int = 16, seed: int = 0, size: int = 224) -> np.ndarray:
    """Seeded N(0, 1) tensors: the range of ImageNet-normalised pixels, but nothing like a photo."""
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


class _Captured(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


@torch.no_grad()
def run_module(module: torch.nn.Module, inputs: np.ndarray, batch: int = 16, dtype: torch.dtype = torch.float32,
               autocast: torch.dtype | None = None, at: str | None = None) -> np.ndarray:
    """float64 outputs of ``module`` on ``inputs``, fed in ``dtype``, optionally under CPU autocast. ``at``: the
    input of that submodule instead (what the modules before it computed), flattened per input to (N, D)."""
    outs = []
    for i in range(0, len(inputs), batch):
        x = torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch])).to(dtype)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            outs.append(_forward(module, x, at).double().numpy())
    return np.concatenate(outs)


def _forward(module: torch.nn.Module, x: torch.Tensor, at: str | None) -> torch.Tensor:
    if at is None:
        return module(x)
    seen: list[torch.Tensor] = []

    def capture(_, args):
        seen.append(args[0].detach().flatten(1))
        raise _Captured

    handle = module.get_submodule(at).register_forward_pre_hook(capture)
    try:
        module(x)
    except _Captured:
        return seen[0]
    finally:
        handle.remove()
    raise ValueError(f"the forward never reached {at!r}")


def reference_outputs(model: torch.nn.Module, inputs: np.ndarray, batch: int = 16, at: str | None = None
                      ) -> np.ndarray:
    """Outputs of a copy of ``model`` in float64 on the CPU: the ground truth for every comparison (``at``: the
    input of that submodule, see run_module)."""
    ref = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    return run_module(ref, inputs, batch, dtype=torch.float64, at=at)


@torch.no_grad()
def floor_draws(model: torch.nn.Module, inputs: np.ndarray, precision: str, draws: int = FLOOR_DRAWS,
                seed: int = 0, at: str | None = None) -> np.ndarray:
    """[draws, N, classes]: the unfused model evaluated in ``precision`` as it could equally have been (``at``:
    the input of that submodule instead, see run_module).

    Draw 0 is the plain evaluation; the others perturb every floating-point weight and buffer by a
    seeded random relative amount of at most the precision's unit roundoff, which is how much folding
    or another converter's rounding may move them.
    """
    base = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    auto = AUTOCAST.get(precision)
    u = UNIT_ROUNDOFF[precision]
    out = [run_module(base, inputs, autocast=auto, at=at)]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(draws - 1):
        m = copy.deepcopy(base)
        for t in [*m.parameters(), *m.buffers()]:
            if t.is_floating_point():
                t.mul_(1 + (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(t.dtype) * u)
        out.append(run_module(m, inputs, autocast=auto, at=at))
    return np.stack(out)


@dataclass
class ReferenceSet:
    """Parity inputs with their fp64 outputs, built once and shared by every check of one model.

    ``kinds[i]`` is "photos" (the bundled real photographs), "noise", "synthetic" (procedural JPEGs) or
    "user images"; ``names[i]`` identifies the input. Floors are computed on first use per precision.
    """

    inputs: np.ndarray
    names: list[str]
    kinds: list[str]
    outputs: np.ndarray
    model: torch.nn.Module | None = None
    _floors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _widened: dict[str, set[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_inputs(cls, model: torch.nn.Module, inputs: np.ndarray, names: Sequence[str],
                    kinds: Sequence[str]) -> "ReferenceSet":
        if not (len(inputs) == len(names) == len(kinds)):
            raise ValueError("inputs, names and kinds must have the same length")
        return cls(np.ascontiguousarray(inputs, dtype=np.float32), list(names), list(kinds),
                   reference_outputs(model, inputs), model)

    def __len__(self) -> int:
        return len(self.inputs)

    def floors(self, precision: str) -> np.ndarray:
        """The floor draws for ``precision`` ([draws, N, classes]); needs the model the set was built from."""
        if precision not in self._floors:
            if self.model is None:
                raise ValueError("this reference set has no model to compute floors from")
            self._floors[precision] = floor_draws(self.model, self.inputs, precision)
        return self._floors[precision]

    def widen_floors(self, precision: str, index: Sequence[int]) -> list[int]:
        """The second look: EXTRA_DRAWS more floor draws for the inputs in ``index`` (each input once per
        precision; the other inputs repeat their plain draw, which changes none of their statistics).
        Returns the inputs newly widened."""
        done = self._widened.setdefault(precision, set())
        new = sorted(set(int(i) for i in index) - done)
        if not new or self.model is None:
            return []
        floors = self.floors(precision)
        if len(floors) == FLOOR_DRAWS:
            floors = np.concatenate([floors, np.repeat(floors[:1], EXTRA_DRAWS, axis=0)])
        extra = floor_draws(self.model, self.inputs[new], precision, draws=EXTRA_DRAWS + 1, seed=1)[1:]
        floors[FLOOR_DRAWS:, new] = extra
        self._floors[precision] = floors
        done.update(new)
        return new

    def subset(self, index: Sequence[int] | slice) -> "ReferenceSet":
        idx = np.arange(len(self))[index]
        position = {int(i): j for j, i in enumerate(idx)}
        return ReferenceSet(self.inputs[idx], [self.names[i] for i in idx], [self.kinds[i] for i in idx],
                            self.outputs[idx], self.model, {p: f[:, idx] for p, f in self._floors.items()},
                            {p: {position[i] for i in w if i in position} for p, w in self._widened.items()})

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for k in self.kinds:
            counts[k] = counts.get(k, 0) + 1
        return " + ".join(f"{n} {k}" for k, n in counts.items())


def parity_inputs(spec: PreprocessSpec | None = None, photos: bool = True, noise: int = 4, synthetic: int = 4,
                  images: Iterable[str | Path] = (), seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """(inputs, names, kinds) for a reference set, every image decoded with ``spec``.

    Kinds: "photos" (the bundled real photographs), "noise" (seeded N(0,1) tensors), "synthetic"
    (procedural JPEGs) and "user images" (every image file under ``images``; a bad file is an error).
    """
    spec = spec or IMAGENET_EVAL
    arrays, names, kinds = [], [], []
    if photos:
        for p in bundled_photos():
            arrays.append(transform(decode_image(p), spec))
            names.append(p.name)
            kinds.append("photos")
    if noise:
        arrays.extend(random_inputs(noise, seed, spec.crop))
        names += [f"noise {i}" for i in range(noise)]
        kinds += ["noise"] * noise
    for i, data in enumerate(synthetic_jpegs(synthetic, seed) if synthetic else []):
        arrays.append(transform(decode_image(data), spec))
        names.append(f"synthetic {i}")
        kinds.append("synthetic")
    user = list(expand_inputs(images))
    for p in user:
        arrays.append(transform(decode_image(p), spec))
        names.append(str(p))
        kinds.append("user images")
    if images and not user:
        raise ImageError(f"{', '.join(map(str, images))}: no images found")
    if not arrays:
        raise ValueError("no parity inputs: enable photos, noise, synthetic images or pass images")
    return np.stack(arrays).astype(np.float32), names, kinds


def build_reference_set(model: torch.nn.Module, spec=None, images=(), photos: bool = True, noise: int = 4,
                        synthetic: int = 4, seed: int = 0) -> ReferenceSet:
    """The default reference set of a model: the bundled photos, noise and synthetic JPEGs decoded with
    ``spec`` (the checkpoint's own eval transform), plus every image under ``images``."""
    inputs, names, kinds = parity_inputs(spec or spec_for_model(model), photos, noise, synthetic, images, seed)
    return ReferenceSet.from_inputs(model, inputs, names, kinds)
