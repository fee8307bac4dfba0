"""Fusion on trained-like checkpoints: every step within the parity rule, and every plausible bug caught."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import trained_like_model, trained_like_reference
from levit_deploy import fuse
from levit_deploy.fuse import FusionError, fuse_checked
from levit_deploy.families import get_family
from levit_deploy.families.levit import model as levit_mod
from levit_deploy.parity import compare
from levit_deploy.reference import ReferenceSet, build_reference_set
from trained_like import smooth_images
from variants import LEVIT


@pytest.mark.parametrize("name", LEVIT)
def test_every_step_passes_the_rule_on_a_trained_like_checkpoint(name):
    model, reference = trained_like_model(name), trained_like_reference(name)
    result = fuse_checked(model, reference)
    assert [r.stage for r in result.reports][-1] == "DeployLevit" and len(result.reports) == 5
    assert all(r.passed for r in result.reports), [r.summary() for r in result.reports]
    unfused = compare(reference, model, "fp32")
    # the inputs really are ill-conditioned for this checkpoint: the old absolute 1e-4·s gate rejected it
    assert unfused.passed and unfused.max_e_over_s > 1e-4
    fused = compare(reference, result.model, "fp32")
    assert fused.passed


def test_deploy_model_is_clean(model_128s):
    deploy = fuse(model_128s)  # the public API: checked against the default reference set
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
    assert all(torch.is_floating_point(t) for t in list(deploy.parameters()) + list(deploy.buffers()))
    biases = [b for n, b in deploy.named_buffers() if n.endswith("attention_bias")]
    assert [tuple(b.shape) for b in biases][:3] == [(4, 196, 196), (4, 196, 196), (8, 49, 196)]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(deploy(x), deploy(x))  # deterministic


def test_traces_cleanly(model_128s, reference_128s):
    deploy = fuse_checked(model_128s, reference_128s).model
    x = torch.from_numpy(reference_128s.inputs[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(deploy, x)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(deploy, (x,), dynamic_shapes={"x": {0: batch}})
    photos = torch.from_numpy(reference_128s.inputs[:5])
    with torch.no_grad():
        assert torch.allclose(traced(x), deploy(x), atol=1e-4)
        assert torch.allclose(exported.module()(photos), deploy(photos), atol=1e-4)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t or "index" in t for t in targets), targets


def _bug_variance_not_std(bn):
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


_real_fuse = levit_mod.Attention.fuse


def _patched_fuse(corrupt):
    def corrupted_fuse(self):
        deploy = _real_fuse(self)
        with torch.no_grad():
            corrupt(deploy)
        return deploy
    return corrupted_fuse


def _unscale(deploy):
    hd = deploy.num_heads * deploy.key_dim
    deploy.qkv.weight[:hd] /= deploy.key_dim ** -0.5
    deploy.qkv.bias[:hd] /= deploy.key_dim ** -0.5


def test_clean_fusion_passes_with_room_to_spare(model_128s, reference_128s):
    """The control for the bug tests below: without a bug every step stays far inside its bounds."""
    reports = fuse_checked(model_128s, reference_128s).reports
    assert all(r.passed and r.worst_margin < 0.7 for r in reports)
    assert sum(k.decided_by_tolerance for k in reports[-1].kinds) >= 3  # well-conditioned inputs exist


@pytest.mark.parametrize("bug", ["variance instead of std", "swapped bias table", "missing scale", "one head dropped"])
def test_parity_gate_catches_fusion_bugs(model_128s, reference_128s, monkeypatch, bug):
    if bug == "variance instead of std":
        monkeypatch.setattr(levit_mod, "bn_scale_shift", _bug_variance_not_std)
    elif bug == "swapped bias table":
        monkeypatch.setattr(levit_mod.Attention, "fuse",
                            _patched_fuse(lambda d: d.attention_bias.copy_(d.attention_bias.flip(0))))
    elif bug == "missing scale":
        monkeypatch.setattr(levit_mod.Attention, "fuse", _patched_fuse(_unscale))
    else:
        def drop_dist(model):
            model.head_dist = None
            model.head = model.head.fuse()
            return 1
        levit = get_family("levit")
        monkeypatch.setattr(levit, "steps", levit.steps[:-1] + [("merge heads", drop_dist)])
    with pytest.raises(FusionError) as e:
        fuse_checked(model_128s, reference_128s)
    report = e.value.report
    assert not report.passed and report.failures
    # caught on the well-conditioned inputs, where the tolerance (not the floor) bounds the error
    assert any(not p["passed"] and p["decided_by"] == "tolerance" for p in report.per_input)


@pytest.mark.parametrize("factor,caught", [(1 + 1e-6, False), (1.001, True), (1.01, True)])
def test_a_scaled_weight_is_caught_and_rounding_noise_is_not(model_128s, reference_128s, factor, caught):
    deploy = fuse_checked(model_128s, reference_128s).model
    qkv = [p for n, p in deploy.named_parameters() if n.endswith("qkv.weight")]
    with torch.no_grad():
        qkv[len(qkv) // 2].mul_(factor)  # one mid-network weight tensor
    assert compare(reference_128s, deploy, "fp32").passed is not caught


@pytest.mark.slow
def test_a_gate_without_well_conditioned_inputs_says_so_and_user_images_fix_it():
    """LeViT-384 calibrated on smooth images: every default input is ill-conditioned for it, so the
    report says the gate is weak; images like its calibration data (--images) make it strict again."""
    model = trained_like_model("levit_384", seed=3)
    default = build_reference_set(model, noise=2, synthetic=2)
    clean = compare(default, model, "fp32")
    assert clean.weak and "no input had a small floor" in clean.notes[0]
    smooth = smooth_images(4, seed=77).numpy()
    user = ReferenceSet.from_inputs(model, np.concatenate([default.inputs, smooth]),
                                    default.names + [f"smooth {i}" for i in range(4)],
                                    default.kinds + ["user images"] * 4)
    deploy = fuse_checked(model, check=False).model
    strict = compare(user, deploy, "fp32")
    assert strict.passed and not strict.weak
    bad = copy.deepcopy(deploy)
    with torch.no_grad():
        bad.head.linear.weight.mul_(1.001)
    assert compare(default, bad, "fp32").passed  # invisible to the weak gate
    caught = compare(user, bad, "fp32")
    assert not caught.passed and all(f.startswith("smooth") for f in caught.failures)
