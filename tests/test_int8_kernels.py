"""Which int8 kernels an artifact runs on, and why the defaults are the exact ones.

On x86-64 without VNNI or AMX, uint8 × int8 kernels sum pairs of products in 16 bits (vpmaddubsw) and saturate:
2·255·127 = 64770 > 32767. ONNX Runtime's U8S8 MatMul does (tested below on one MatMul); its U8U8 kernels widen
first and do not. So on such a CPU the ONNX int8 artifact takes uint8 weights (-o int8_weights=auto), and the
OpenVINO one NNCF's overflow fix in every layer (7-bit weights, -o overflow_fix=auto); elsewhere the 8-bit weights
VNNI/AMX run fastest, and `parity` on a CPU that saturates them says so."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from levit_deploy import parity
from levit_deploy.backends import onnx as onnx_backend
from levit_deploy.backends.base import StagedArtifact
from levit_deploy.backends.onnx import OnnxOptions, fp32_onnx
from levit_deploy.backends.openvino import OpenVinoOptions
from levit_deploy.cli import app
from levit_deploy.env import cpu_info, int8_products_saturate

runner = CliRunner()
SATURATES_HERE = int8_products_saturate(cpu_info())


def one_quantized_matmul(weights: str) -> bytes:
    """QDQ graph of y = x · W with x = 1 quantized to uint8 255 and every weight at its largest code (int8 127 or
    uint8 255, scale 1/127 and 1/255: every product is 255·127 or 255·255 in integers), 64 inputs."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    code, dtype, scale = (127, np.int8, 1 / 127) if weights == "int8" else (255, np.uint8, 1 / 255)
    constants = [numpy_helper.from_array(np.array(1 / 255, np.float32), "x_scale"),
                 numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
                 numpy_helper.from_array(np.full((64, 8), code, dtype), "w_q"),
                 numpy_helper.from_array(np.array(scale, np.float32), "w_scale"),
                 numpy_helper.from_array(np.array(0, dtype), "w_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"]),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    graph = helper.make_graph(nodes, "one_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]).SerializeToString()


def run(model: bytes, fused: bool) -> np.ndarray:
    """The graph's output with ORT's int8 kernels (fused) or op by op as written (no graph optimisation)."""
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones((4, 64), np.float32)})[0]


def test_uint8_weights_compute_what_the_graph_says_on_every_cpu():
    model = one_quantized_matmul("uint8")
    assert np.allclose(run(model, fused=False), 64.0, rtol=1e-5)
    assert np.allclose(run(model, fused=True), run(model, fused=False), rtol=1e-5)


@pytest.mark.skipif(not SATURATES_HERE, reason="this CPU has VNNI or AMX (or is not x86-64): its U8S8 kernels do "
                                               "not saturate")
def test_uint8_by_int8_products_saturate_on_a_cpu_without_vnni():
    model = one_quantized_matmul("int8")
    assert np.allclose(run(model, fused=False), 64.0, rtol=1e-5)  # what the graph says
    assert run(model, fused=True).max() < 40  # measured 32.4: 32 pairs, each held at 32767 instead of 64770


def test_which_cpus_saturate():
    assert int8_products_saturate({"arch": "x86_64", "isa": ["avx2", "fma"]})
    assert int8_products_saturate({"arch": "x86_64", "isa": ["avx2", "avx512f"]})
    assert not int8_products_saturate({"arch": "x86_64", "isa": ["avx2", "avx512f", "avx512_vnni"]})
    assert not int8_products_saturate({"arch": "x86_64", "isa": ["avx2", "avx_vnni"]})
    assert not int8_products_saturate({"arch": "aarch64", "isa": ["asimd", "asimddp"]})


def test_the_note_says_when_this_cpu_saturates_what_the_gating_cpu_did_not(monkeypatch):
    """``int8_products_saturate`` stands in for two machines: this one (no argument) without VNNI, and the CPU an
    artifact was gated on, with or without it."""
    here_saturates = {"value": True}
    monkeypatch.setattr(parity, "int8_products_saturate",
                        lambda cpu=None: here_saturates["value"] if cpu is None else "avx512_vnni" not in cpu["isa"])
    u8s8 = {"kernels": {"weights": "int8", "saturate_without_vnni": True, "exact_with": "-o int8_weights=uint8"}}
    vnni, avx2 = {"arch": "x86_64", "isa": ["avx2", "avx512_vnni"]}, {"arch": "x86_64", "isa": ["avx2"]}
    assert "unlike on the CPU its export was gated on" in parity.saturation_note(u8s8, vnni)
    assert "unlike" not in parity.saturation_note(u8s8, avx2) and "-o int8_weights=uint8" in parity.saturation_note(u8s8)
    assert parity.saturation_note({"kernels": {**u8s8["kernels"], "saturate_without_vnni": False}}, vnni) is None
    assert parity.saturation_note({}, vnni) is None  # not an int8 artifact
    here_saturates["value"] = False
    assert parity.saturation_note(u8s8, vnni) is None


def test_the_kernels_are_chosen_for_the_cpu_and_other_values_are_one_line(tmp_path):
    assert OnnxOptions().int8_weights == "auto" and OpenVinoOptions().overflow_fix == "auto"
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "onnx", "--precision", "int8",
                                 "-o", "int8_weights=int4", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "int8_weights must be one of auto, uint8, int8, got 'int4'" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # one ORT int8 quantization of the yardstick (~45 s); `make test-all` runs it
@pytest.mark.skipif(not SATURATES_HERE, reason="this CPU has VNNI or AMX: U8S8 does not saturate here")
def test_a_refusal_on_a_saturating_cpu_names_the_exact_kernels(in_distribution, tmp_path):
    result = runner.invoke(app, ["export", str(in_distribution / "levit_128s_in_distribution.pth"), "--to", "onnx",
                                 "--precision", "int8", "--calib", str(in_distribution / "calib"), "--images",
                                 str(in_distribution / "images"), "-o", "int8_weights=int8", "-o",
                                 "max_float_fraction=0", "--out", str(tmp_path / "x"), "--json"])
    assert result.exit_code == 1, result.output
    notes = json.loads(result.stdout)["parity"]["notes"]
    assert any("saturate its int8 kernels here; for kernels exact on every CPU, export with -o int8_weights=uint8" in n
               for n in notes), notes


@pytest.mark.slow  # one int8 export (~45 s); `make test-all` runs it
@pytest.mark.skipif(not SATURATES_HERE, reason="this CPU has VNNI or AMX: U8S8 does not saturate here")
def test_parity_says_when_this_cpu_saturates_an_artifacts_kernels(tmp_path, int8_photos):
    """Seeded LeViT-128S (well conditioned enough to pass with saturated kernels) exported with U8S8 on purpose:
    auto takes uint8 here, and both the manifest and a later `parity` on this CPU say what int8 weights mean."""
    calib, judge = int8_photos
    out = tmp_path / "u8s8"
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "onnx", "--precision", "int8",
                                 "--calib", str(calib), "--images", str(judge), "-o", "int8_weights=int8", "--out",
                                 str(out)])
    assert result.exit_code == 0, result.output
    kernels = json.loads((out / "manifest.json").read_text())["artifact"]["quantization"]["kernels"]
    assert kernels["weights"] == "int8" and kernels["saturate_without_vnni"]
    result = runner.invoke(app, ["parity", str(out), "--json"])
    notes = json.loads(result.stdout)["chain"][-1]["notes"]
    note = "saturate its int8 kernels here; for kernels exact on every CPU, export with -o int8_weights=uint8"
    assert any(note in n for n in notes), notes  # gated on this same CPU: no "unlike on the CPU …"


def test_one_search_writes_the_fp32_graph_once(tmp_path, monkeypatch):
    """Every attempt of an int8 search quantizes the same fp32 graph: with the export's scratch folder it is written
    for the first and read back for the others; without one it is written each time into a folder removed after."""
    written = []

    def fake_write_onnx(model, folder, precision, batch, options):
        written.append(folder)
        (folder / "model.onnx").write_bytes(b"graph")
        return StagedArtifact(file="model.onnx", details={"opset": 20}, notes=["a note"])

    monkeypatch.setattr(onnx_backend, "write_onnx", fake_write_onnx)

    class Opts:
        batch, scratch = "dynamic", tmp_path

    for _ in range(3):
        with fp32_onnx(None, Opts()) as (path, staged):
            assert path.read_bytes() == b"graph" and staged.details == {"opset": 20} and staged.notes == ["a note"]
    assert len(written) == 1
    Opts.scratch = None
    with fp32_onnx(None, Opts()) as (path, _):
        assert path.parent != tmp_path / "fp32-onnx"
    assert len(written) == 2 and not path.exists()
