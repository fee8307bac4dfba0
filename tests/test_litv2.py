"""LITv2: sizes from the paper, the deformable convolution against a loop transcription of the official CUDA
kernel, official trainer checkpoints (a pickled yacs CfgNode) on trained-like weights against an independent
implementation, every fusion step checked and its bugs caught, standard-op exports with the measured
deformable-conv form per target."""
import json
import os
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy.backends import ExportError, get_backend
from levit_deploy.checkpoints import CheckpointError
from levit_deploy.cli import app
from levit_deploy.families import get_family
from levit_deploy.families.base import count_parameters
from levit_deploy.families.litv2 import DEFORM_METHOD
from levit_deploy.families.litv2 import model as litv2_model
from levit_deploy.families.litv2.deform import METHODS, deform_conv2d, deform_conv2d_op
from levit_deploy.fuse import FusionError, fuse_checked

from conftest import trained_like_model, trained_like_reference, trained_like_state_dict
from litv2_ref import deform_conv_loop, deform_conv_tent, litv2_logits
from variants import LITV2

runner = CliRunner()
FAMILY = get_family("litv2")
PAPER = {"litv2_s": (28e6, 3.7e9), "litv2_m": (49e6, 7.5e9), "litv2_b": (87e6, 13.2e9)}
EXACT_PARAMS = {"litv2_s": 27_844_000, "litv2_m": 48_830_368, "litv2_b": 86_520_704}


@pytest.mark.parametrize("variant", list(PAPER))
def test_parameter_counts_and_flops_match_the_paper(variant):
    with torch.device("meta"):
        model = FAMILY.create(FAMILY.config(variant))
    params, flops = PAPER[variant]
    assert count_parameters(model) == EXACT_PARAMS[variant]
    assert round(count_parameters(model) / 1e6) == params / 1e6
    assert abs(FAMILY.count_flops(model.config) / flops - 1) < 0.01
    assert len(model.state_dict()) == {"litv2_s": 219}.get(variant, 459)  # the official key counts


@pytest.mark.parametrize("kernel, stride, padding, size", [(2, 2, 0, (9, 8)), (3, 1, 1, (6, 7)), (2, 2, 0, (8, 8))])
def test_deformable_conv_matches_the_official_kernel_transcription(kernel, stride, padding, size):
    """Offsets of several pixels, many samples partly or wholly outside the image, a non-square map."""
    g = torch.Generator().manual_seed(kernel * 10 + size[0])
    c_in, c_out = 5, 7
    x = torch.randn(2, c_in, *size, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=g, dtype=torch.float64)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    ho, wo = ((s + 2 * padding - kernel) // stride + 1 for s in size)
    offset = torch.randn(2, 2 * kernel * kernel, ho, wo, generator=g, dtype=torch.float64) * 3
    offset[0, 0, 0, 0], offset[0, 1, 0, 0] = -1.0, -0.5  # exactly on the -1 border, and a half pixel outside
    expected = deform_conv_loop(x, offset, weight, bias, stride, padding)
    assert torch.allclose(deform_conv_tent(x, offset, weight, bias, stride, padding), expected, atol=1e-12)
    for method in METHODS[:2]:
        ours = deform_conv2d(x, offset, weight, bias, c_in, kernel, stride, padding, size, method)
        assert torch.allclose(ours, expected, atol=1e-12), method
    if size[0] == size[1]:
        assert torch.allclose(deform_conv2d_op(x, offset, weight, bias, kernel, stride, padding), expected,
                              atol=1e-12)
    # zero offsets: a plain strided convolution, as the official init
    zero = deform_conv2d(x, torch.zeros_like(offset), weight, bias, c_in, kernel, stride, padding, size)
    assert torch.allclose(zero, torch.nn.functional.conv2d(x, weight, bias, stride, padding), atol=1e-12)
    # the offset channel order matters: (dy, dx) swapped is a different convolution
    swapped = offset.unflatten(1, (-1, 2)).flip(2).flatten(1, 2)
    assert not torch.allclose(deform_conv2d(x, swapped, weight, bias, c_in, kernel, stride, padding, size), expected,
                              atol=1e-3)


@pytest.fixture()
def yacs_module(monkeypatch):
    """A stand-in yacs.config module while the checkpoint is written, gone when it is read."""
    module = types.ModuleType("yacs.config")

    CfgNode = type("CfgNode", (dict,), {"__module__": "yacs.config", "__qualname__": "CfgNode"})
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return module


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def official_checkpoint(folder, variant, cfg_class=None, **extra):
    """What LITv2's utils.save_checkpoint writes: model, optimizer, lr_scheduler, max_accuracy, epoch, a
    yacs config, the apex amp state."""
    entries = {"model": trained_like_state_dict(variant), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
               "lr_scheduler": {"t_initial": 300}, "max_accuracy": 82.044, "epoch": 299,
               "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 17}}}
    if cfg_class is not None:
        model_cfg = cfg_class(TYPE="litv2", NAME=variant, LIT=cfg_class(ALPHA=0.9, LOCAL_WS=[0, 0, 2, 1]))
        entries["config"] = cfg_class(MODEL=model_cfg, AMP_OPT_LEVEL="O1", DATA=cfg_class(IMG_SIZE=224))
    entries.update(extra)
    path = folder / f"{variant}.pth"
    torch.save(entries, path)
    return path


@pytest.mark.slow  # 31 s even for LITv2-S: make test-all
@pytest.mark.parametrize("variant", LITV2)
def test_official_checkpoints_load_strictly_and_match_an_independent_implementation(tmp_path, variant, yacs_module,
                                                                                    monkeypatch):
    marker = tmp_path / "pwned"
    path = official_checkpoint(tmp_path, variant, yacs_module.CfgNode, hook=_Exploit(marker))
    monkeypatch.delitem(sys.modules, "yacs.config")  # the loader could not import it even if it tried
    with pytest.raises(Exception):  # what torch.load(weights_only=True) alone does with such a file
        torch.load(path, weights_only=True)
    model = ld.load(path)
    assert not marker.exists(), "the payload ran"
    info = model.load_info
    assert (info.family, info.layout, info.variant, info.entry) == ("litv2", "official", variant, "model")
    assert info.entries["config"].startswith("yacs.config.CfgNode (read as data: MODEL=")
    assert "AMP_OPT_LEVEL='O1'" in info.entries["config"] and info.entries["max_accuracy"] == "82.044"
    reference = trained_like_reference(variant)
    x = torch.from_numpy(reference.inputs[:1 if variant == "litv2_b" else 2]).double()
    with torch.no_grad():
        ours = model.double()(x)
        independent = litv2_logits(trained_like_state_dict(variant), x, variant)
    assert torch.allclose(ours, independent, rtol=0, atol=1e-9 * independent.abs().max().item())


def test_info_shows_the_config_and_bare_state_dicts_load(tmp_path, yacs_module):
    path = official_checkpoint(tmp_path, "litv2_s", yacs_module.CfgNode)
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["family"] == "litv2" and doc["variant"] == "litv2_s" and doc["params"] == EXACT_PARAMS["litv2_s"]
    assert "MODEL=" in doc["entries"]["config"] and "amp" in doc["entries"]
    bare = tmp_path / "bare.pth"
    torch.save(trained_like_state_dict("litv2_s"), bare)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ld.load(bare)(x), ld.load(path)(x))


def test_a_partial_checkpoint_is_refused_where_the_official_loader_would_pass_it(tmp_path):
    sd = dict(trained_like_state_dict("litv2_s"))
    del sd["layers.1.downsample.dconv.conv_offset.weight"]  # strict=False would leave zero offsets in silence
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"partial\.pth: LITv2 official layout.*closest is litv2_s.*missing "
                                              r"layers\.1\.downsample\.dconv\.conv_offset\.weight"):
        ld.load(tmp_path / "partial.pth")
    sd = dict(trained_like_state_dict("litv2_s"))
    sd["layers.2.blocks.0.attn.l_q.weight"] = torch.zeros(288, 384)  # an alpha-0.8 model, say
    torch.save({"model": sd}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"l_q\.weight: found \(288, 384\), expected \(320, 384\)"):
        ld.load(tmp_path / "other.pth")


@pytest.mark.slow  # 24 s even for LITv2-S; the fusion-bug tests below run LITv2's steps in make test
@pytest.mark.parametrize("variant", LITV2)
def test_every_fusion_step_passes_on_a_trained_like_checkpoint(variant):
    model, reference = trained_like_model(variant), trained_like_reference(variant)
    dtm = model.layers[0].downsample.dconv
    with torch.no_grad():  # the trained-like offsets really move the samples (1-2 px)
        x = torch.from_numpy(reference.inputs[:2])
        offsets = dtm.conv_offset(litv2_model.to_grid(_stage_input(model, x), dtm.side))
    assert 0.5 < offsets.abs().mean().item() < 3
    result = fuse_checked(model, reference)
    assert [r.stage for r in result.reports] == [s for s, _ in FAMILY.fusion_steps()] + ["deploy model"]
    assert all(r.passed for r in result.reports), [r.summary() for r in result.reports]
    deploy = result.model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    assert all(m.scale == 1.0 for m in deploy.modules() if isinstance(m, litv2_model.HiLo))
    norms = [m for m in deploy.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert sum(m.elementwise_affine for m in norms) == 1 and len(norms) > 10  # only the patch embedding's


def _stage_input(model, x):
    """The tokens entering stage 1's DTM."""
    t = model.patch_embed(x)
    for block in model.layers[0].blocks:
        t = block(t)
    return t


_real_dtm_fuse = litv2_model.DTM.fuse
_real_hilo_fuse = litv2_model.HiLo.fuse
_real_inputs = litv2_model.HiLo.input_linears


def _shift_dropped(self):
    with torch.no_grad():
        self.norm_layer.bias.zero_()  # a BatchNorm fold that forgets β
    return _real_dtm_fuse(self)


def _hifi_unscaled(self):
    scale = self.scale
    deploy = _real_hilo_fuse(self)
    if self.h_heads:
        with torch.no_grad():
            self.h_qkv.weight[:self.h_dim] /= scale
            self.h_qkv.bias[:self.h_dim] /= scale
    return deploy


def _pool_path_skipped(self):
    return [lin for lin in _real_inputs(self) if lin is not getattr(self, "l_kv", None)]


@pytest.mark.parametrize("bug", ["BatchNorm shift dropped", "Hi-Fi queries unscaled", "LayerNorm not folded into l_kv"])
def test_fusion_bugs_are_caught(monkeypatch, bug):
    model, reference = trained_like_model("litv2_s"), trained_like_reference("litv2_s")
    patch = {"BatchNorm shift dropped": ("DTM", "fuse", _shift_dropped),
             "Hi-Fi queries unscaled": ("HiLo", "fuse", _hifi_unscaled),
             "LayerNorm not folded into l_kv": ("HiLo", "input_linears", _pool_path_skipped)}[bug]
    monkeypatch.setattr(getattr(litv2_model, patch[0]), patch[1], patch[2])
    with pytest.raises(FusionError) as e:
        fuse_checked(model, reference)
    assert not e.value.report.passed


@pytest.mark.slow
def test_onnx_and_openvino_artifacts_hold_only_standard_ops_and_record_the_deformable_form(artifacts):
    onnx_art, ov_art = artifacts("litv2_s", "onnx"), artifacts("litv2_s", "openvino")
    assert onnx_art.manifest["model"]["implementation_choices"] == {"deformable_conv": DEFORM_METHOD["onnx"]}
    assert ov_art.manifest["model"]["implementation_choices"] == {"deformable_conv": DEFORM_METHOD["openvino"]}
    graph = onnx.load(str(onnx_art.path)).graph
    ops = {n.op_type for n in graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), {n.domain for n in graph.node}
    assert "DeformConv" in ops and not ops & {"BatchNormalization"}
    assert onnx_art.manifest["parity"]["status"] == ov_art.manifest["parity"]["status"] == "passed"
    xml = (ov_art.folder / "model.xml").read_text()  # ONNX DeformConv mapped onto OpenVINO's own op
    assert xml.count('type="DeformableConvolution"') == 3 and 'type="GridSample"' not in xml


def test_fp16_and_old_opsets_fall_back_to_the_gather_form():
    deploy = fuse_checked(trained_like_model("litv2_s"), check=False).model
    onnx_options = get_backend("onnx").options
    assert FAMILY.choose_for_target(deploy, "onnx", "fp32", onnx_options()) == {"deformable_conv": "deformconv"}
    assert FAMILY.choose_for_target(deploy, "onnx", "fp16", onnx_options()) == {"deformable_conv": "gather"}
    assert FAMILY.choose_for_target(deploy, "onnx", "fp32", onnx_options(opset=17)) == {"deformable_conv": "gather"}
    assert FAMILY.choose_for_target(deploy, "coreml", "fp32", None) == {"deformable_conv": "grid_sample"}
    assert {m.method for m in deploy.modules() if isinstance(m, litv2_model.DeformConv2dPack)} == {"grid_sample"}


@pytest.mark.slow  # three exports; the default run exports the chosen forms (ONNX and OpenVINO artifacts)
@pytest.mark.parametrize("method", METHODS)
def test_every_deformable_form_exports_to_onnx_and_passes_the_gate_in_ort(tmp_path, method, monkeypatch):
    """All three forms run in ONNX Runtime and pass the gate; each is recorded in the manifest."""
    monkeypatch.setitem(DEFORM_METHOD, "onnx", method)
    model, reference = trained_like_model("litv2_s"), trained_like_reference("litv2_s")
    art = ld.export(model, "onnx", tmp_path, reference=reference)
    assert art.manifest["model"]["implementation_choices"]["deformable_conv"] == method
    assert art.manifest["parity"]["status"] == "passed"


@pytest.mark.slow  # an fp16 export
def test_fp16_export_uses_the_gather_form_and_passes_its_rule(tmp_path):
    model, reference = trained_like_model("litv2_s"), trained_like_reference("litv2_s")
    art = ld.export(model, "onnx", tmp_path / "16", precision="fp16", reference=reference)
    assert art.manifest["model"]["implementation_choices"]["deformable_conv"] == "gather"
    assert art.manifest["parity"]["status"] == "passed"
    ops = {n.op_type for n in onnx.load(str(art.path)).graph.node}
    assert "DeformConv" not in ops and "GatherElements" in ops


def test_other_input_sizes_are_refused_with_the_reason(tmp_path):
    model = trained_like_model("litv2_s")
    with pytest.raises(ExportError, match="fixes every stage's token grid"):
        ld.export(model, "onnx", tmp_path, img_size=256)
    with pytest.raises(ValueError, match=r"LITv2 takes \(B, 3, 224, 224\) input"):
        model(torch.zeros(1, 3, 256, 256))


@pytest.mark.slow  # 38 s on 2 cores; make test-all
def test_any_batch_runs(artifacts):
    """The official CUDA op refuses odd batches of 5 and more; ours runs them."""
    with ld.open_runtime(artifacts("litv2_s", "onnx").folder) as rt:
        x = np.random.default_rng(0).standard_normal((5, 3, 224, 224)).astype(np.float32)
        single = np.concatenate([rt.infer(x[i:i + 1]) for i in range(5)])
        assert np.allclose(rt.infer(x), single, atol=1e-4 * np.abs(single).max())
