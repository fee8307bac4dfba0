"""GPU paths: TensorRT, the torch runtime on CUDA, bench --device cuda; clear errors without them."""
import importlib.util
import json
import types

import pytest
import torch
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy.cli import app
from levit_deploy.parity import compare
from levit_deploy.reference import build_reference_set, random_inputs
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


def fake_tensorrt(version: str, drop: str | None = None, strongly_typed: bool = True):
    """A stand-in tensorrt module holding exactly the names the backend uses (minus ``drop``)."""
    from levit_deploy.backends.tensorrt import USED_NAMES

    root = types.SimpleNamespace(__version__=version)
    for name in USED_NAMES + ("NetworkDefinitionCreationFlag",):
        if name == drop:
            continue
        obj = root
        for part in name.split("."):
            if not hasattr(obj, part):
                setattr(obj, part, types.SimpleNamespace())
            obj = getattr(obj, part)
    if strongly_typed:
        root.NetworkDefinitionCreationFlag.STRONGLY_TYPED = 0
    return root


def test_tensorrt_api_drift_is_one_line_naming_what_is_missing():
    """Runs without TensorRT: the check itself, against stand-ins for 10.x, 11.x and a future 12."""
    from levit_deploy.backends.tensorrt import check_api, strongly_typed_flags

    check_api(fake_tensorrt("11.4.0.106"))
    check_api(fake_tensorrt("10.13.3"))
    with pytest.raises(RuntimeUnavailable, match=r"TensorRT 11\.4\.0 lacks IExecutionContext\.execute_async_v3, "
                                                 r"which levit-deploy's TensorRT backend uses"):
        check_api(fake_tensorrt("11.4.0", drop="IExecutionContext.execute_async_v3"))
    with pytest.raises(RuntimeUnavailable, match="lacks NetworkDefinitionCreationFlag.STRONGLY_TYPED"):
        check_api(fake_tensorrt("10.0.1", strongly_typed=False))
    with pytest.raises(RuntimeUnavailable, match=r"TensorRT 12\.0 is installed; levit-deploy supports TensorRT 10\.x "
                                                 r"and 11\.x: pip install 'tensorrt>=10,<12'"):
        check_api(fake_tensorrt("12.0"))
    assert strongly_typed_flags(fake_tensorrt("10.13.3")) == 1 and strongly_typed_flags(fake_tensorrt("11.4.0")) == 0


@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed: pip install 'levit-deploy[tensorrt]' (its "
                                        "libraries download from pypi.nvidia.com), then run pytest tests/test_gpu.py")
def test_every_tensorrt_name_we_use_exists_in_the_installed_tensorrt():
    import tensorrt as trt

    from levit_deploy.backends.tensorrt import check_api

    check_api(trt)  # raises, naming them, if any is missing
    if int(trt.__version__.split(".")[0]) >= 11:
        assert not hasattr(trt.BuilderFlag, "FP16")  # weak typing really is gone: we must not need it


@pytest.mark.skipif(not HAS_TRT or HAS_CUDA, reason="needs the tensorrt package on a machine without a GPU")
def test_tensorrt_export_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "trt"
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "tensorrt", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NVIDIA GPU" in errors[0] and "Traceback" not in result.output


@pytest.mark.skipif(HAS_CUDA, reason="checks the message shown without a GPU")
@pytest.mark.slow  # 16 s of refusals; make test-all
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


@needs_trt
def test_tensorrt_locate_names_the_unit_a_faulty_build_departs_at(model, tmp_path, monkeypatch):
    """An engine cannot be cut, so its probe rebuilds prefixes from the fused ONNX graph with the shipped engine's
    configuration: a converter fault in stages.6 (one tensor mis-scaled on its way into the graph, in the export
    and in every rebuild alike) is named, within ceil(log2 N) + 1 prefix runs."""
    import levit_deploy.backends.onnx as onnx_exporter
    from levit_deploy.export import ExportParityError

    real = onnx_exporter._torch_export

    def converter_bug(deploy, *args, **kwargs):
        with torch.no_grad():
            next(deploy.get_submodule("stages.6").parameters()).mul_(1.5)
        real(deploy, *args, **kwargs)
        with torch.no_grad():
            next(deploy.get_submodule("stages.6").parameters()).div_(1.5)

    monkeypatch.setattr(onnx_exporter, "_torch_export", converter_bug)
    with pytest.raises(ExportParityError, match="first diverges after stages.6") as refused:
        ld.export(model, "tensorrt", tmp_path, max_batch=16, opt_batch=16, locate_on_fail=True)
    located = refused.value.located
    assert located["first_divergent"]["module"] == "stages.6"
    assert located["prefix_runs"] <= located["max_runs"]
