"""int8 with a remedy (issue 30): the floor-relative int8 gate, per-layer sensitivity, the search for the fewest
layers kept in float, and recipes that replay.

Accuracy claims here are measured on the shared *in-distribution* LeViT-128S yardstick
(../shared/checkpoints/in_distribution: BatchNorm statistics and heads from augmented photo crops; calibrated on
its calib/ crops, judged on its other images/ crops) unless a test says otherwise.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy.backends.openvino import OpenVinoRuntime
from levit_deploy.cli import app
from levit_deploy.env import cpu_info
from levit_deploy.families import spec_for_model
from levit_deploy.parity import INT8_FLOOR_FACTOR, compare_outputs
from levit_deploy.quantize import Attempt, Outcome, fit_to_gate, sensitivity

sys.path.insert(0, str(Path(__file__).parent))
from int8_faults import double_one_activation_scale, write_blank_images  # noqa: E402

runner = CliRunner()
#: a recipe the search chose for ORT (uint8 weights) on the in-distribution yardstick (levit-deploy export ...
#: --to onnx --precision int8 --calib calib --images images): 9 of 47 layers, under the ranking of an earlier
#: commit (ranges from the first 32 calibration images; the search now keeps 6 of 47, a subset of these nine).
#: The tests replay it with uint8 weights, whose kernels are exact on every CPU (`auto` takes int8 on VNNI/AMX)
ORT_RECIPE = ("head.linear,stages.4.proj,stages.4.kv,stages.12.kv,stages.12.proj,stages.0.inner.qkv,"
              "stages.2.inner.qkv,stages.0.inner.proj,stages.1.inner.up")


class Outlier(nn.Module):
    """Three linears; the input of ``b`` has one channel 300x larger than the rest (an activation outlier), which
    per-tensor uint8 quantization of that input cannot resolve."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        for layer in (self.a, self.b, self.c):
            layer.weight.data = torch.randn(layer.weight.shape, generator=g) / 4
        self.b.weight.data[:, 3] /= 300  # b's output stays of ordinary size: only b's input has the outlier
        self.register_buffer("boost", torch.ones(32))
        self.boost[3] = 300.0

    def forward(self, x):
        h = torch.relu(self.a(x.flatten(1)[:, :16])) * self.boost
        return self.c(torch.relu(self.b(h)))


def test_sensitivity_ranks_the_layer_behind_an_activation_outlier_first():
    inputs = np.random.default_rng(0).standard_normal((24, 16, 1, 1)).astype(np.float32)
    scores = sensitivity(Outlier().eval(), inputs, ["a", "b", "c"])
    assert max(scores, key=scores.get) == "b"
    assert scores["b"] > 10 * scores["a"] and scores["b"] > 10 * scores["c"]


def test_the_search_keeps_the_most_sensitive_layers_until_the_gate_passes():
    """The search grows the float set 1, 2, … most sensitive first and stops at the first pass; with a gate that
    nothing passes it stops at the cap and reports every attempt."""
    inputs = np.random.default_rng(1).standard_normal((24, 16, 1, 1)).astype(np.float32)
    model = Outlier().eval()

    class Report:
        def __init__(self, passed):
            self.passed, self.worst_margin, self.per_input = passed, 0.5 if passed else 2.0, []

    tried = []

    def attempt(keep):
        tried.append(keep)
        return keep, Report("b" in keep and len(keep) >= 2), ["a", "b", "c", "d"]

    model.d = nn.Linear(1, 1)  # a fourth quantizable layer, never reached
    outcome = fit_to_gate(attempt, model, inputs, max_fraction=0.5)
    assert tried[0] == () and tried[1] == ("b",) and outcome.passed and len(outcome.keep_float) == 2
    assert outcome.keep_float[0] == "b" and outcome.scores["d"] == 0.0 and outcome.describe()["keep_float"][0] == "b"
    tried.clear()
    many = [f"l{i}" for i in range(20)]  # 20 layers, the gate passes from 3 kept on: steps 1, 2, 4, then 3 by bisection
    bisected = fit_to_gate(lambda keep: (keep, Report(len(keep) >= 3), many), _scored(many), inputs, max_fraction=0.5)
    assert [len(a.keep_float) for a in bisected.attempts] == [0, 1, 2, 4, 3] and len(bisected.keep_float) == 3
    stuck = fit_to_gate(lambda keep: (keep, Report(False), ["a", "b", "c", "d"]), model, inputs, max_fraction=0.5)
    assert not stuck.passed and [len(a.keep_float) for a in stuck.attempts] == [0, 1, 2]
    assert fit_to_gate(attempt, model, inputs, max_fraction=0).attempts[0].keep_float == ()


def _scored(names):
    """A model whose Linear layers carry ``names`` and all see the input (for the search's sensitivity pass)."""
    class Parallel(nn.Module):
        def __init__(self):
            super().__init__()
            for name in names:
                setattr(self, name, nn.Linear(16, 2))

        def forward(self, x):
            return sum(getattr(self, n)(x.flatten(1)) for n in names)
    return Parallel().eval()


def test_int8_rule_is_relative_to_the_models_own_bf16_floor():
    """An image the model computes stably in bf16 (floor cosine 0.9999) holds int8 to cosine 0.99; one it cannot
    (floor cosine 0.95) is excused down to 1 - K8·0.05; near-ties (a bf16 draw flips top-1) leave top-1 agreement."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10)) * 3
    ref[:, 0] += 10  # decisive: class 0 by a wide margin
    noise = -np.abs(rng.standard_normal((4, 10)))
    noise[:, 0] = 0  # lowers the other classes only: top-1 stays class 0 however large

    def at_cosine(target):
        """Each row moved along ``noise`` until its cosine to the reference is ``target``."""
        rows = []
        for r, n in zip(ref, noise):
            scales = np.geomspace(1e-4, 1e3, 20000)
            cands = r[None] + scales[:, None] * n[None]
            cos = cands @ r / np.linalg.norm(cands, axis=1) / np.linalg.norm(r)
            rows.append(cands[np.argmax(cos < target)])
        return np.stack(rows)

    floors = np.stack([ref + noise * 1e-4] * 5)
    stable = compare_outputs(ref, at_cosine(0.985), "int8", floors=floors, kinds=["photos"] * 4)
    assert not stable.passed and "below its bound" in stable.failures[0]
    assert compare_outputs(ref, at_cosine(0.995), "int8", floors=floors, kinds=["photos"] * 4).passed
    shaky = np.stack([at_cosine(0.95)] * 5)
    excused = 1 - INT8_FLOOR_FACTOR * 0.05
    assert compare_outputs(ref, at_cosine(excused + 0.02), "int8", floors=shaky, kinds=["photos"] * 4).passed
    assert not compare_outputs(ref, at_cosine(excused - 0.02), "int8", floors=shaky, kinds=["photos"] * 4).passed
    flipped = np.stack([ref[:, ::-1]] * 5)  # every draw flips top-1: no decisive image
    r = compare_outputs(ref, ref, "int8", floors=flipped, kinds=["photos"] * 4)
    assert not r.passed and "decisive" in r.failures[-1]


def export_yardstick_int8(in_distribution, to: str, out, *options: str, calib=None):
    """`levit-deploy export` of the in-distribution yardstick in int8 to ``to``, calibrated on its calib/ (or
    ``calib``) and judged on its other images/ crops, with ``-o`` options; the CLI's result."""
    args = ["export", str(in_distribution / "levit_128s_in_distribution.pth"), "--to", to, "--precision", "int8",
            "--calib", str(calib or in_distribution / "calib"), "--images", str(in_distribution / "images")]
    return runner.invoke(app, [*args, *(a for option in options for a in ("-o", option)), "--out", str(out)])


@pytest.fixture(scope="module")
def ort_int8(in_distribution, tmp_path_factory):
    """The in-distribution yardstick in ORT int8, replaying the searched recipe (one quantization, not five)."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("ort8") / "a"
    result = export_yardstick_int8(in_distribution, "onnx", out, f"keep_float={ORT_RECIPE}", "int8_weights=uint8")
    assert result.exit_code == 0, result.output
    assert "9 of 47 quantized layers kept in float: head.linear" in result.stdout
    return out


@pytest.mark.slow  # an ORT int8 search (~60 s); the search and the rule are tested above
def test_in_distribution_int8_passes_with_its_recipe_recorded(ort_int8):
    m = json.loads((ort_int8 / "manifest.json").read_text())
    assert m["parity"]["status"] == "passed"
    images = [r for r in m["parity"]["per_input"] if r["gating"]]
    assert len(images) == 41 and all(r["passed"] for r in images)
    recipe = m["export"]["calibration"]["recipe"]
    assert recipe["keep_float"] == ORT_RECIPE.split(",") and recipe["quantized_layers"] == 47
    assert len(m["export"]["calibration"]["layers"]) == 38


@pytest.mark.slow
def test_a_doubled_quantization_scale_is_refused(ort_int8, in_distribution, tmp_path):
    broken = shutil.copytree(ort_int8, tmp_path / "broken")
    double_one_activation_scale(broken)
    result = runner.invoke(app, ["parity", str(broken), "--images", str(in_distribution / "images")])
    assert result.exit_code == 1, result.output
    assert "[int8]" in result.output and "FAIL" in result.output


@pytest.mark.slow  # one ORT int8 quantization (~45 s); `make test-all` runs it
def test_calibrating_on_blank_images_is_refused(in_distribution, tmp_path):
    blank = write_blank_images(tmp_path / "blank")
    result = export_yardstick_int8(in_distribution, "onnx", tmp_path / "x", "max_float_fraction=0", calib=blank)
    assert result.exit_code == 1, result.output
    assert "below its bound" in result.output and not (tmp_path / "x" / "model.onnx").exists()


@pytest.mark.slow  # a second ORT int8 quantization (~45 s)
def test_the_same_recipe_gives_the_same_artifact(ort_int8, in_distribution, tmp_path):
    again = tmp_path / "again"
    result = export_yardstick_int8(in_distribution, "onnx", again, f"keep_float={ORT_RECIPE}", "int8_weights=uint8")
    assert result.exit_code == 0, result.output
    assert (again / "model.onnx").read_bytes() == (ort_int8 / "model.onnx").read_bytes()


@pytest.mark.slow  # two ORT int8 quantizations (~90 s)
def test_the_files_shipped_are_the_attempt_chosen_when_the_search_ends_on_a_failing_one(ort_int8, in_distribution,
                                                                                         tmp_path, monkeypatch):
    """A search that bisects can pass at k layers in float, then fail at k - 1 and stop there (seen: 4 passed, 3
    failed on a Xeon with AMX). The export shipped the last attempt's files under the passing one's report; a fresh
    `parity` of the artifact refused it. Here the search passes with the recipe, then writes the plain artifact."""
    def search_ending_on_a_failure(attempt, model, inputs, fraction, progress):
        keep = tuple(ORT_RECIPE.split(","))
        chosen, report, quantized = attempt(keep)
        _, later, _ = attempt(())
        assert report.passed and not later.passed
        tried = [Attempt(k, r.passed, r.worst_margin, 0) for k, r in ((keep, report), ((), later))]
        return Outcome(chosen, keep, quantized + list(keep), tried, passed=True)

    monkeypatch.setattr(sys.modules["levit_deploy.export"], "fit_to_gate", search_ending_on_a_failure)
    out = tmp_path / "searched"
    result = export_yardstick_int8(in_distribution, "onnx", out, "int8_weights=uint8")
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").read_bytes() == (ort_int8 / "model.onnx").read_bytes()
    again = runner.invoke(app, ["parity", str(out), "--images", str(in_distribution / "images")])
    assert again.exit_code == 0, again.output


@pytest.mark.slow
def test_a_recipe_naming_an_unknown_layer_is_one_line(tmp_path):
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "onnx", "--precision", "int8",
                                 "-o", "keep_float=stages.99.nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "keep_float names stages.99.nope, not among the 47 quantizable layers" in result.output


def test_int8_options_are_refused_for_float_precisions(tmp_path):
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "onnx", "-o",
                                 "keep_float=head.linear", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "int8 options" in result.output


#: a recipe the search chose for OpenVINO on the in-distribution yardstick with 7-bit weights (an AVX2 CPU, where
#: `auto` turns NNCF's overflow fix on); with 8-bit weights (VNNI/AMX) it kept the first four of them
OV_RECIPE = "stem.4,stem.2,head.linear,stem.0,stem.6,stages.0.inner.qkv,stages.4.kv"


@pytest.mark.slow  # one OpenVINO int8 quantization (~20 s on 2 cores)
def test_openvino_int8_computes_its_float_layers_in_bf16_when_asked_and_is_judged_as_int8(in_distribution,
                                                                                         tmp_path, monkeypatch):
    """-o float_compute=bf16: the gate runs the IR asking for bf16 (what ran is read back) and judges it by the int8
    rule; a passing artifact's manifest makes every later open ask for bf16 too. On a CPU without bf16 the plugin
    computes in fp32. Whether this recipe passes depends on the CPU's bf16: it passed on an AMX Xeon and in fp32
    (AVX2); on a Zen 4 EPYC with AVX-512 bf16 the gate refused it, every cosine within its bound but 2 of 34 decisive
    top-1s flipped (94.1 % < 95 %) -- so a refusal is checked to be the int8 rule's, never an error."""
    pytest.importorskip("nncf")
    opened, ran = OpenVinoRuntime._open, []

    def open_and_record(runtime):
        opened(runtime)
        ran.append((runtime.ov_config["INFERENCE_PRECISION_HINT"], runtime.inference_precision, runtime.precision))

    monkeypatch.setattr(OpenVinoRuntime, "_open", open_and_record)
    out = tmp_path / "ov8"
    result = export_yardstick_int8(in_distribution, "openvino", out, f"keep_float={OV_RECIPE}", "float_compute=bf16")
    # the plugin takes bf16 where oneDNN has it (AVX-512 bf16, AMX, also AVX2-VNNI-2 CPUs), else stays fp32
    bf16_here = bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["isa"]))
    assert ran and {(hint, precision) for hint, _, precision in ran} == {("bf16", "int8")}, ran
    assert {computed for _, computed, _ in ran} <= ({"bf16"} if bf16_here else {"fp32", "bf16"}), ran
    if result.exit_code == 1:
        report = json.loads((out / "parity-failed-openvino.json").read_text())
        assert report["precision"] == "int8" and report["failures"] and "[int8] FAIL" in result.output, result.output
        assert not (out / "manifest.json").exists()
        return
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifact"]["runtime_options"] == {"compute": "bf16"}
    assert manifest["artifact"]["quantization"]["float_compute"] == "bf16"
    ran.clear()
    again = runner.invoke(app, ["parity", str(out), "--images", str(in_distribution / "images")])
    assert again.exit_code == 0 and "[int8]" in again.output, again.output
    assert ran and {(hint, precision) for hint, _, precision in ran} == {("bf16", "int8")}, ran


def test_float_compute_is_refused_for_a_float_ir(tmp_path):
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "openvino", "-o",
                                 "float_compute=bf16", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "float_compute applies to int8 IRs" in result.output, result.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


@pytest.mark.slow  # the full search on OpenVINO (~5 minutes on 2 cores); `make test-all` runs it
def test_openvino_int8_of_the_in_distribution_yardstick_passes_by_keeping_a_few_layers_in_float(in_distribution,
                                                                                               tmp_path):
    pytest.importorskip("nncf")
    out = tmp_path / "ov8"
    result = export_yardstick_int8(in_distribution, "openvino", out)
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "manifest.json").read_text())["export"]["calibration"]["recipe"]
    assert recipe["attempts"][0]["keep_float"] == [] and not recipe["attempts"][0]["passed"]
    assert 0 < len(recipe["keep_float"]) <= 0.25 * recipe["quantized_layers"]
    assert f"{len(recipe['keep_float'])} of {recipe['quantized_layers']} quantized layers kept in float" in result.stdout


def test_an_executorch_recipe_keeps_its_layers_in_float():
    """XNNPACK's quantizer skips the recipe's modules: their linears take a float weight (no dequantize before it),
    every other linear an int8 one, and the recipe's layers are not reported as quantized."""
    pytest.importorskip("executorch")
    from levit_deploy.backends.executorch import ExecutorchOptions, quantize_pt2e
    from levit_deploy.calibration import calibration_set

    model = ld.fuse(ld.load("levit_128s", init="random"))
    calibration = calibration_set(spec_for_model(model), None, limit=4)
    keep = ("head.linear", "stages.4.q")
    graph, quant = quantize_pt2e(model, calibration, ExecutorchOptions(), 16, keep_float=keep)
    weights = {}
    for node in graph.graph.nodes:
        if node.target == torch.ops.aten.linear.default:
            path = list(node.meta["nn_module_stack"].values())[-1][0]
            weights[path] = "dequantize" in str(node.args[1].target)
    assert not weights["head.linear"] and not weights["stages.4.q"]
    assert sum(weights.values()) == len(weights) - 2 and len(weights) > 30
    assert set(quant["layers"]) == set(weights) - set(keep)


def test_the_ranges_come_from_every_calibration_image_and_the_scores_from_a_spread_of_them():
    """The backend calibrates on every image, so the simulated ranges do too: an image outside the scored subset
    that widens the input ranges changes the scores (coarser steps); the scored subset is spread over the set, not
    its head."""
    model = Outlier().eval()
    calib = np.random.default_rng(5).standard_normal((40, 16, 1, 1)).astype(np.float32)
    scored = np.linspace(0, 39, 8).round().astype(int)
    assert 39 in scored and 38 not in scored
    plain = sensitivity(model, calib, ["a", "b", "c"], images=8)
    wider = calib.copy()
    wider[38] *= 20  # not scored: it only widens the ranges
    widened = sensitivity(model, wider, ["a", "b", "c"], images=8)
    assert widened["a"] > 2 * plain["a"]


def test_a_refused_input_outside_the_calibrated_ranges_is_named_with_its_remedy():
    """An input whose activations reach far past what calibration saw is named (with how many layers and where the
    most); inputs like the calibration images are not."""
    from levit_deploy.quantize import outside_calibration

    model = Outlier().eval()
    calib = np.random.default_rng(6).standard_normal((16, 16, 1, 1)).astype(np.float32)
    inside, outside = calib[:1], 10 * np.abs(calib[1:2])
    notes = outside_calibration(model, calib, np.concatenate([inside, outside]), ["like calib", "bright"],
                                ["a", "b", "c"])
    assert len(notes) == 1 and notes[0].startswith("bright: ") and "add images like it to --calib" in notes[0]
    assert "at 3 of 3 quantized layers" in notes[0]
