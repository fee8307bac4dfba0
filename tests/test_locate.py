"""`parity --locate`: a fault injected into one parameter of unit k of a shipped artifact is named, a correct artifact
names nothing, the shipped files are only read, and the bisection stays within ceil(log2 N) + 2 prefix runs."""
import hashlib
import json
import math
import platform
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
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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


def scale_stored_bias(folder: Path, file: str, unit: str) -> str:
    """Scale the first fp32 bias of ``unit`` in ``file``, in place: found by its bytes, which ExecuTorch (XNNPACK)
    and Core ML store as they are (a .pte keeps the key it had, the sha256 of the original bytes); returns its
    name."""
    from levit_deploy.checkpoints import resolve
    from levit_deploy.fuse import fuse

    data = bytearray((folder / file).read_bytes())
    for name, param in fuse(resolve(folder).model(), check=False).named_parameters():
        stored = param.detach().numpy().astype(np.float32).tobytes()
        if name.startswith(unit + ".") and name.endswith(".bias") and data.count(stored) == 1:
            at = data.find(stored)
            data[at:at + len(stored)] = (np.frombuffer(stored, np.float32) * np.float32(FAULT)).tobytes()
            (folder / file).write_bytes(bytes(data))
            return name
    raise AssertionError(f"no bias of {unit} found once in {file}")


TAMPER = {"onnx": tamper_onnx, "openvino": tamper_openvino,
          "executorch": lambda folder, unit: scale_stored_bias(folder, "model.pte", unit),
          "coreml": lambda folder, unit: scale_stored_bias(
              folder, "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin", unit)}
MACOS = pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML predicts only on macOS (the package's "
                           "graph is read and cut here: test_a_core_ml_package_is_mapped_and_cut_without_macos)")
#: the unit each family's fault goes into: one in the middle of the chain
FAULTY_UNIT = {"levit_128s": "stages.9", "lightvit_tiny": "stages.1.3", "litv2_s": "layers.2.blocks.1"}
CASES = [pytest.param("levit_128s", "onnx", marks=pytest.mark.slow),  # ~50 s each: make test-all
         pytest.param("levit_128s", "openvino", marks=pytest.mark.slow),
         pytest.param("lightvit_tiny", "onnx", marks=pytest.mark.slow),
         pytest.param("lightvit_tiny", "openvino", marks=pytest.mark.slow),
         pytest.param("litv2_s", "onnx", marks=pytest.mark.slow),
         pytest.param("litv2_s", "openvino", marks=pytest.mark.slow),
         pytest.param("levit_128s", "executorch", marks=pytest.mark.slow),  # ~3 min: prefixes are lowered again
         pytest.param("levit_128s", "coreml", marks=[pytest.mark.slow, MACOS])]


@pytest.mark.parametrize("variant,target", CASES)
def test_a_fault_in_one_unit_is_named_and_the_files_are_only_read(variant, target, artifacts, tmp_path):
    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino", "executorch": "executorch.runtime",
                         "coreml": "coremltools"}[target])
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


def test_an_int8_executorch_program_is_not_probed_and_says_why(tmp_path):
    """A prefix of an int8 program would be calibrated again: locate refuses it rather than examine another one."""
    pytest.importorskip("executorch.runtime")
    from levit_deploy.backends.executorch import ExecutorchProbe
    from levit_deploy.probe import LocateError

    manifest = {"export": {"precision": "int8", "batch": "dynamic", "options": {}}, "artifact": {"file": "model.pte"}}
    with pytest.raises(LocateError, match="fp32 programs, this one is int8"):
        ExecutorchProbe(tmp_path, manifest, None)


def test_a_core_ml_package_is_mapped_and_cut_without_macos(artifacts):
    """Off macOS Core ML cannot predict, but its probe can: every unit of the shipped program is found by its
    constants, and a prefix cut at a unit is a package coremltools writes, with the cut as its only output."""
    ct = pytest.importorskip("coremltools")
    from levit_deploy.backends.coreml import CoremlProbe
    from levit_deploy.checkpoints import resolve
    from levit_deploy.families import family_of
    from levit_deploy.fuse import fuse
    from levit_deploy.locate import cuts, units_in_order

    shipped = artifacts("levit_128s", "coreml")
    before = file_hashes(shipped.folder)
    model = resolve(shipped.folder).model()
    deploy = fuse(model, check=False)
    probe = CoremlProbe(shipped.folder, shipped.manifest, deploy)
    units = units_in_order(deploy, family_of(model).locate_units, model.config.img_size)
    found, unmapped = cuts(probe.graph(), units)
    assert not unmapped and [c.unit for c in found] == units
    cut = found[len(found) // 2]
    spec = probe.prefix(cut.tensors)
    assert [o.name for o in spec.description.output] == cut.tensors
    weights = ct.models.MLModel(str(shipped.path), skip_model_load=True).weights_dir
    saved = ct.models.MLModel(spec, weights_dir=weights, skip_model_load=True)
    operations = probe._block(saved.get_spec())[1].operations
    assert 0 < len(operations) < len(probe._block(probe.spec)[1].operations)
    assert file_hashes(shipped.folder) == before


def test_prefix_values_are_gathered_per_image_across_chunks_and_padding():
    """Every probe runs its prefix through run_in_chunks: a value that folds the batch into rows comes back one row
    per image, and a fixed-batch program's padding never reaches the result."""
    from levit_deploy.probe import run_in_chunks

    inputs = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    calls = []

    def program(chunk):  # a fixed batch of 4; its second value folds (B, 3 tokens, 2) into (B·3, 2) rows
        calls.append(len(chunk))
        assert len(chunk) == 4
        return [chunk * 2, np.repeat(chunk[:, None, :], 3, axis=1).reshape(-1, 2)]

    doubled, folded = run_in_chunks(program, inputs, 4, pad=True)
    assert calls == [4, 4]
    np.testing.assert_array_equal(doubled, inputs * 2)
    assert folded.shape == (5, 6) and np.array_equal(folded[4], np.tile(inputs[4], 3))
