"""CoreML packages: conversion and structural validation on Linux, numeric parity on macOS."""
import platform

import pytest
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy.backends import ExportError, RuntimeUnavailable
from levit_deploy.cli import app

from conftest import trained_like_model, trained_like_reference
from variants import SMALLEST_LEVIT_FIRST

runner = CliRunner()
on_mac = platform.system() == "Darwin"
coreml = pytest.importorskip("coremltools", reason="coremltools not installed: pip install 'levit-deploy[coreml]'")


@pytest.mark.slow  # 17 s for LeViT-128S; the image-input test below runs in make test
@pytest.mark.parametrize("name", SMALLEST_LEVIT_FIRST)
def test_coreml_every_variant_converts_and_validates(tmp_path, artifacts, name):
    packages = [(artifacts(name, "coreml"), ["pixel_values"], ["logits"])]
    if "levit_128s" in name:  # an image input with labels too (test_coreml_image_input_... covers its details)
        rich = ld.export(trained_like_model(name), "coreml", tmp_path / "rich", image_input=True, labels=True,
                         reference=trained_like_reference(name))
        packages.append((rich, ["image"], ["classLabel", "classLabel_probs"]))
    for art, inputs, outputs in packages:
        c = art.manifest["artifact"]["coreml"]
        assert (c["inputs"], c["outputs"]) == (inputs, outputs)
        assert c["op_count"] > 100 and "conv" in c["op_types"] and "softmax" in c["op_types"]
        assert (art.folder / "model.mlpackage" / "Manifest.json").is_file()
        assert all(name.startswith("model.mlpackage/") for name in art.manifest["artifact"]["files"])
        if not on_mac:
            assert art.manifest["parity"]["status"] == "pending"
            assert "only on macOS" in art.manifest["parity"]["reason"]


def test_coreml_image_input_folds_normalisation_and_embeds_labels(tmp_path, model_128s, reference_128s):
    art = ld.export(model_128s, "coreml", tmp_path, image_input=True, labels=True, precision="fp16",
                    reference=reference_128s)
    spec = coreml.models.MLModel(str(art.path), skip_model_load=True).get_spec()
    img = spec.description.input[0].type.imageType
    assert (img.width, img.height) == (224, 224)
    assert img.colorSpace == coreml.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert spec.description.predictedFeatureName == "classLabel"
    params = str(spec.mlProgram)
    assert "golden retriever" in params and "tench" in params
    assert art.manifest["export"]["precision"] == "fp16"


def test_coreml_validation_rejects_a_wrong_package(tmp_path, model_128s, reference_128s, artifact_128s, monkeypatch):
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    from levit_deploy.backends.coreml import validate_package
    package = artifact_128s("coreml").path
    with pytest.raises(ExportError, match=r"inputs \['pixel_values'\], expected \['image'\]"):
        validate_package(package, coreml.target.iOS16, True, False, model_128s.config)
    with pytest.raises(ExportError, match=r"classifier outputs missing: \['logits'\]"):
        validate_package(package, coreml.target.iOS16, False, True, model_128s.config)
    # an op the target lacks (simulated by hiding softmax from the registry) is named
    monkeypatch.setitem(SSAOpRegistry.core_ops, "softmax", {})
    with pytest.raises(ExportError, match=r"ops not available for iOS16: \['softmax'\]"):
        validate_package(package, coreml.target.iOS16, False, False, model_128s.config)
    with pytest.raises(ExportError, match="unknown CoreML deployment target 'macOS99'"):
        ld.export(model_128s, "coreml", tmp_path / "x", min_target="macOS99", reference=reference_128s)


@pytest.mark.skipif(on_mac, reason="checks the refusal off macOS")
def test_coreml_runtime_refuses_off_macos(artifact_128s):
    folder = artifact_128s("coreml").folder
    with pytest.raises(RuntimeUnavailable, match="only on macOS"):
        ld.open_runtime(folder)
    result = runner.invoke(app, ["parity", str(folder)])
    assert result.exit_code == 2 and "only on macOS" in result.output


@pytest.mark.macos
@pytest.mark.skipif(not on_mac, reason="Core ML predictions need macOS (coremltools cannot predict on Linux)")
def test_coreml_parity_on_macos(artifact_128s, tmp_path, model_128s, reference_128s):
    for folder in (artifact_128s("coreml").folder,
                   ld.export(model_128s, "coreml", tmp_path, image_input=True, labels=True,
                             reference=reference_128s).folder):
        result = runner.invoke(app, ["parity", str(folder), "--json"])
        assert result.exit_code == 0, result.output
