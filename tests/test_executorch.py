"""ExecuTorch (.pte, XNNPACK delegate): exported through the registry, gated like every other artifact, run by
ExecuTorch's own runtime with its thread count honoured, and taken by parity, predict and val."""
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import levit_deploy as ld
from conftest import trained_like_model
from levit_deploy.cli import app
from levit_deploy.preprocess import bundled_photos
from variants import SMALLEST_LEVIT_FIRST

pytest.importorskip("executorch", reason="executorch not installed: pip install 'levit-deploy[executorch]'")
runner = CliRunner()


@pytest.mark.slow
def test_fp32_program_passes_the_gate_on_a_trained_like_checkpoint_and_records_its_pieces(artifacts):
    artifact = artifacts("levit_128s", "executorch")
    m = artifact.manifest
    assert m["parity"]["status"] == "passed" and m["parity"]["precision"] == "fp32"
    assert artifact.path.suffix == ".pte" and m["versions"]["executorch"]
    et = m["artifact"]["executorch"]
    assert et["delegate"] == "XnnpackBackend" and et["delegated_pieces"] >= 1
    assert "expand_copy" not in et["ops_outside"]  # the 3-D bmm rewrite took attention's matmuls into XNNPACK
    assert "view_copy" not in et["ops_outside"]  # and the -1 rewrite the dynamic batch's reshapes
    assert et["rewrites"] == {"4-D matmul -> 3-D bmm": 22, "symbolic reshape size -> -1": 115}
    assert et["max_batch"] == 32 and m["input"]["shape"][0] == "batch"
    with ld.open_runtime(artifact.folder, threads=1) as rt:
        assert rt.name == "executorch" and rt.info()["threads"] == 1
        x = np.random.default_rng(0).standard_normal((40, 3, 224, 224)).astype(np.float32)
        whole = rt.infer(x)  # more than max_batch: run in chunks
        assert whole.shape == (40, 1000)
        np.testing.assert_allclose(whole[:32], rt.infer(x[:32]), rtol=0, atol=1e-5)
        np.testing.assert_allclose(whole[35:], rt.infer(x[35:]), rtol=0, atol=1e-5)
        assert rt.infer(x[:0]).shape == (0, 1000)


@pytest.mark.slow  # it pays the trained-like ExecuTorch export (~85 s on 2 cores); make test-all
def test_parity_predict_and_val_take_a_pte_like_any_artifact(artifacts, tmp_path):
    folder = str(artifacts("levit_128s", "executorch").folder)
    parity = runner.invoke(app, ["parity", folder, "--json"])
    assert parity.exit_code == 0, parity.output
    assert json.loads(parity.stdout)["chain"][-1]["stage"].startswith("executorch")
    photos = [str(p) for p in bundled_photos()[:2]]
    predicted = runner.invoke(app, ["predict", *photos, "--model", folder, "--json"])
    assert predicted.exit_code == 0, predicted.output
    doc = json.loads(predicted.stdout)
    assert doc["model"].endswith(folder) and all(r["ok"] for r in doc["results"])
    # val: a folder labelled with the reference's own top-1, so the program must score what its checkpoint does
    labelled = tmp_path / "labelled"
    for path, result in zip(photos, doc["results"]):
        (labelled / str(result["topk"][0]["index"])).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, labelled / str(result["topk"][0]["index"]))
    val = runner.invoke(app, ["val", str(labelled), "-m", folder, "--json"])
    assert val.exit_code == 0, val.output
    row = next(r for r in json.loads(val.stdout)["results"] if r["runtime"] == "executorch")
    assert row["top1"] == 1.0 and row["differ"] == 0


@pytest.mark.slow
def test_a_fixed_batch_program_lowers_into_few_pieces_and_refuses_another_batch(tmp_path):
    artifact = ld.export(trained_like_model("levit_128s"), "executorch", tmp_path / "fixed", batch=2)
    et = artifact.manifest["artifact"]["executorch"]
    # static shapes: XNNPACK takes the reshapes and the q/k/v slices; only the stride-2 subsampling slices and the
    # final mean stay outside (measured: 4 pieces against 73 with a dynamic batch)
    assert et["delegated_pieces"] <= 4 and set(et["ops_outside"]) <= {"slice_copy.Tensor", "mean.dim"}
    with ld.open_runtime(artifact.folder) as rt:
        with pytest.raises(ValueError, match="fixed batch of 2, got a batch of 3"):
            rt.infer(np.zeros((3, 3, 224, 224), np.float32))


@pytest.mark.slow  # an int8 export with calibration (~1 min); `make test-all` runs it
def test_int8_program_passes_the_int8_gate_on_real_photos(tmp_path, int8_photos):
    """LeViT-128S with seeded weights (trained-like LeViT cannot pass any 8-bit gate: see test_int8.py), calibrated
    on real photos and judged on others."""
    calib, judge = int8_photos
    out = tmp_path / "int8"
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "executorch", "--precision",
                                 "int8", "--batch", "16", "--calib", str(calib), "--images", str(judge), "--out",
                                 str(out), "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)["manifest"]
    assert m["parity"]["status"] == "passed" and m["parity"]["precision"] == "int8"
    assert m["parity"]["min_cosine"] >= 0.99 and m["parity"]["top1_agreement"] >= 0.95
    cal = m["export"]["calibration"]
    assert cal["source"] == str(calib) and not cal["stand_in"] and cal["calibration_batch"] == 1
    assert "XNNPACKQuantizer" in cal["method"] and cal["quantized_ops"].startswith("linear")
    assert m["artifact"]["size_bytes"] < 0.45 * 4 * m["model"]["params"]
    assert m["artifact"]["executorch"]["delegated_pieces"] <= 4


@pytest.mark.slow  # an int8 export of LightViT (~2 min)
def test_int8_program_of_a_trained_like_checkpoint_passes_with_enough_calibration(tmp_path, int8_photos):
    """Measured: trained-like LightViT-T in XNNPACK int8 flips 2 of 32 photos (93.8 %, refused) calibrated on 42
    crops, and passes calibrated on these 84 (cosine >= 0.998, 97 % top-1)."""
    calib, judge = int8_photos
    artifact = ld.export(trained_like_model("lightvit_tiny"), "executorch", tmp_path / "x", precision="int8", batch=8,
                         calib=calib, images=[judge])
    p = artifact.manifest["parity"]
    assert p["status"] == "passed" and p["min_cosine"] >= 0.99 and p["top1_agreement"] >= 0.95
    assert artifact.manifest["export"]["calibration"]["size"] == 84


@pytest.mark.parametrize("variant", SMALLEST_LEVIT_FIRST)
def test_every_family_exports_and_records_what_stays_outside_xnnpack(artifacts, variant):
    m = artifacts(variant, "executorch").manifest
    assert m["parity"]["status"] == "passed"
    assert m["artifact"]["executorch"]["delegated_pieces"] >= 1
    assert isinstance(m["artifact"]["executorch"]["ops_outside"], dict)


def test_an_option_the_target_does_not_take_is_refused(tmp_path):
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "executorch", "-o", "opset=17",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "opset: not an option of the executorch target" in result.output
