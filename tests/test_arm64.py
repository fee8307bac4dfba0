"""ARM64: the native option set and its recording (any host), and emulated aarch64 parity (qemu)."""
import json
import shutil

import pytest
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy import arm64
from levit_deploy.cli import app
from levit_deploy.parity import compare_outputs
from levit_deploy.reference import build_reference_set

runner = CliRunner()


def test_presets_are_named_and_recorded():
    plain = arm64.Presets()
    assert plain.session_config() == {} and plain.environment() == {"OMP_NUM_THREADS": "1"}
    assert plain.parity_precision == "fp32"
    fast = arm64.Presets(threads=2, bf16_fast_math=True)
    assert fast.session_config() == {"mlas.enable_gemm_fastmath_arm64_bfloat16": "1"}
    assert fast.parity_precision == "bf16"
    torch_fast = arm64.Presets(bf16_fast_math=True, runtime="torch")
    assert torch_fast.environment() == {"OMP_NUM_THREADS": "1", "LRU_CACHE_CAPACITY": "1024",
                                        "THP_MEM_ALLOC_ENABLE": "1", "DNNL_DEFAULT_FPMATH_MODE": "BF16"}
    recorded = torch_fast.to_dict()
    assert recorded["environment"]["DNNL_DEFAULT_FPMATH_MODE"] == "BF16" and recorded["parity_precision"] == "bf16"


@pytest.mark.slow
def test_native_code_path_runs_the_worker_with_the_presets(tmp_path, monkeypatch):
    """The native path (worker in a subprocess with the presets) exercised on this host's CPU."""
    model = ld.load("levit_128s", init="random")
    reference = build_reference_set(model, noise=2, synthetic=0).subset(slice(0, 4))
    art = ld.export(model, "onnx", tmp_path, reference=reference)
    inputs = reference.inputs
    logits, report = arm64.run_worker(art.path, inputs, arm64.Presets(threads=1), None, duration=0.3, batch=2)
    assert compare_outputs(reference.outputs, logits, "fp32", floors=reference.floors("fp32")).passed
    assert report["threads"] == 1 and report["timing"]["calls"] >= 5 and report["cpu"]["machine"]
    # the ORT option reaches the session (onnxruntime ignores it off arm64, but it must be passed and recorded)
    _, report = arm64.run_worker(art.path, inputs, arm64.Presets(bf16_fast_math=True), None)
    assert report["session_config"] == {"mlas.enable_gemm_fastmath_arm64_bfloat16": "1"}


@pytest.mark.slow
def test_native_torch_program_runs_with_the_environment(tmp_path):
    model = ld.load("levit_128s", init="random")
    program = arm64._torch_program(model, tmp_path)
    reference = build_reference_set(model, noise=0, synthetic=0).subset(slice(0, 2))
    logits, report = arm64.run_worker(program, reference.inputs, arm64.Presets(runtime="torch", bf16_fast_math=True),
                                      None)
    assert report["versions"]["mkldnn_fpmath"] == "BF16"
    assert compare_outputs(reference.outputs, logits, "bf16", floors=reference.floors("bf16")).passed


@pytest.mark.slow
def test_native_bench_document(monkeypatch):
    monkeypatch.setattr(arm64, "is_native", lambda: True)
    doc = arm64.bench_arm64(["levit_128s"], init="random", duration=0.3, batch=2, status=lambda m: None)
    run = doc["runs"][0]
    assert doc["ok"] and doc["native"] and not run["emulated"] and run["timing"]["images_per_s"] > 0
    assert run["presets"]["threads"] == 1 and run["parity"]["precision"] == "fp32"
    assert "img/s" in arm64.format_arm64(doc)


def test_unsupported_requests_are_refused(monkeypatch):
    with pytest.raises(arm64.Arm64Error, match="not supported"):
        arm64.bench_arm64(["levit_128s"], arch="riscv64")
    monkeypatch.setattr(arm64, "is_native", lambda: False)
    with pytest.raises(arm64.Arm64Error, match="no emulated PyTorch"):
        arm64.bench_arm64(["levit_128s"], init="random", runtimes=["torch"])


needs_qemu = pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None or arm64.is_native(),
                                reason="emulated ARM parity needs qemu-aarch64-static (Debian package "
                                       "qemu-user-static) on a non-ARM host")


@needs_qemu
@pytest.mark.slow  # a minute under qemu; the native code path runs in the default suite
def test_emulated_arm64_parity_on_a_trained_like_checkpoint(trained_128s_path):
    result = runner.invoke(app, ["bench", str(trained_128s_path), "--runtime", "ort", "--arch", "arm64", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    run = doc["runs"][0]
    assert doc["ok"] and not doc["native"] and run["emulated"] is True and run["timing"] is None
    assert run["parity"]["passed"] and run["parity"]["precision"] == "fp32" and run["parity"]["worst_margin"] <= 1
    assert {k["kind"] for k in run["parity"]["kinds"]} == {"photos", "noise", "synthetic"}
    assert "asimd" in run["cpu"]["features"] and run["versions"]["onnxruntime"] == "1.24.4"
    text = runner.invoke(app, ["bench", str(trained_128s_path), "--arch", "arm64"])
    assert "emulated: true" in text.output and "PASS" in text.output and "photos 7/7" in text.output
