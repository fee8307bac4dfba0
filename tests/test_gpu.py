"""GPU paths: TensorRT, the torch runtime on CUDA, bench --device cuda; clear errors without them."""
import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy.cli import app
from levit_deploy.parity import build_reference_set, compare, random_inputs
from levit_deploy.backends import RuntimeUnavailable

runner = CliRunner()
HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def needs_cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU visible to PyTorch "
                                                                   "(CUDA build)")(test))


def needs_trt(test):
    return pytest.mark.gpu(pytest.mark.skipif(not (HAS_CUDA and HAS_TRT), reason="needs an NVIDIA GPU and the "
                                              "tensorrt package (pip install 'levit-deploy[tensorrt]')")(test))


@pytest.fixture(scope="module")
def model():
    return ld.load("levit_128s", init="random")


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when tensorrt is missing")
def test_tensorrt_export_without_tensorrt_is_one_line(tmp_path):
    out = tmp_path / "trt"
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "tensorrt", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()  # nothing left behind
    line = [l for l in result.output.splitlines() if l.startswith("error:")][0]
    assert "pip install 'levit-deploy[tensorrt]'" in line


@pytest.mark.skipif(HAS_CUDA, reason="checks the message shown without a GPU")
def test_gpu_requests_without_gpu_are_refused_clearly(model, tmp_path):
    with pytest.raises(RuntimeUnavailable, match="no CUDA GPU"):
        ld.open_runtime(model, "torch", device="cuda").activate()
    art = ld.export(model, "onnx", tmp_path)
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeUnavailable, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
            ld.open_runtime(art.folder, device="cuda").activate()


@needs_cuda
@pytest.mark.parametrize("precision,graph", [("fp32", False), ("fp16", False), ("bf16", False), ("fp16", True)])
def test_torch_runtime_on_cuda(model, precision, graph):
    reference = build_reference_set(model)
    with ld.open_runtime(ld.fuse(model), "torch", device="cuda", compute=precision, cuda_graph=graph) as rt:
        report = compare(reference, rt, precision)
        assert report.passed, report.summary()
        x = torch.from_numpy(reference.inputs).cuda()
        assert rt.infer(x).is_cuda  # device-resident path used by the benchmark


@needs_cuda
def test_bench_cuda_finds_largest_power_of_two_batch():
    result = runner.invoke(app, ["bench", "levit_128s", "--init", "random", "--device", "cuda", "-r", "torch",
                                 "--duration", "2", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    batch = doc["protocol"]["batch"]
    assert batch >= 64 and batch & (batch - 1) == 0 and doc["protocol"]["precision"] == "fp16"
    assert all(r["images_per_s"] for r in doc["results"])


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_export_and_runtime(model, tmp_path, precision):
    art = ld.export(model, "tensorrt", tmp_path, precision=precision, max_batch=64, opt_batch=16)
    m = art.manifest
    assert m["parity"]["status"] == "passed" and m["artifact"]["gpu"] == torch.cuda.get_device_name(0)
    assert m["artifact"]["profile"] == {"min": 1, "opt": 16, "max": 64}
    with ld.open_runtime(tmp_path) as rt:
        for b in (1, 7, 64):
            assert rt.infer(random_inputs(b)).shape == (b, 1000)
        with pytest.raises(ValueError, match="outside the engine's profile"):
            rt.infer(random_inputs(65))


@needs_trt
def test_tensorrt_engine_refused_on_another_gpu(model, tmp_path):
    ld.export(model, "tensorrt", tmp_path, max_batch=8, opt_batch=8)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    with pytest.raises(RuntimeUnavailable, match="Engines are not portable"):
        from levit_deploy.backends.tensorrt import TensorRtRuntime
        TensorRtRuntime(str(tmp_path / "model.engine"), built_for={"gpu": "Other GPU", "tensorrt": "0"}).activate()
    assert manifest["artifact"]["runtime_options"]["built_for"]["gpu"]
