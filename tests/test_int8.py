"""int8 export (ONNX Runtime QDQ, OpenVINO NNCF), judged by the int8 gate on real photos.

Calibration uses scikit-image photos that are not the gate's (tests/real_photos.py); the gate judges the
bundled photos, synthetic JPEGs and crops of other real photos passed as the user's images.
"""
import json

import pytest
from typer.testing import CliRunner

import levit_deploy as ld
from conftest import trained_like_file, trained_like_model
from levit_deploy.cli import app

runner = CliRunner()


@pytest.mark.parametrize("target, model", [
    # trained-like: passes (cosine >= 0.9995, 97 % top-1 agreement); 34 s, so `make test-all` runs it and the default
    # run shows an ONNX int8 pass on the in-distribution yardstick (test_int8_remedy.py)
    pytest.param("onnx", "lightvit_tiny", marks=pytest.mark.slow),
    # the only model OpenVINO int8 passes here: trained-like LeViT is too ill-conditioned (see below), trained-like
    # LightViT-T flips 2 of 32 photos (93.8 %); 65 s
    pytest.param("openvino", "levit_128s", marks=pytest.mark.slow),
])
def test_int8_passes_the_gate_on_real_photos_and_records_its_calibration(tmp_path, int8_photos, target, model):
    pytest.importorskip("nncf" if target == "openvino" else "onnxruntime")
    calib, judge = int8_photos
    out = tmp_path / "int8"
    source = ["levit_128s", "--init", "random"] if model == "levit_128s" else [str(trained_like_file(model))]
    result = runner.invoke(app, ["export", *source, "--to", target, "--precision", "int8", "--calib", str(calib),
                                 "--images", str(judge), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)["manifest"]
    assert m["parity"]["status"] == "passed" and m["parity"]["precision"] == "int8"
    assert all(r["passed"] for r in m["parity"]["per_input"] if r["gating"]) and m["parity"]["top1_agreement"] >= 0.95
    judged = {k["kind"]: k for k in m["parity"]["kinds"]}
    assert judged["user images"]["n"] == 21 and judged["user images"]["gating"] and not judged["noise"]["gating"]
    cal = m["export"]["calibration"]
    assert cal["source"] == str(calib) and cal["size"] == 84 and not cal["stand_in"]
    assert cal["calibration_batch"] == 1 and cal["method"] and cal["ignored_scope"]
    fp32_bytes = 4 * m["model"]["params"]
    assert m["artifact"]["size_bytes"] < 0.45 * fp32_bytes  # int8 weights: well under half of fp32
    with ld.open_runtime(out) as rt:
        assert rt.precision == "int8"


@pytest.mark.slow
def test_without_calib_the_stand_in_is_said_loudly(tmp_path):
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "onnx", "--precision", "int8",
                                 "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "WARNING: int8 calibrated on a STAND-IN set" in result.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["export"]["calibration"]["stand_in"] is True
    assert any("STAND-IN" in n for n in manifest["export"]["notes"])


@pytest.mark.slow  # 28 s; the default run shows a refusal on the ill-conditioned checkpoint below
def test_int8_gate_rejects_quantized_convolutions_on_lightvit(tmp_path, int8_photos, monkeypatch):
    """The choice the ONNX exporter rejected by measurement: with convolutions quantized as well, trained-like
    LightViT-T drops to cosine ~0.92 on photos. The gate alone (no search: max_float_fraction=0) must refuse that
    artifact and keep nothing."""
    import levit_deploy.backends.onnx as onnx_backend
    from levit_deploy.export import ExportParityError

    calib, _ = int8_photos
    monkeypatch.setattr(onnx_backend, "INT8_OPS", ("MatMul", "Gemm", "Conv"))
    with pytest.raises(ExportParityError) as failure:
        ld.export(trained_like_model("lightvit_tiny"), "onnx", tmp_path / "bad", precision="int8", calib=calib,
                  max_float_fraction=0)
    assert failure.value.report.min_cosine < 0.99
    assert not (tmp_path / "bad" / "model.onnx").exists() and (tmp_path / "bad" / "parity-failed-onnx.json").exists()


@pytest.mark.slow
def test_int8_of_an_ill_conditioned_checkpoint_is_refused_with_the_reason(tmp_path, int8_photos):
    """Shifted trained-like LeViT fixtures amplify rounding so much that the original model in bf16 agrees with fp64
    on about half the photos: the plain int8 artifact is refused and the report says why (the search for layers to
    keep in float, which fails too on the shared shifted yardstick, is left out here for time: 2.5 minutes)."""
    from levit_deploy.export import ExportParityError

    calib, _ = int8_photos
    with pytest.raises(ExportParityError) as failure:
        ld.export(trained_like_model("levit_128s"), "onnx", tmp_path, precision="int8", calib=calib,
                  max_float_fraction=0)
    notes = " ".join(failure.value.report.notes)
    assert "computed in bf16" in notes and not failure.value.report.passed
    bf16_agreement = float(notes.split("top-1 agreement ")[1].split("%")[0]) / 100
    assert bf16_agreement < 0.95  # the checkpoint itself cannot agree in 8 bits of mantissa


def test_an_artifact_its_runtime_cannot_load_is_one_line_and_not_kept(tmp_path, monkeypatch):
    """What OpenVINO int8 of LITv2 does here ([ReshapeTransformation] throws while compiling the IR), in small:
    the staged artifact's runtime fails to open. One line, exit 2, nothing kept."""
    from levit_deploy.backends.onnx import OrtRuntime

    def broken(self):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:132:\n[ReshapeTransformation] END: "
                           "CALLBACK HAS THROWN")
    monkeypatch.setattr(OrtRuntime, "_open", broken)
    out = tmp_path / "x"
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "onnx", "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "could not load the fp32 artifact written for it (RuntimeError: [ReshapeTransformation]" in result.output
    assert not out.exists() or not any(out.iterdir())


def test_calib_is_refused_for_float_precisions(tmp_path):
    result = runner.invoke(app, ["export", str(trained_like_file("levit_128s")), "--to", "onnx",
                                 "--calib", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "calibration images are for int8" in result.output


@pytest.mark.slow  # 22 s: exports and times three artifacts; `make test-all` runs it
def test_bench_puts_int8_beside_fp32_and_bf16():
    pytest.importorskip("nncf")
    result = runner.invoke(app, ["bench", "levit_128s", "--init", "random", "-r", "openvino", "--precision", "fp32",
                                 "--precision", "bf16", "--precision", "int8", "--batch", "2", "--duration", "0.3",
                                 "--warmup", "0.1", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["label"]: r for r in json.loads(result.stdout)["results"]}
    assert {"openvino levit-deploy fp32", "openvino levit-deploy bf16", "openvino levit-deploy int8"} <= set(rows)
    assert rows["openvino levit-deploy int8"]["precision"] == "int8"
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows.values())
