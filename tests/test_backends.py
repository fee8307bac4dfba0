"""The backend registry, typed target options, the runtime shape, and a backend added from outside."""
import dataclasses
import json
import os
import stat
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy.backends.base import StagedArtifact
from levit_deploy.backends import (Backend, ExportError, InputSpec, Runtime, backends, by_runtime, get_backend,
                                   installed_runtimes, open_runtime, targets)
from levit_deploy.backends.onnx import OrtRuntime
from levit_deploy.cli import app
from levit_deploy.reference import build_reference_set

runner = CliRunner()


def test_registry_answers_what_exists_what_runs_here_and_what_a_target_takes():
    assert targets() == ["onnx", "openvino", "coreml", "tensorrt", "executorch"]
    assert by_runtime("ort").name == "onnx" and get_backend("openvino").runtime == "openvino"
    assert "torch" in installed_runtimes() and "ort" in installed_runtimes()
    assert ("coreml" in installed_runtimes()) == (os.uname().sysname == "Darwin")
    onnx = get_backend("onnx")
    assert onnx.parse_options({"opset": "17", "simplify": "false"}) == onnx.options(opset=17, simplify=False)
    assert get_backend("coreml").parse_options({"image_input": "yes"}).image_input is True
    with pytest.raises(ExportError, match="image_input: not an option of the onnx target; it takes int8_weights, "
                                          "keep_float, max_float_fraction, opset, simplify"):
        onnx.parse_options({"image_input": "true"})
    with pytest.raises(ExportError, match="'seventeen' is not an integer"):
        onnx.parse_options({"opset": "seventeen"})
    with pytest.raises(ExportError, match="opset: not an option of the openvino target; it takes float_compute, "
                                          "keep_float, max_float_fraction, overflow_fix"):
        get_backend("openvino").parse_options({"opset": 17})
    assert get_backend("openvino").parse_options({"max_float_fraction": "0.1"}).max_float_fraction == 0.1
    with pytest.raises(ExportError, match="unknown export target 'tflite'"):
        get_backend("tflite")


def test_an_option_the_target_does_not_take_is_refused_not_dropped(tmp_path):
    model = ld.load("levit_128s", init="random")
    with pytest.raises(ExportError, match="max_batch: not an option of the onnx target"):
        ld.export(model, "onnx", tmp_path / "a", max_batch=8)
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "openvino", "-o", "opset=17",
                                 "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "opset: not an option of the openvino target" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "b").exists()
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "onnx", "-o", "opset"])
    assert result.exit_code == 2 and "--option takes KEY=VALUE" in result.output


def test_backends_command_lists_targets_runtimes_and_options():
    result = runner.invoke(app, ["backends", "--json"])
    assert result.exit_code == 0
    rows = {r["runtime"]: r for r in json.loads(result.stdout)["backends"]}
    assert rows["ort"]["target"] == "onnx" and rows["ort"]["usable_here"] and rows["ort"]["extra"] == "onnx"
    assert rows["torch"]["target"] is None and rows["tensorrt"]["needs"] == "gpu"
    assert any(o.startswith("max_batch (int, default 256)") for o in rows["tensorrt"]["options"])
    text = runner.invoke(app, ["backends"]).output
    assert "coreml options (-o KEY=VALUE):" in text and "levit-deploy[openvino]" in text


def test_runtime_construction_is_cheap_and_infer_checks_its_input(tmp_path):
    rt = OrtRuntime(tmp_path / "missing.onnx")  # nothing is opened yet
    assert not rt.active
    with pytest.raises(Exception, match="missing.onnx"):
        rt.activate()
    model = ld.load("levit_128s", init="random")
    art = ld.export(model, "onnx", tmp_path / "b2", batch=2,
                    reference=build_reference_set(model, photos=False, noise=2, synthetic=0))
    with open_runtime(art.folder) as rt:
        assert rt.input_spec == InputSpec(size=224, batch=2) and rt.active
        assert rt.infer(np.zeros((2, 3, 224, 224), np.float64)).shape == (2, 1000)  # cast to float32
        with pytest.raises(ValueError, match="fixed batch of 2, got a batch of 3"):
            rt.infer(np.zeros((3, 3, 224, 224), np.float32))
        with pytest.raises(ValueError, match=r"shape \(B, 3, 224, 224\)|shape \(2, 3, 224, 224\)"):
            rt.infer(np.zeros((2, 3, 256, 256), np.float32))
    assert not rt.active  # closed on exit


def test_every_file_of_an_artifact_gets_the_same_mode(tmp_path):
    model = ld.load("levit_128s", init="random")
    art = ld.export(model, "openvino", tmp_path / "ov",
                    reference=build_reference_set(model, photos=False, noise=2, synthetic=0))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in art.folder.iterdir()}
    assert set(modes) == {"model.xml", "model.bin", "manifest.json"}
    assert len(set(modes.values())) == 1 and modes["manifest.json"] & stat.S_IROTH  # readable by others


# --- a backend added from outside: one descriptor, registered, and every command takes it --------------

@dataclass
class ProgramOptions:
    strict: bool = field(default=False, metadata={"help": "torch.export strict mode"})


def write_program(model, staging, opts) -> StagedArtifact:
    batch = torch.export.Dim("batch", min=1, max=64) if opts.batch == "dynamic" else None
    x = torch.randn(2 if batch else int(opts.batch), 3, 224, 224)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}} if batch else None,
                                  strict=opts.target.strict)
    torch.export.save(program, str(staging / "model.pt2"))
    return StagedArtifact(file="model.pt2", details={"nodes": len(program.graph.nodes)})


class ProgramRuntime(Runtime):
    name = "program"

    def _open(self):
        self.module = torch.export.load(self.path).module()

    @torch.no_grad()
    def _infer(self, x):
        return self.module(torch.from_numpy(x)).numpy()


PROGRAM = Backend(name="pt2", runtime="program", description="a torch.export program (test backend)",
                  runtime_class=ProgramRuntime, suffixes=(".pt2",), precisions=("fp32",), options=ProgramOptions,
                  write=write_program)


@pytest.fixture()
def with_program_backend(monkeypatch):
    monkeypatch.setitem(backends(), "pt2", PROGRAM)
    return PROGRAM


@pytest.mark.slow
def test_a_new_backend_is_one_descriptor_and_every_command_takes_it(with_program_backend, tmp_path, trained_128s_path):
    out = tmp_path / "pt2"
    result = runner.invoke(app, ["export", str(trained_128s_path), "--to", "pt2", "-o", "strict=false", "--out",
                                 str(out), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["artifact"]["runtime"] == "program" and manifest["parity"]["status"] == "passed"
    assert manifest["export"]["options"] == {"strict": False}
    result = runner.invoke(app, ["parity", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["chain"][-1]["stage"].startswith("program: ")
    photo = ld.preprocess.bundled_photos()[0]
    result = runner.invoke(app, ["predict", str(photo), "--model", str(trained_128s_path), "--runtime", "program",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["ok"]
    result = runner.invoke(app, ["bench", "levit_128s", "--init", "random", "-r", "program", "--batch", "2",
                                 "--duration", "0.3", "--warmup", "0.1", "--json"])
    assert result.exit_code == 0, result.output
    labels = [r["label"] for r in json.loads(result.stdout)["results"]]
    assert labels == ["torch unfused (eager)", "program levit-deploy"]
    assert "pt2" in [r["target"] for r in json.loads(runner.invoke(app, ["backends", "--json"]).stdout)["backends"]]


def test_a_backend_without_a_target_option_class_refuses_options():
    bare = dataclasses.replace(PROGRAM, options=None)
    assert bare.parse_options({}) is None and bare.option_help() == []
