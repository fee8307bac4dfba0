"""`levit-deploy val`: top-1 / top-5 on labelled folders and CSVs, checked on sets whose answers are known
by construction (labels taken from the fp64 reference model's own ranking of real photos)."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import trained_like_file, trained_like_model
from levit_deploy.cli import app
from levit_deploy.families import spec_for_model
from levit_deploy.reference import reference_outputs
from levit_deploy.preprocess import transform
from levit_deploy.val import DatasetError, imagenet_synsets, read_dataset
from real_photos import GATE_PHOTOS, OTHER_PHOTOS, photo_crops, skimage_photo

runner = CliRunner()
VARIANT = "lightvit_tiny"  # a trained-like checkpoint that is well conditioned: fp32 ranks as fp64 does


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A synset-named folder of 24 real photos: 12 labelled with the fp64 model's top-1, 6 with its second
    class (top-5 hit, top-1 miss), 6 with its least likely class (both miss); plus one corrupt file."""
    images = [(n, skimage_photo(n)) for n in GATE_PHOTOS + OTHER_PHOTOS[:5]] + photo_crops(OTHER_PHOTOS, 1, seed=3)
    images = images[:24]
    model = trained_like_model(VARIANT)
    x = np.stack([transform(img, spec_for_model(model)) for _, img in images])
    ranks = np.argsort(-reference_outputs(model, x), axis=1)
    root = tmp_path_factory.mktemp("labelled")
    synsets = imagenet_synsets()
    rows = []
    for i, (name, img) in enumerate(images):
        label = ranks[i, 0] if i < 12 else ranks[i, 1] if i < 18 else ranks[i, -1]
        folder = root / "folders" / synsets[label]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{name}.jpg", quality=92)
        rows.append(f"folders/{synsets[label]}/{name}.jpg,{label}")
    (root / "folders" / synsets[ranks[0, 0]] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "set.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return root


def test_val_reports_known_accuracy_for_a_checkpoint_and_its_artifact(labelled, artifacts):
    onnx = artifacts(VARIANT, "onnx").folder
    result = runner.invoke(app, ["val", str(labelled / "folders"), "-m", str(trained_like_file(VARIANT)),
                                 "-m", str(onnx), "--json"])
    assert result.exit_code == 1, result.output  # one unreadable image: listed, counted, the rest evaluated
    doc = json.loads(result.stdout)
    assert doc["images"] == 25 and doc["evaluated"] == 24
    assert len(doc["failed"]) == 1 and "broken.jpg" in doc["failed"][0]["path"]
    checkpoint, artifact = doc["results"]
    assert checkpoint["is_reference"] and not artifact["is_reference"]
    for r in (checkpoint, artifact):
        assert r["top1"] == pytest.approx(12 / 24) and r["top5"] == pytest.approx(18 / 24)
        assert r["reference_top1"] == pytest.approx(12 / 24) and r["differ"] == 0
    assert artifact["runtime"] == "ort" and artifact["precision"] == "fp32"


def test_val_reads_a_csv_and_limits(labelled):
    result = runner.invoke(app, ["val", str(labelled / "set.csv"), "-m", str(trained_like_file(VARIANT)),
                                 "--limit", "12"])
    assert result.exit_code == 0, result.output
    assert "100.00%" in result.output and "(is the reference)" in result.output
    assert "12 images evaluated, 0 could not be read" in result.output


def test_val_counts_predictions_that_differ_from_the_reference(labelled, tmp_path, artifacts):
    """A deployment that changes predictions shows them as differing from its reference."""
    onnx = pytest.importorskip("onnx")
    from conftest import copy_artifact
    from levit_deploy.artifacts import sha256_file

    folder = copy_artifact(artifacts(VARIANT, "onnx"), tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    proto = onnx.load(str(folder / "model.onnx"))
    head = [i for i in proto.graph.initializer if len(i.dims) == 1 and i.dims[0] == 1000][-1]
    bias = onnx.numpy_helper.to_array(head).copy()
    bias[:500] += 100.0  # every prediction moves into the first 500 classes
    head.CopyFrom(onnx.numpy_helper.from_array(bias, head.name))
    onnx.save(proto, str(folder / "model.onnx"))
    manifest["artifact"]["files"]["model.onnx"] = sha256_file(folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["val", str(labelled / "set.csv"), "-m", str(folder), "--json"])
    doc = json.loads(result.stdout)
    r = doc["results"][0]
    assert r["reference_top1"] == pytest.approx(12 / 24)
    assert r["differ"] > 0 and r["top1"] < r["reference_top1"]


@pytest.mark.parametrize("content, message", [
    ("path,label\nx.jpg,n99999999\n", "neither an ImageNet-1k synset"),
    ("just-a-path.jpg\n", "expected path,label"),
])
def test_bad_datasets_are_one_line(tmp_path, content, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    with pytest.raises(DatasetError, match=message):
        read_dataset(csv)
    (tmp_path / "cats").mkdir()
    with pytest.raises(DatasetError, match="neither an ImageNet-1k synset"):
        read_dataset(tmp_path)
    result = runner.invoke(app, ["val", str(csv), "-m", "levit_128s", "--init", "random"])
    assert result.exit_code == 2 and "Traceback" not in result.output and message in result.output
