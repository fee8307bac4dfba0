"""Fusion: every variant within fp32 tolerance of the fp64 reference, and every plausible bug caught."""
import copy
import sys
import warnings

import pytest
import torch
from torch import nn

from levit_deploy import fuse
from levit_deploy.checkpoints import build_from_state_dict
from levit_deploy.fuse import FusionError, fuse_checked
from levit_deploy.models import VARIANTS, levit as levit_mod
from levit_deploy.parity import compare, random_inputs, reference_outputs

from layouts_ref import hf_model, hf_state_dict


@pytest.fixture(scope="module")
def model_128s():
    return build_from_state_dict(hf_state_dict(hf_model("levit_128s", seed=11)), "hf")


@pytest.fixture(scope="module")
def sensitive_128s(model_128s):
    """A model in which every part matters: q·k comparable to the bias table, as in trained LeViTs."""
    model = copy.deepcopy(model_128s)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("qkv.linear.weight", "kv.linear.weight", "attn.q.linear.weight")):
                p.mul_(2.0)
    clean = fuse_checked(model).reports  # control: without a bug, every step passes
    assert all(r.passed and r.min_rel_tolerance < 1e-5 for r in clean)
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_and_unfused_fp32_match_fp64_reference_on_64_inputs(name):
    model = build_from_state_dict(hf_state_dict(hf_model(name, seed=21)), "hf")
    inputs = random_inputs(64, seed=5)
    ref = reference_outputs(model, inputs)
    deploy = fuse(model)
    for candidate, label in ((model, "unfused"), (deploy, "fused")):
        report = compare(ref, candidate, inputs, "fp32", stage=label)
        assert report.passed, report.summary()
        assert report.max_abs <= 1e-4 * report.ref_scale
        assert report.top1_agreement == 1.0


def test_deploy_model_is_clean(model_128s):
    deploy = fuse(model_128s)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
    assert all(torch.is_floating_point(t) for t in list(deploy.parameters()) + list(deploy.buffers()))
    biases = [b for n, b in deploy.named_buffers() if n.endswith("attention_bias")]
    assert [tuple(b.shape) for b in biases][:3] == [(4, 196, 196), (4, 196, 196), (8, 49, 196)]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(deploy(x), deploy(x))  # deterministic


def test_traces_cleanly(model_128s):
    deploy = fuse(model_128s)
    x = torch.randn(2, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(deploy, x)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(deploy, (x,), dynamic_shapes={"x": {0: batch}})
    y = torch.randn(5, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(traced(x), deploy(x), atol=1e-5)
        assert torch.allclose(exported.module()(y), deploy(y), atol=1e-5)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t or "index" in t for t in targets), targets


def _bug_variance_not_std(bn):
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


@pytest.mark.parametrize("bug", ["variance instead of std", "swapped bias table", "missing scale", "one head dropped"])
def test_parity_gate_catches_fusion_bugs(sensitive_128s, monkeypatch, bug):
    if bug == "variance instead of std":
        monkeypatch.setattr(levit_mod, "_bn_scale_shift", _bug_variance_not_std)
    elif bug == "swapped bias table":
        monkeypatch.setattr(levit_mod.Attention, "fuse",
                            _patched_fuse(lambda d: d.attention_bias.copy_(d.attention_bias.flip(0))))
    elif bug == "missing scale":
        monkeypatch.setattr(levit_mod.Attention, "fuse",
                            _patched_fuse(lambda d: _unscale(d)))
    else:
        fuse_mod = sys.modules["levit_deploy.fuse"]  # the package-level fuse() shadows the module name

        def drop_dist(model):
            model.head_dist = None
            model.head = model.head.fuse()
            return 1
        monkeypatch.setattr(fuse_mod, "STEPS", fuse_mod.STEPS[:-1] + [("merge heads", drop_dist)])
    with pytest.raises(FusionError) as e:
        fuse_checked(sensitive_128s)
    assert not e.value.report.passed


_real_fuse = levit_mod.Attention.fuse


def _patched_fuse(corrupt):
    def fuse(self):
        deploy = _real_fuse(self)
        with torch.no_grad():
            corrupt(deploy)
        return deploy
    return fuse


def _unscale(deploy):
    hd = deploy.num_heads * deploy.key_dim
    deploy.qkv.weight[:hd] /= deploy.key_dim ** -0.5
    deploy.qkv.bias[:hd] /= deploy.key_dim ** -0.5
