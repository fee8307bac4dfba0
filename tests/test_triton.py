"""Triton model repositories: layout, and every generated config.pbtxt parsed with Triton's own protobuf schema."""
import copy
import json

import pytest
from typer.testing import CliRunner

from conftest import copy_artifact
from levit_deploy.cli import app
from levit_deploy.triton import TritonError, TritonOptions, config_text, write_repository

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient not installed: pip install "
                         "'levit-deploy[triton]'")
from google.protobuf import text_format  # noqa: E402

runner = CliRunner()


def parse(text: str):
    return text_format.Parse(text, pb.ModelConfig())


@pytest.mark.parametrize("target, field, value, files", [
    ("onnx", "platform", "onnxruntime_onnx", {"model.onnx"}),
    ("openvino", "backend", "openvino", {"model.xml", "model.bin"}),
])
def test_repository_of_an_artifact_parses_with_tritons_schema(tmp_path, artifact_128s, target, field, value, files):
    result = runner.invoke(app, ["triton", str(artifact_128s(target).folder), "--repo", str(tmp_path / "repo"),
                                 "--max-batch", "16", "--instances", "2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema_checked"]
    model = tmp_path / "repo" / f"levit_128s_{target}"
    config = parse((model / "config.pbtxt").read_text())
    assert getattr(config, field) == value and config.name == f"levit_128s_{target}"
    assert config.max_batch_size == 16 and list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert list(config.input[0].dims) == [3, 224, 224] and config.input[0].data_type == pb.TYPE_FP32
    assert list(config.output[0].dims) == [1000] and config.output[0].label_filename == "labels.txt"
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert {p.name for p in (model / "1").iterdir()} == files
    labels = (model / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0] == "tench"
    if target == "openvino":
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params == {"INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}


def test_export_adds_to_a_repository_and_a_rewrite_replaces_the_model_whole(tmp_path, artifact_128s):
    repo = tmp_path / "repo"
    first = write_repository(artifact_128s("onnx").folder, repo, TritonOptions(name="levit"))
    (first / "stale.txt").write_text("from before")
    again = write_repository(artifact_128s("onnx").folder, repo, TritonOptions(name="levit", max_batch=4))
    assert again == first and not (again / "stale.txt").exists()
    assert parse((again / "config.pbtxt").read_text()).max_batch_size == 4
    assert sorted(p.name for p in repo.iterdir()) == ["levit"]  # no staging or old folders left behind


@pytest.mark.slow  # an export (19 s); the repository tests above run in make test
def test_export_with_triton_repo_adds_the_gated_artifact_and_refuses_a_format_triton_cannot_serve(tmp_path):
    repo = tmp_path / "repo"
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "onnx", "--out",
                                 str(tmp_path / "onnx"), "--triton-repo", str(repo), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    model = repo / "levit_128s_onnx"
    assert doc["triton_model"] == str(model) and doc["manifest"]["parity"]["status"] == "passed"
    assert parse((model / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"
    assert (model / "1" / "model.onnx").read_bytes() == (tmp_path / "onnx" / "model.onnx").read_bytes()
    # refused before anything is loaded or exported
    refused = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "coreml", "--out",
                                  str(tmp_path / "ml"), "--triton-repo", str(tmp_path / "repo2")])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert [line for line in refused.output.splitlines() if line.startswith("error:")] == [
        "error: Triton has no backend for coreml artifacts; export --to onnx, openvino or tensorrt"]
    assert not (tmp_path / "ml").exists() and not (tmp_path / "repo2").exists()


def test_a_failed_replacement_puts_the_working_model_back(tmp_path, artifact_128s, monkeypatch):
    from pathlib import Path

    repo = tmp_path / "repo"
    first = write_repository(artifact_128s("onnx").folder, repo, TritonOptions(name="levit"))
    before = (first / "config.pbtxt").read_text()
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".levit-") and "replaced" not in self.name:  # the staged model moving into place
            raise OSError("disk full")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        write_repository(artifact_128s("onnx").folder, repo, TritonOptions(name="levit", max_batch=4))
    assert (first / "config.pbtxt").read_text() == before and sorted(p.name for p in repo.iterdir()) == ["levit"]


def test_a_tampered_artifact_or_a_format_triton_cannot_serve_is_one_line(tmp_path, artifact_128s):
    bad = copy_artifact(artifact_128s("onnx"), tmp_path / "bad")
    with open(bad / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    result = runner.invoke(app, ["triton", str(bad), "--repo", str(tmp_path / "repo")])
    assert result.exit_code == 2 and "sha256" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "repo" / "levit_128s_onnx").exists()
    manifest = copy.deepcopy(artifact_128s("onnx").manifest)
    manifest["artifact"]["format"] = "coreml"
    with pytest.raises(TritonError, match="Triton has no backend for coreml artifacts"):
        config_text(manifest, "m", TritonOptions(), "labels.txt")


def test_tensorrt_and_fixed_batch_configs_parse(artifact_128s):
    manifest = copy.deepcopy(artifact_128s("onnx").manifest)
    manifest["artifact"]["format"] = "tensorrt"
    trt = parse(config_text(manifest, "levit_trt", TritonOptions(max_batch=64), "labels.txt"))
    assert trt.platform == "tensorrt_plan" and trt.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert trt.max_batch_size == 64 and list(trt.dynamic_batching.preferred_batch_size) == [8, 16]
    manifest["artifact"]["format"] = "onnx"
    manifest["input"]["shape"][0] = 4
    fixed = parse(config_text(manifest, "levit_b4", TritonOptions(), "labels.txt"))
    assert fixed.max_batch_size == 0 and list(fixed.input[0].dims) == [4, 3, 224, 224]
    assert list(fixed.output[0].dims) == [4, 1000] and not fixed.HasField("dynamic_batching")
