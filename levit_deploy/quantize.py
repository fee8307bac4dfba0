"""int8 with a remedy: which layers hurt, and the fewest kept in float that let the artifact pass its gate.

Backend-neutral. A *recipe* names the deployed model's layers (module paths, e.g. ``stages.4.q``) that stay in
float; every int8 backend translates it into its own terms (ONNX Runtime ``nodes_to_exclude``, NNCF
``ignored_scope``, an XNNPACK quantizer filter) and reports, by the same module paths, which layers it quantized.

*Sensitivity* of a layer is measured in PyTorch on the calibration images: the output's 1 − cosine to the float
model when that layer alone is quantized the way the int8 backends quantize it (int8 symmetric per-output-channel
weights, its input activation uint8 per-tensor with the MinMax range seen on the calibration images). It ranks
the layers; the gate decides. When a plain int8 artifact fails, :func:`fit_to_gate` keeps the most sensitive
layers in float in growing steps (1, 2, 4, … layers) until the gate passes or the cap (default 25 % of the
quantized layers) is reached, bisects between the last failing and the first passing step for the fewest, and says
what it tried. A refused input whose activations leave the calibrated ranges throughout the network is named by
:func:`outside_calibration`: its remedy is calibration images like it, not layers in float.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

MAX_FLOAT_FRACTION = 0.25
SENSITIVITY_IMAGES = 32  # calibration images the sensitivity is measured on (it ranks; the gate decides)
OUTSIDE_FACTOR = 1.5  # an input whose activations reach this multiple of a calibrated range end leaves it


class RecipeError(ValueError):
    """A recipe that names layers the artifact does not quantize."""


def check_recipe(keep_float, quantized: list[str]) -> None:
    """RecipeError unless every layer of ``keep_float`` is one of the ``quantized`` module paths."""
    unknown = sorted(set(keep_float) - set(quantized))
    if unknown:
        raise RecipeError(f"keep_float names {', '.join(unknown[:3])}, not among the {len(quantized)} quantizable "
                          f"layers ({', '.join(quantized[:4])}, …)")


@dataclass
class QuantOptions:
    """The int8 options every int8 target takes (its options dataclass inherits them)."""

    keep_float: str = field(default="", metadata={"help": "int8: comma-separated layers (module paths of the deployed "
                                                          "model) to keep in float, replaying a recipe; skips the "
                                                          "search"})
    max_float_fraction: float = field(default=MAX_FLOAT_FRACTION, metadata={
        "help": "int8: when the plain int8 artifact fails its gate, keep at most this fraction of the quantized "
                "layers in float while searching for one that passes (0: no search)"})

    def recipe(self) -> tuple[str, ...] | None:
        """The layers a user asked to keep in float, or None to search."""
        names = tuple(n.strip() for n in self.keep_float.split(",") if n.strip())
        return names or None


@dataclass
class Attempt:
    """One int8 artifact tried: the layers it kept in float and whether it passed."""

    keep_float: tuple[str, ...]
    passed: bool
    worst_margin: float
    failed_images: int


@dataclass
class Outcome:
    """What the search found: the attempt that passed (or the last one), every attempt, the scores."""

    result: object  # what ``attempt`` returned for the chosen recipe
    keep_float: tuple[str, ...]
    quantized: list[str]
    attempts: list[Attempt] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    passed: bool = False

    def describe(self) -> dict:
        """What the manifest records: the recipe, the scores and the search."""
        top = sorted(self.scores.items(), key=lambda kv: -kv[1])[:10]
        return {"keep_float": list(self.keep_float), "quantized_layers": len(self.quantized),
                "kept_fraction": round(len(self.keep_float) / max(len(self.quantized), 1), 4),
                "sensitivity": "1 - cos of the output with that layer alone quantized (int8 per-channel weights, "
                               f"uint8 per-tensor MinMax input), mean over up to {SENSITIVITY_IMAGES} calibration "
                               "images spread over the set, ranges from all of them",
                "most_sensitive": {k: float(f"{v:.4g}") for k, v in top},
                "attempts": [a.__dict__ for a in self.attempts]}

    def summary(self) -> str:
        if not self.keep_float:
            return f"all {len(self.quantized)} quantizable layers in int8"
        shown = ", ".join(self.keep_float[:4]) + (", …" if len(self.keep_float) > 4 else "")
        return f"kept {len(self.keep_float)} of {len(self.quantized)} layers in float: {shown}"


def fit_to_gate(attempt: Callable[[tuple[str, ...]], tuple[object, object, list[str]]], model: nn.Module,
                calibration_inputs: np.ndarray, max_fraction: float = MAX_FLOAT_FRACTION,
                progress: Callable[[str], None] = lambda _: None) -> Outcome:
    """Search the fewest layers to keep in float for the gate to pass.

    ``attempt(keep_float)`` writes and gates an artifact and returns (result, report, quantized layer paths).
    The plain artifact first; if it fails, layers ranked by :func:`sensitivity` on the calibration images are kept
    in float in steps of 1, 2, 4, … up to ``max_fraction`` of the quantized layers, then bisected between the last
    failing and the first passing step. Returns the passing attempt with the fewest layers in float, or the last
    attempt.
    """
    result, report, quantized = attempt(())
    outcome = Outcome(result, (), quantized, [_attempt((), report)], passed=report.passed)
    cap = math.floor(max_fraction * len(quantized))
    if report.passed or cap < 1:
        return outcome
    progress(f"int8 failed its gate with every layer quantized; measuring the sensitivity of {len(quantized)} "
             f"layers on {min(len(calibration_inputs), SENSITIVITY_IMAGES)} calibration images …")
    outcome.scores = sensitivity(model, calibration_inputs, quantized)
    ranked = sorted(quantized, key=lambda name: -outcome.scores[name])

    def keep_most_sensitive(k: int) -> bool:
        keep = tuple(ranked[:k])
        progress(f"int8 with the {k} most sensitive layer(s) in float: {', '.join(keep[:3])}{', …' if k > 3 else ''}")
        result, report, _ = attempt(keep)
        outcome.attempts.append(_attempt(keep, report))
        if report.passed or not outcome.passed:  # the last attempt, until one passes; then the smallest passing
            outcome.result, outcome.keep_float, outcome.passed = result, keep, report.passed
        return report.passed

    failing = 0
    for k in _steps(cap):
        if keep_most_sensitive(k):
            break
        failing = k
    else:
        return outcome
    passing = len(outcome.keep_float)
    while passing - failing > 1:  # the first passing step may keep more than needed: bisect down to the fewest
        middle = (passing + failing) // 2
        if keep_most_sensitive(middle):
            passing = middle
        else:
            failing = middle
    return outcome


def _steps(cap: int) -> list[int]:
    """1, 2, 4, … below ``cap``, then ``cap``."""
    steps = [2 ** i for i in range(cap.bit_length()) if 2 ** i < cap]
    return steps + [cap]


def _attempt(keep: tuple[str, ...], report) -> Attempt:
    failed = sum(1 for r in report.per_input if r["gating"] and not r["passed"])
    return Attempt(keep, bool(report.passed), float(report.worst_margin), failed)


@torch.no_grad()
def sensitivity(model: nn.Module, inputs: np.ndarray, layers: list[str], images: int = SENSITIVITY_IMAGES
                ) -> dict[str, float]:
    """layer -> mean 1 − cos of the output to the float model's on ``images`` of ``inputs`` (the calibration images,
    spread over them) when that layer alone is quantized, its input range taken from all of ``inputs`` (as the
    backend took it)."""
    model = model.eval()
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    modules = dict(model.named_modules())
    missing = [name for name in layers if not isinstance(modules.get(name), (nn.Linear, nn.Conv2d))]
    if missing:
        raise ValueError(f"not a Linear or Conv2d layer of the deployed model: {', '.join(missing[:3])}")
    ranges = _input_ranges(model, x, [modules[name] for name in layers])
    x = x[np.linspace(0, len(x) - 1, min(images, len(x))).round().astype(int)]
    reference = model(x).double()
    scores = {}
    for name in layers:
        layer = modules[name]
        if layer not in ranges:  # not on the path these inputs take
            scores[name] = 0.0
            continue
        scores[name] = _quantized_error(model, layer, ranges[layer], x, reference)
    return scores


def _quantized_error(model: nn.Module, layer: nn.Module, input_range: tuple[float, float], x: torch.Tensor,
                     reference: torch.Tensor) -> float:
    """Mean 1 − cos of the model's output to ``reference`` with ``layer`` alone quantized: its input to uint8 over
    ``input_range``, its weight to int8 per output channel."""
    weight = layer.weight.detach().clone()
    lo, hi = input_range
    handle = layer.register_forward_pre_hook(lambda _, args: (_fake_quant_uint8(args[0], lo, hi),))
    layer.weight.copy_(_fake_quant_weight(weight))
    try:
        return float((1 - torch.nn.functional.cosine_similarity(model(x).double(), reference, dim=1)).mean())
    finally:
        handle.remove()
        layer.weight.copy_(weight)


@torch.no_grad()
def outside_calibration(model: nn.Module, calibration_inputs: np.ndarray, inputs: np.ndarray, names: list[str],
                        layers: list[str], shown: int = 3) -> list[str]:
    """Notes for the ``inputs`` (gate inputs an int8 artifact failed) whose activations leave the calibrated ranges:
    at how many quantized layers their input reaches ``OUTSIDE_FACTOR`` × the calibration images' range end, and
    where the most. Clipped there, no few layers kept in float mend them; calibrating on images like them does."""
    modules = dict(model.eval().named_modules())
    chosen = [modules[name] for name in layers if name in modules]
    calibrated = _input_ranges(model, torch.from_numpy(np.ascontiguousarray(calibration_inputs, dtype=np.float32)),
                               chosen)
    found = []
    for x, name in zip(inputs, names):
        seen = _input_ranges(model, torch.from_numpy(np.ascontiguousarray(x[None], dtype=np.float32)), chosen)
        ratios = {path: _beyond(calibrated[modules[path]], seen[modules[path]])
                  for path in layers if modules.get(path) in calibrated and modules.get(path) in seen}
        outside = {path: r for path, r in ratios.items() if r >= OUTSIDE_FACTOR}
        if outside:
            worst = max(outside, key=outside.get)
            found.append((len(outside), f"{name}: its activations leave the calibration images' ranges at "
                                        f"{len(outside)} of {len(ratios)} quantized layers (up to "
                                        f"{outside[worst]:.1f}× at {worst}); clipped there, keeping a few layers in "
                                        f"float cannot mend it: add images like it to --calib"))
    return [note for _, note in sorted(found, key=lambda f: -f[0])[:shown]]


def _beyond(calibrated: tuple[float, float], seen: tuple[float, float]) -> float:
    """How far ``seen`` reaches past ``calibrated``, as a multiple of the calibrated end on that side (1: within)."""
    (lo, hi), (seen_lo, seen_hi) = calibrated, seen
    return max(seen_hi / hi if hi > 0 and seen_hi > hi else 1.0, seen_lo / lo if lo < 0 and seen_lo < lo else 1.0)


def _input_ranges(model: nn.Module, x: torch.Tensor, layers: list[nn.Module], batch: int = 32
                  ) -> dict[nn.Module, tuple[float, float]]:
    """The MinMax range of each layer's input over ``x`` (what a MinMax calibrator records), ``batch`` at a time."""
    ranges: dict[nn.Module, tuple[float, float]] = {}

    def record(layer, args):
        lo, hi = ranges.get(layer, (math.inf, -math.inf))
        ranges[layer] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        for start in range(0, len(x), batch):
            model(x[start:start + batch])
    finally:
        for h in handles:
            h.remove()
    return ranges


def _fake_quant_uint8(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Asymmetric uint8 per-tensor quantize-dequantize with the range [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(t / scale) + zero, 0, 255) - zero) * scale


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per-output-channel quantize-dequantize."""
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(1).clamp_min(1e-12) / 127
    q = torch.clamp(torch.round(flat / scale[:, None]), -127, 127) * scale[:, None]
    return q.reshape(w.shape)
