"""How sure a timing is: a bootstrap interval for the median, and a permutation test between two runs.

Users cannot act on "1234 img/s" alone: they need to know how far the figure could move on a rerun and
whether two runs differ. The unit of the test is the *round* (a few calls of one case, interleaved with
the other cases), not the call: calls within a round share the machine's state, rounds are the
independent repeats. Run-to-run drift on one machine (frequency, cache, neighbours) exceeds what
the rounds of a single run show, so a difference also has to exceed ``min_effect`` to be called
significant, as pyperf's ``--min-speed`` does. Measured on a 2-core AMD EPYC VM: 11 reruns of one ONNX
Runtime case (3 s each, 6-7 rounds) came out at 0.93-1.01x the first run, and 3 of them passed p < 0.05;
two threads instead of one at 1.46-1.84x.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 2000
ALPHA = 0.05
MIN_EFFECT = 0.10  # relative difference of medians below which two runs are "not significantly different"


def median_interval(times, confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
                    ) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``times`` (same unit as ``times``)."""
    t = np.asarray(times, dtype=float)
    if t.size < 2:
        return float(t[0]), float(t[0])
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(t, size=(resamples, t.size), replace=True), axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(medians, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass
class Comparison:
    """A case against the same case of an earlier run; ``ratio`` > 1 means faster now."""

    ratio: float  # baseline median round time / current median round time
    p_value: float
    significant: bool
    verdict: str  # "significantly faster", "significantly slower", "not significantly different"
    baseline_images_per_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def compare_rounds(baseline, current, resamples: int = RESAMPLES, alpha: float = ALPHA,
                   min_effect: float = MIN_EFFECT, seed: int = 0) -> Comparison:
    """Two-sided permutation test on the log ratio of median round times of two runs of one case."""
    a, b = np.asarray(baseline, dtype=float), np.asarray(current, dtype=float)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"too few rounds to compare ({a.size} and {b.size}; at least 2 each)")
    observed = np.log(np.median(a) / np.median(b))
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((resamples, pooled.size)), axis=1)
    shuffled = pooled[order]
    stats = np.log(np.median(shuffled[:, :a.size], axis=1) / np.median(shuffled[:, a.size:], axis=1))
    p_value = float((1 + np.count_nonzero(np.abs(stats) >= abs(observed) - 1e-12)) / (1 + resamples))
    ratio = float(np.exp(observed))
    significant = p_value < alpha and abs(ratio - 1) >= min_effect
    verdict = ("not significantly different" if not significant
               else "significantly faster" if ratio > 1 else "significantly slower")
    return Comparison(ratio, p_value, significant, verdict)
