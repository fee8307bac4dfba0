"""The comparison statistics and the per-precision gates, on hand-made logits."""
import numpy as np
import pytest

from levit_deploy.parity import compare_outputs


def logits(n=8, k=10, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)) * 5


def test_identical_outputs_pass_with_zero_error():
    ref = logits()
    r = compare_outputs(ref, ref.copy(), "fp32")
    assert r.passed and r.max_abs == 0 and r.top1_agreement == 1 and r.top5_overlap == 1
    assert r.min_cosine == pytest.approx(1.0)


def test_fp32_bound_is_relative_to_reference_scale():
    ref = logits()
    s = np.abs(ref).max()
    ok = ref + 0.9e-4 * s
    bad = ref.copy()
    bad[3, 4] += 1.1e-4 * s
    assert compare_outputs(ref, ok, "fp32").passed
    r = compare_outputs(ref, bad, "fp32")
    assert not r.passed and r.min_rel_tolerance == pytest.approx(1.1e-4, rel=1e-6)
    assert r.max_abs == pytest.approx(1.1e-4 * s) and r.mean_abs == pytest.approx(1.1e-4 * s / ref.size)


def test_fp16_allows_small_error_and_flips_on_tiny_margins_only():
    ref = np.array([[10.0, 0.0, -1.0], [5.0, 4.99, -5.0]])
    assert compare_outputs(ref, ref + 0.01, "fp16").passed
    flipped = ref.copy()
    flipped[1] = [4.98, 5.0, -5.0]  # margin 0.01: a flip within the fp16 bound
    r = compare_outputs(ref, flipped, "fp16")
    assert r.passed and r.top1_agreement == 0.5
    assert not compare_outputs(ref, flipped, "fp32").passed
    assert not compare_outputs(ref, ref * 0.95, "fp16").passed  # 2e-2·s exceeded


def test_int8_uses_cosine_and_top1_rate():
    ref = logits(40)
    rng = np.random.default_rng(1)
    assert compare_outputs(ref, ref + rng.normal(0, 0.1, ref.shape), "int8").passed
    r = compare_outputs(ref, rng.permutation(ref, axis=1), "int8")
    assert not r.passed and any("cosine" in f for f in r.failures)


def test_nan_fails_and_shape_mismatch_raises():
    ref = logits()
    bad = ref.copy()
    bad[0, 0] = np.nan
    r = compare_outputs(ref, bad, "fp32")
    assert not r.passed and "non-finite" in r.failures[0]
    with pytest.raises(ValueError, match="shape"):
        compare_outputs(ref, ref[:, :5], "fp32")
    with pytest.raises(ValueError, match="precision"):
        compare_outputs(ref, ref, "fp8")
