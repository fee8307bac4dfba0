"""OpenVINO IR and CoreML packages: precision really as asked, parity, structural validation."""
import json
import platform
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy.checkpoints import build_from_state_dict
from levit_deploy.cli import app
from levit_deploy.backends import ExportError
from levit_deploy.parity import build_reference_set, compare
from levit_deploy.backends import RuntimeUnavailable

from conftest import trained_like_hf
from layouts_ref import hf_state_dict
from variants import LEVIT

pytest.importorskip("openvino", reason="OpenVINO not installed: pip install 'levit-deploy[openvino]'")
runner = CliRunner()
on_mac = platform.system() == "Darwin"


@pytest.fixture(scope="module")
def model_128s(trained_128s_path):
    return ld.load(trained_128s_path)


@pytest.fixture(scope="module")
def reference_128s(model_128s):
    return build_reference_set(model_128s)


def weight_types(xml_path) -> set[str]:
    """element types of the Const (weight) nodes in an IR."""
    root = ET.parse(xml_path).getroot()
    return {d.get("element_type") for layer in root.iter("layer") if layer.get("type") == "Const"
            for d in layer.iter("data") if d.get("element_type")}


@pytest.mark.parametrize("name", LEVIT)
def test_openvino_fp32_every_variant_passes_the_fp32_rule(tmp_path, name):
    model = build_from_state_dict(hf_state_dict(trained_like_hf(name)), "hf")
    art = ld.export(model, "openvino", tmp_path)
    p = art.manifest["parity"]
    assert p["status"] == "passed" and p["precision"] == "fp32" and p["worst_margin"] <= 1
    assert "f16" not in weight_types(tmp_path / "model.xml")  # fp32 really is fp32
    assert art.manifest["artifact"]["ir_weights"] == "fp32"


def test_openvino_fp16_passes_its_rule_and_is_half_the_size(tmp_path, model_128s, reference_128s):
    fp32 = ld.export(model_128s, "openvino", tmp_path / "32", reference=reference_128s)
    fp16 = ld.export(model_128s, "openvino", tmp_path / "16", precision="fp16", reference=reference_128s)
    p = fp16.manifest["parity"]
    assert p["status"] == "passed" and p["precision"] == "fp16"
    assert "f16" in weight_types(tmp_path / "16" / "model.xml")
    size32, size16 = fp32.manifest["artifact"]["size_bytes"], fp16.manifest["artifact"]["size_bytes"]
    assert 0.45 < size16 / size32 < 0.55
    assert any("fp16" in n for n in fp16.manifest["export"]["notes"])


def test_openvino_runtime_honours_threads_and_records_precision(tmp_path, model_128s, reference_128s):
    ld.export(model_128s, "openvino", tmp_path, reference=reference_128s)
    with ld.open_runtime(tmp_path, threads=1) as rt:
        info = rt.info()
        assert info["threads"] == 1 and info["inference_precision"] == "fp32"
        assert info["config"]["INFERENCE_PRECISION_HINT"] == "f32"
        assert compare(reference_128s, rt, rt.precision).passed
    with ld.open_runtime(tmp_path, compute="bf16") as rt:
        # on CPUs without bf16 support OpenVINO falls back to fp32: the recorded precision says which ran
        assert rt.precision == rt.info()["inference_precision"] in ("bf16", "fp32")
        report = compare(reference_128s, rt, rt.precision)
        assert report.passed, report.summary()
        if rt.precision == "bf16":
            assert not compare(reference_128s, rt, "fp32").passed  # really ran in bf16


def test_bench_and_parity_show_openvino(tmp_path, model_128s, reference_128s):
    ld.export(model_128s, "openvino", tmp_path / "ov", reference=reference_128s)
    result = runner.invoke(app, ["parity", str(tmp_path / "ov"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["chain"][-1]["stage"].startswith("openvino: ")
    result = runner.invoke(app, ["bench", str(tmp_path / "ov"), "--duration", "0.5", "--warmup", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = {r["label"]: r for r in doc["results"]}
    assert rows["artifact ov"]["images_per_s"] > 0 and rows["artifact ov"]["status"] == "ok"
    assert rows["artifact ov"]["info"]["threads"] == 1


coreml = pytest.importorskip("coremltools", reason="coremltools not installed: pip install 'levit-deploy[coreml]'")


@pytest.mark.parametrize("name", LEVIT)
def test_coreml_every_variant_converts_and_validates(tmp_path, name):
    model = build_from_state_dict(hf_state_dict(trained_like_hf(name)), "hf")
    reference = build_reference_set(model)
    plain = ld.export(model, "coreml", tmp_path / "plain", reference=reference)
    rich = ld.export(model, "coreml", tmp_path / "rich", image_input=True, labels=True, reference=reference)
    for art, inputs, outputs in ((plain, ["pixel_values"], ["logits"]), (rich, ["image"], ["classLabel", "classLabel_probs"])):
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


def test_coreml_validation_rejects_a_wrong_package(tmp_path, model_128s, reference_128s, monkeypatch):
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    from levit_deploy.backends.coreml import validate_package
    ld.export(model_128s, "coreml", tmp_path, reference=reference_128s)
    with pytest.raises(ExportError, match=r"inputs \['pixel_values'\], expected \['image'\]"):
        validate_package(tmp_path / "model.mlpackage", coreml.target.iOS16, True, False, model_128s.config)
    with pytest.raises(ExportError, match=r"classifier outputs missing: \['logits'\]"):
        validate_package(tmp_path / "model.mlpackage", coreml.target.iOS16, False, True, model_128s.config)
    # an op the target lacks (simulated by hiding softmax from the registry) is named
    monkeypatch.setitem(SSAOpRegistry.core_ops, "softmax", {})
    with pytest.raises(ExportError, match=r"ops not available for iOS16: \['softmax'\]"):
        validate_package(tmp_path / "model.mlpackage", coreml.target.iOS16, False, False, model_128s.config)
    with pytest.raises(ExportError, match="unknown CoreML deployment target 'macOS99'"):
        ld.export(model_128s, "coreml", tmp_path / "x", min_target="macOS99", reference=reference_128s)


@pytest.mark.skipif(on_mac, reason="checks the refusal off macOS")
def test_coreml_runtime_refuses_off_macos(tmp_path, model_128s, reference_128s):
    ld.export(model_128s, "coreml", tmp_path, reference=reference_128s)
    with pytest.raises(RuntimeUnavailable, match="only on macOS"):
        ld.open_runtime(tmp_path)
    result = runner.invoke(app, ["parity", str(tmp_path)])
    assert result.exit_code == 2 and "only on macOS" in result.output


@pytest.mark.skipif(not on_mac, reason="Core ML predictions need macOS (coremltools cannot predict on Linux)")
def test_coreml_parity_on_macos(tmp_path, model_128s, reference_128s):
    ld.export(model_128s, "coreml", tmp_path, reference=reference_128s)
    result = runner.invoke(app, ["parity", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
