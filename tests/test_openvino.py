"""OpenVINO IR: precision really as asked, parity on trained-like checkpoints, threads, bench and parity."""
import json
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy.cli import app
from levit_deploy.parity import compare

from variants import SMALLEST_LEVIT_FIRST

pytest.importorskip("openvino", reason="OpenVINO not installed: pip install 'levit-deploy[openvino]'")
runner = CliRunner()


def weight_types(xml_path) -> set[str]:
    """element types of the Const (weight) nodes in an IR."""
    root = ET.parse(xml_path).getroot()
    return {d.get("element_type") for layer in root.iter("layer") if layer.get("type") == "Const"
            for d in layer.iter("data") if d.get("element_type")}


@pytest.mark.parametrize("name", SMALLEST_LEVIT_FIRST)
def test_openvino_fp32_every_variant_passes_the_fp32_rule(artifacts, name):
    art = artifacts(name, "openvino")
    p = art.manifest["parity"]
    assert p["status"] == "passed" and p["precision"] == "fp32" and p["worst_margin"] <= 1
    assert "f16" not in weight_types(art.folder / "model.xml")  # fp32 really is fp32
    assert art.manifest["artifact"]["ir_weights"] == "fp32"


@pytest.mark.slow
def test_openvino_fp16_passes_its_rule_and_is_half_the_size(tmp_path, model_128s, reference_128s, artifact_128s):
    fp32 = artifact_128s("openvino")
    fp16 = ld.export(model_128s, "openvino", tmp_path / "16", precision="fp16", reference=reference_128s)
    p = fp16.manifest["parity"]
    assert p["status"] == "passed" and p["precision"] == "fp16"
    assert "f16" in weight_types(tmp_path / "16" / "model.xml")
    size32, size16 = fp32.manifest["artifact"]["size_bytes"], fp16.manifest["artifact"]["size_bytes"]
    assert 0.45 < size16 / size32 < 0.55
    assert any("fp16" in n for n in fp16.manifest["export"]["notes"])


def test_openvino_runtime_honours_threads_and_records_precision(reference_128s, artifact_128s):
    folder = artifact_128s("openvino").folder
    with ld.open_runtime(folder, threads=1) as rt:
        info = rt.info()
        assert info["threads"] == 1 and info["inference_precision"] == "fp32"
        assert info["config"]["INFERENCE_PRECISION_HINT"] == "f32"
        assert compare(reference_128s, rt, rt.precision).passed
    with ld.open_runtime(folder, compute="bf16") as rt:
        # on CPUs without bf16 support OpenVINO falls back to fp32: the recorded precision says which ran
        assert rt.precision == rt.info()["inference_precision"] in ("bf16", "fp32")
        report = compare(reference_128s, rt, rt.precision)
        assert report.passed, report.summary()
        if rt.precision == "bf16":
            assert not compare(reference_128s, rt, "fp32").passed  # really ran in bf16


@pytest.mark.slow
def test_bench_and_parity_show_openvino(artifact_128s):
    folder = artifact_128s("openvino").folder
    result = runner.invoke(app, ["parity", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["chain"][-1]["stage"].startswith("openvino: ")
    result = runner.invoke(app, ["bench", str(folder), "--duration", "0.5", "--warmup", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = {r["label"]: r for r in doc["results"]}
    row = rows[f"artifact {folder.name}"]
    assert row["images_per_s"] > 0 and row["status"] == "ok" and row["info"]["threads"] == 1
