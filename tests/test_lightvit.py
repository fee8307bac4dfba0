"""LightViT: sizes from the paper, official checkpoints on trained-like weights, an independent
implementation, every fusion step checked, export traps of the official code fixed, every target."""
import json

import onnx
import pytest
import torch
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy.backends import ExportError
from levit_deploy.checkpoints import CheckpointError
from levit_deploy.cli import app
from levit_deploy.families import get_family
from levit_deploy.families.base import count_parameters
from levit_deploy.families.lightvit import model as lightvit_model
from levit_deploy.fuse import FusionError, fuse_checked
from levit_deploy.preprocess import bundled_photos

from conftest import trained_like_model, trained_like_reference, trained_like_state_dict
from lightvit_ref import lightvit_logits
from variants import LIGHTVIT

runner = CliRunner()
FAMILY = get_family("lightvit")
PAPER = {"lightvit_tiny": (9.4e6, 0.7e9), "lightvit_small": (19.2e6, 1.7e9), "lightvit_base": (35.2e6, 3.9e9)}
# what the official model's own flops() returns (the paper rounds these): it counts the local attention as
# if each window held one token per channel, leaving out the 49x49 scores
OFFICIAL_FLOPS = {"lightvit_tiny": 0.7332e9, "lightvit_small": 1.7430e9, "lightvit_base": 3.9229e9}
EXACT_PARAMS = {"lightvit_tiny": 9_377_698, "lightvit_small": 19_200_248, "lightvit_base": 35_195_653}


def official_checkpoint(folder, variant, **extra):
    """What hunto's CheckpointManager saves: the model's state dict among training state."""
    sd = trained_like_state_dict(variant)
    path = folder / f"{variant}.pth.tar"
    torch.save({"epoch": 299, "model": sd, "ema_model": None, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                "scaler": None, "dyrep": None, **extra}, path)
    return path


@pytest.mark.parametrize("variant", list(PAPER))
def test_parameter_counts_and_flops_match_the_paper(variant):
    model = FAMILY.create(FAMILY.config(variant))
    params, flops = PAPER[variant]
    assert count_parameters(model) == EXACT_PARAMS[variant]
    assert round(count_parameters(model) / 1e5) == round(params / 1e5)
    ours = FAMILY.count_flops(model.config)
    assert 1.0 < ours / OFFICIAL_FLOPS[variant] < 1.06  # ours adds the local attention scores
    assert abs(ours / flops - 1) < 0.11


@pytest.mark.parametrize("variant", LIGHTVIT)
def test_official_checkpoints_load_strictly_and_match_an_independent_implementation(tmp_path, variant):
    path = official_checkpoint(tmp_path, variant)
    model = ld.load(path)
    info = model.load_info
    assert (info.family, info.layout, info.variant, info.entry) == ("lightvit", "official", variant, "model")
    assert info.entries["ema_model"] == "None" and info.entries["epoch"] == "299"
    assert info.entries["optimizer"].startswith("dict (2 entries: state, param_groups)")
    reference = trained_like_reference(variant)
    x = torch.from_numpy(reference.inputs[:4]).double()
    with torch.no_grad():
        ours = model.double()(x)
        independent = lightvit_logits(trained_like_state_dict(variant), x)
    assert torch.allclose(ours, independent, rtol=0, atol=1e-9 * independent.abs().max().item())


def test_info_names_every_entry_and_ema_is_one_flag(tmp_path):
    sd = trained_like_state_dict("lightvit_tiny")
    ema = {f"module.module.{k}": v.clone() for k, v in sd.items()}  # ModelEMA wraps the DDP-wrapped model
    ema["module.module.stages.0.0.attn.relative_position_index"] = (ema["module.module.stages.0.0.attn."
                                                                         "relative_position_index"] * 0.9999).long()
    path = official_checkpoint(tmp_path, "lightvit_tiny", ema_model=ema)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "family      LightViT (Huang et al. 2022)" in result.output
    assert "entry       model: state dict (415 tensors)  <- loaded" in result.output
    assert "entry       optimizer: dict" in result.output and "entry       scaler: None" in result.output
    result = runner.invoke(app, ["info", str(path), "--ema", "--json"])
    doc = json.loads(result.stdout)
    assert doc["entry"] == "ema_model" and any("module.module." in n for n in doc["notes"])
    assert any("relative_position_index tables differed" in n for n in doc["notes"])  # EMA-blended index fixed
    bare, wrapped = tmp_path / "bare.pth", tmp_path / "wrapped.pth"
    torch.save(sd, bare)
    torch.save({"state_dict": sd}, wrapped)
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        outs = [ld.load(p, **kw)(x) for p, kw in ((path, {}), (path, {"entry": "ema_model"}), (bare, {}), (wrapped, {}))]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    (tmp_path / "n").mkdir()
    no_ema = official_checkpoint(tmp_path / "n", "lightvit_tiny")
    result = runner.invoke(app, ["info", str(no_ema), "--ema"])
    assert result.exit_code == 2 and "'ema_model' is None" in result.output and "no EMA" in result.output


def test_a_wrong_checkpoint_names_what_it_found(tmp_path):
    sd = dict(trained_like_state_dict("lightvit_tiny"))
    sd["stages.1.2.attn.qkv.weight"] = torch.zeros(10, 128)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth: LightViT official layout.*closest is lightvit_tiny.*"
                                              r"stages\.1\.2\.attn\.qkv\.weight: found \(10, 128\), expected \(384, 128\)"):
        ld.load(tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="you asked for levit_128s but the checkpoint is a lightvit_tiny"):
        ld.load("levit_128s", weights=official_checkpoint(tmp_path, "lightvit_tiny"))


@pytest.mark.parametrize("variant", LIGHTVIT)
def test_every_fusion_step_passes_on_a_trained_like_checkpoint(variant):
    model, reference = trained_like_model(variant), trained_like_reference(variant)
    result = fuse_checked(model, reference)
    assert [r.stage for r in result.reports] == [s for s, _ in FAMILY.fusion_steps()] + ["deploy model"]
    assert all(r.passed for r in result.reports), [r.summary() for r in result.reports]
    deploy = result.model
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, lightvit_model.LightViTAttention)) for m in deploy.modules())
    norms = [m for m in deploy.modules() if isinstance(m, torch.nn.LayerNorm)]
    # only the stem norm (feeds the residual stream) and the neck norm (feeds GELU) keep an affine
    assert sum(m.elementwise_affine for m in norms) == 2 and len(norms) > 2


def _unscaled(self):
    deploy = _real_attention_fuse(self)
    with torch.no_grad():
        dim = deploy.qkv.in_features
        deploy.qkv.weight[:dim] /= self.scale
        deploy.qkv.bias[:dim] /= self.scale
    return deploy


_real_attention_fuse = lightvit_model.LightViTAttention.fuse


def _transposed_bias(self):
    deploy = _real_attention_fuse(self)
    with torch.no_grad():
        deploy.attention_bias.copy_(deploy.attention_bias.transpose(1, 2).clone())
    return deploy


def _beta_dropped(norm, linears):
    with torch.no_grad():
        norm.bias.zero_()  # a fold that forgets β
    return _real_fold(norm, linears)


_real_fold = lightvit_model.fold_norm_into_linear


@pytest.mark.parametrize("bug", ["missing scale", "transposed bias table", "LayerNorm shift dropped"])
def test_fusion_bugs_are_caught(monkeypatch, bug):
    model, reference = trained_like_model("lightvit_tiny"), trained_like_reference("lightvit_tiny")
    if bug == "missing scale":
        monkeypatch.setattr(lightvit_model.LightViTAttention, "fuse", _unscaled)
    elif bug == "transposed bias table":
        monkeypatch.setattr(lightvit_model.LightViTAttention, "fuse", _transposed_bias)
    else:
        monkeypatch.setattr(lightvit_model, "fold_norm_into_linear", _beta_dropped)
    with pytest.raises(FusionError) as e:
        fuse_checked(model, reference)
    assert not e.value.report.passed


@pytest.mark.parametrize("variant", LIGHTVIT)
def test_the_onnx_graph_is_clean_and_its_batch_dynamic(artifacts, variant):
    """The official code's traps: its window_reverse froze the batch in a trace, and its MaxPool3d on a
    4-D tensor exports to a 3-D MaxPool ONNX Runtime refuses. (Parity at batch 1, 7 and 32 runs for every
    family in test_export_onnx.)"""
    art = artifacts(variant, "onnx")
    assert art.manifest["parity"]["status"] == "passed" and art.manifest["model"]["family"] == "lightvit"
    assert art.manifest["preprocessing"]["resize"] == 256 and art.manifest["preprocessing"]["crop"] == 224
    graph = onnx.load(str(art.path)).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"BatchNormalization", "GatherND", "Gather"}
    pools = [n for n in graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 2 and all([list(a.ints) for a in n.attribute if a.name == "kernel_shape"] == [[2, 2]]
                                   for n in pools)
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_other_input_sizes_are_refused_with_the_reason(tmp_path):
    model = trained_like_model("lightvit_tiny")
    with pytest.raises(ExportError, match="7x7 attention windows have no padding"):
        ld.export(model, "onnx", tmp_path, img_size=256)
    with pytest.raises(ValueError, match="multiple of 7 at every stage"):
        model(torch.zeros(1, 3, 256, 256))


@pytest.mark.slow  # an export through the CLI (the library path runs in the default suite)
def test_cli_exports_an_official_checkpoint(tmp_path):
    path = official_checkpoint(tmp_path, "lightvit_tiny")
    result = runner.invoke(app, ["export", "lightvit_tiny", "--weights", str(path), "--to", "onnx", "--out",
                                 str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "parity      PASSED [fp32]" in result.output
    assert "fusion      fold LayerNorm affine into the following linears" in result.output


def test_cli_parity_and_predict_on_an_artifact(artifacts):
    folder = artifacts("lightvit_tiny", "onnx").folder
    result = runner.invoke(app, ["parity", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    stages = [r["stage"] for r in json.loads(result.stdout)["chain"]]
    assert stages[1:5] == [s for s, _ in FAMILY.fusion_steps()] + ["deploy model"] and stages[-1].startswith("ort")
    photos = [str(p) for p in bundled_photos()[:2]]
    result = runner.invoke(app, ["predict", *photos, "--model", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["preprocessing"]["resize"] == 256 and all(r["ok"] for r in doc["results"])
