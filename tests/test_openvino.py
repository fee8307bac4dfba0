"""OpenVINO IR: precision really as asked, parity on trained-like checkpoints, threads, bench and parity."""
import json
import xml.etree.ElementTree as ET

import numpy as np
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


def test_a_flattened_linear_becomes_one_matmul_over_the_tokens_exactly():
    """Reshape to (B·N, C) -> MatMul -> Add -> Reshape back, as the ONNX graph runs a linear over tokens, is
    rewritten into a MatMul over (B, N, C): one rewrite, the same values, the MatMul's name kept."""
    import openvino as ov
    import openvino.opset13 as ops

    from levit_deploy.backends.openvino import unflatten_linears

    rng = np.random.default_rng(0)
    x = ops.parameter([-1, 49, 16], np.float32, name="x")
    flat = ops.reshape(x, ops.constant(np.array([-1, 16], np.int64)), False)
    product = ops.matmul(flat, ops.constant(rng.standard_normal((32, 16)).astype(np.float32)), False, True)
    product.set_friendly_name("Gemm_5/WithoutBiases")
    biased = ops.add(product, ops.constant(rng.standard_normal((1, 32)).astype(np.float32)))
    back = ops.reshape(biased, ops.constant(np.array([-1, 49, 32], np.int64)), False)
    ir = ov.Model([ops.relu(back)], [x], "flattened")
    tokens = rng.standard_normal((3, 49, 16)).astype(np.float32)
    before = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: tokens})[0]
    assert unflatten_linears(ir) == 1
    types = [op.get_type_name() for op in ir.get_ordered_ops()]
    assert types.count("Reshape") == 0 and types.count("MatMul") == 1
    assert [op.get_friendly_name() for op in ir.get_ordered_ops() if op.get_type_name() == "MatMul"] == [
        "Gemm_5/WithoutBiases"]
    after = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: tokens})[0]
    np.testing.assert_array_equal(before, after)
    assert unflatten_linears(ir) == 0


@pytest.mark.slow
def test_an_int8_litv2_ir_with_a_dynamic_batch_compiles(artifacts):
    """Without the rewrite above, OpenVINO 2026.4's CPU plugin refuses LITv2-S's int8 IR with a dynamic batch
    (ReshapeTransformation: ``backward_compatible_check || in_out_elements_equal``)."""
    import openvino as ov
    pytest.importorskip("nncf")

    from levit_deploy.backends.openvino import quantize_nncf, unflatten_linears
    from levit_deploy.calibration import calibration_set
    from levit_deploy.families import spec_for_model

    shipped = artifacts("litv2_s", "openvino")
    ir = ov.Core().read_model(str(shipped.path))
    assert unflatten_linears(ir) > 0
    model = ld.load("litv2_s", init="random", seed=0)
    quantized, _ = quantize_nncf(ir, calibration_set(spec_for_model(model), limit=4), {}, ())
    request = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    for batch in (1, 3):
        request.infer({0: np.zeros((batch, 3, 224, 224), np.float32)})
        assert request.get_output_tensor(0).data.shape == (batch, 1000)
