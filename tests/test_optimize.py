"""optimize: every candidate exported and gated, refusals listed and never chosen, the fastest passing one kept."""
import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import levit_deploy.optimize as optimize_module
from levit_deploy.cli import app
from levit_deploy.optimize import Candidate, plan
from levit_deploy.preprocess import bundled_photos

runner = CliRunner()


def test_the_plan_leaves_out_what_cannot_run_here_and_lists_what_was_asked_for(monkeypatch):
    monkeypatch.setattr(optimize_module, "cpu_info", lambda: {"isa": ["avx2"]})
    defaults, notes = plan(["onnx", "openvino"], None)
    assert [c.name for c in defaults] == ["onnx fp32", "onnx int8", "openvino fp32", "openvino int8"]
    assert notes == ["openvino bf16: not tried, this CPU has no native bf16 (avx512_bf16 or amx_bf16)"]
    asked, _ = plan(["onnx", "coreml"], ["bf16", "fp32"])
    skipped = {c.name: c.reason for c in asked if c.status == "skipped"}
    assert skipped["onnx bf16"] == "ort does not compute in bf16"
    assert "coreml cannot run on this machine" in skipped["coreml fp32"]
    monkeypatch.setattr(optimize_module, "cpu_info", lambda: {"isa": ["avx512_bf16"]})
    assert "openvino bf16" in [c.name for c in plan(["openvino"], None)[0]]


def test_unknown_targets_and_precisions_are_one_line(tmp_path):
    for flag, value, expected in [("--targets", "tflite", "unknown target(s) tflite"),
                                  ("--precisions", "int4", "unknown precision(s) int4")]:
        result = runner.invoke(app, ["optimize", "levit_128s", "--init", "random", flag, value, "--out",
                                     str(tmp_path)])
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output


@pytest.mark.slow  # two exports and a timed run (~35 s)
def test_the_fastest_passing_candidate_is_kept_and_a_refused_one_is_listed_never_chosen(tmp_path, monkeypatch):
    """ONNX Runtime gets a broken model (one weight scaled 5 %: the checked fusion refuses it); OpenVINO the real one."""
    real_export = optimize_module.export

    def export(model, target, folder, **kwargs):
        if target == "onnx":
            model = copy.deepcopy(model)
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if p.dim() == 4).mul_(1.05)
        return real_export(model, target, folder, **kwargs)
    monkeypatch.setattr(optimize_module, "export", export)
    out = tmp_path / "opt"
    result = runner.invoke(app, ["optimize", "levit_128s", "--init", "random", "--targets", "onnx,openvino",
                                 "--precisions", "fp32", "--duration", "1.5", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    by_name = {f"{c['target']} {c['precision']}": c for c in doc["candidates"]}
    assert by_name["onnx fp32"]["status"] == "refused" and "broke parity" in by_name["onnx fp32"]["reason"]
    assert by_name["onnx fp32"]["images_per_s"] is None  # never timed, never chosen
    assert by_name["openvino fp32"]["status"] == "passed" and by_name["openvino fp32"]["worst_cos"] > 0.999
    assert by_name["torch fp32"]["status"] == "baseline" and by_name["torch fp32"]["images_per_s"] > 0
    assert doc["best"]["target"] == "openvino" and doc["best"]["precision"] == "fp32"
    timed = by_name["openvino fp32"]
    assert timed["cold_start_ms"] > 0 and timed["peak_rss_mb"] > 0 and timed["size_mb"] > 1
    assert timed["images_per_s_ci"][0] <= timed["images_per_s"] <= timed["images_per_s_ci"][1]
    report = (out / "report.md").read_text()
    assert "Chosen: openvino fp32" in report and "onnx fp32: refused" in report and "levit-deploy optimize" in report
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["best"] == doc["best"]
    predicted = runner.invoke(app, ["predict", str(bundled_photos()[0]), "--model", doc["best"]["artifact"], "--json"])
    assert predicted.exit_code == 0, predicted.output


def test_the_chosen_one_is_the_fastest_of_those_timed():
    cands = [Candidate("a", "fp32", "passed", images_per_s=10.0, p50_ms=5.0),
             Candidate("b", "int8", "passed", images_per_s=30.0, p50_ms=9.0),
             Candidate("c", "int8", "refused", images_per_s=None),
             Candidate("torch", "fp32", "baseline", images_per_s=99.0, p50_ms=1.0)]
    assert optimize_module._choose(cands, "throughput").target == "b"
    assert optimize_module._choose(cands, "latency").target == "a"


@pytest.mark.slow  # one int8 search on ONNX Runtime (~3 minutes on 2 cores); the full run is benchmarks/results/
def test_optimize_on_the_in_distribution_yardstick_keeps_a_passing_int8_artifact(tmp_path, in_distribution):
    out = tmp_path / "opt"
    result = runner.invoke(app, ["optimize", str(in_distribution / "levit_128s_in_distribution.pth"), "--calib",
                                 str(in_distribution / "calib"), "--images", str(in_distribution / "images"),
                                 "--targets", "onnx", "--duration", "2", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    by_name = {f"{c['target']} {c['precision']}": c for c in doc["candidates"]}
    assert by_name["onnx int8"]["status"] == "passed" and 0 < len(by_name["onnx int8"]["kept_float"]) <= 11
    passing = [c for c in doc["candidates"] if c["status"] == "passed" and c["images_per_s"]]
    assert doc["best"]["images_per_s"] == max(c["images_per_s"] for c in passing)
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["export"]["precision"] == doc["best"]["precision"]
