"""`parity --locate`: a fault injected into one parameter of unit k of a shipped artifact is named, a correct artifact
names nothing, the shipped files are only read, and the bisection stays within ceil(log2 N) + 2 prefix runs."""
import hashlib
import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from typer.testing import CliRunner

from levit_deploy.cli import app
from levit_deploy.locate import locate

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

FAULT = 1.5  # the parameter scaled by this: a converter that mis-scaled one tensor


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def rehash(folder: Path) -> None:
    """Rewrite the manifest's hashes, so that the gate and not the tamper check refuses the artifact."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["artifact"]["files"]:
        manifest["artifact"]["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def tamper_onnx(folder: Path, unit: str) -> str:
    """Scale the first parameter of ``unit`` in model.onnx that kept its name (the exporter folds transposed
    weights into new constants; biases keep theirs); returns its name."""
    model = onnx.load(str(folder / "model.onnx"))
    init = next(i for i in model.graph.initializer if i.name.startswith(unit + ".") and i.name.endswith(
        (".weight", ".bias")))
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * np.float32(FAULT), init.name))
    onnx.save(model, str(folder / "model.onnx"))
    return init.name


def tamper_openvino(folder: Path, unit: str) -> str:
    """Scale the first weight constant of ``unit`` in model.bin, in place; returns its name."""
    layers = ET.parse(folder / "model.xml").getroot().iter("layer")
    layer = next(la for la in layers if la.get("type") == "Const" and la.get("name").startswith(unit + ".")
                 and la.get("name").endswith(".weight"))
    data = layer.find("data")
    dtype = {"f32": np.float32, "f16": np.float16}[data.get("element_type")]
    offset, size = int(data.get("offset")), int(data.get("size"))
    with open(folder / "model.bin", "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(size), dtype=dtype) * dtype(FAULT)
        f.seek(offset)
        f.write(values.astype(dtype).tobytes())
    return layer.get("name")


TAMPER = {"onnx": tamper_onnx, "openvino": tamper_openvino}
#: the unit each family's fault goes into: one in the middle of the chain
FAULTY_UNIT = {"levit_128s": "stages.9", "lightvit_tiny": "stages.1.3", "litv2_s": "layers.2.blocks.1"}
CASES = [pytest.param("levit_128s", "onnx", marks=pytest.mark.slow),  # ~50 s each: make test-all
         pytest.param("levit_128s", "openvino", marks=pytest.mark.slow),
         pytest.param("lightvit_tiny", "onnx", marks=pytest.mark.slow),
         pytest.param("lightvit_tiny", "openvino", marks=pytest.mark.slow),
         pytest.param("litv2_s", "onnx", marks=pytest.mark.slow),
         pytest.param("litv2_s", "openvino", marks=pytest.mark.slow)]


@pytest.mark.parametrize("variant,target", CASES)
def test_a_fault_in_one_unit_is_named_and_the_files_are_only_read(variant, target, artifacts, tmp_path):
    if target == "openvino":
        pytest.importorskip("openvino")
    shipped = artifacts(variant, target).folder
    before = file_hashes(shipped)
    correct = locate(shipped)
    assert correct.output.passed and correct.first_divergent is None
    assert file_hashes(shipped) == before

    broken = tmp_path / "broken"
    shutil.copytree(shipped, broken)
    unit = FAULTY_UNIT[variant]
    TAMPER[target](broken, unit)
    rehash(broken)
    tampered = file_hashes(broken)
    report = locate(broken)
    assert not report.output.passed  # the gate refuses it
    named = report.first_divergent.unit
    assert named == unit or unit.startswith(named + ".") or named.startswith(unit + "."), (named, report.to_dict())
    assert report.prefix_runs <= math.ceil(math.log2(report.units)) + 2
    assert file_hashes(broken) == tampered
    before_unit = [c for c in report.checked if c.passed]
    assert all(c.worst_e_over_bound <= 1 for c in before_unit)
    if (variant, target) == ("levit_128s", "onnx"):  # the command: JSON, exit codes
        result = CliRunner().invoke(app, ["parity", str(broken), "--locate", "--json"])
        assert result.exit_code == 1, result.output
        located = json.loads(result.stdout)["locate"]
        assert located["first_divergent"]["module"] == named and located["checked"]
        assert CliRunner().invoke(app, ["parity", str(shipped), "--locate", "--json"]).exit_code == 0


@pytest.mark.slow
def test_an_export_the_gate_refuses_names_where_it_diverges_with_locate_on_fail(tmp_path, monkeypatch):
    import torch

    import levit_deploy as ld
    import levit_deploy.backends.onnx as onnx_exporter
    from levit_deploy.export import ExportParityError

    real = onnx_exporter._torch_export

    def converter_bug(deploy, *args, **kwargs):  # one tensor of stages.6 mis-scaled on the way into the graph
        with torch.no_grad():
            next(deploy.get_submodule("stages.6").parameters()).mul_(FAULT)
        real(deploy, *args, **kwargs)

    monkeypatch.setattr(onnx_exporter, "_torch_export", converter_bug)
    model = ld.load("levit_128s", init="random", seed=1)
    with pytest.raises(ExportParityError, match="--locate-on-fail"):
        ld.export(model, "onnx", tmp_path / "plain")
    with pytest.raises(ExportParityError, match="first diverges after stages.6") as refused:
        ld.export(model, "onnx", tmp_path / "located", locate_on_fail=True)
    assert refused.value.located["first_divergent"]["module"] == "stages.6"
    report = json.loads((tmp_path / "located" / "parity-failed-onnx.json").read_text())
    assert report["locate"]["first_divergent"]["module"] == "stages.6"
    assert sorted(p.name for p in (tmp_path / "located").iterdir()) == ["parity-failed-onnx.json"]


def test_int8_layers_are_ranked_by_their_error_contribution(model_128s):
    """The int8 table's ranking: the quantized layers the manifest lists, most harmful first, on decoded images."""
    from levit_deploy.fuse import fuse
    from levit_deploy.locate import _int8_ranking
    from levit_deploy.reference import build_reference_set

    deploy = fuse(model_128s, check=False)
    layers = ["head.linear", "stages.0.inner.qkv", "stages.12.kv"]
    reference = build_reference_set(model_128s, noise=1, synthetic=0)
    ranking = _int8_ranking({"artifact": {"quantization": {"layers": layers}}}, deploy, reference, lambda _: None)
    assert sorted(name for name, _ in ranking) == sorted(layers)
    scores = [score for _, score in ranking]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert _int8_ranking({"artifact": {}}, deploy, reference, lambda _: None) == []
