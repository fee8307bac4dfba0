"""Scale-out on a local Ray: batch inference on Ray Data and online serving on Ray Serve give what ``predict`` gives.

Ray starts once for this module with 4 logical CPUs (an actor pool that takes every CPU of a 2-core machine
starves Ray's read tasks) and is shut down even when a test fails; every test is bounded in time.
"""
import concurrent.futures as cf
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from typer.testing import CliRunner

from levit_deploy.cli import app
from levit_deploy.predict import Predictor
from levit_deploy.preprocess import expand_inputs
from real_photos import GATE_PHOTOS, OTHER_PHOTOS, photo_crops, write_images

ray = pytest.importorskip("ray", reason="ray not installed: pip install 'levit-deploy[ray]'")
runner = CliRunner()
BAD = {"text.jpg": b"not an image at all", "empty.png": b"", "truncated.jpg": None, "html.webp": b"<html></html>",
       "zeros.jpeg": bytes(4096)}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        try:
            from ray import serve
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """200 real-photo crops and 5 files that are not images."""
    root = tmp_path_factory.mktemp("ray-images")
    crops = photo_crops(OTHER_PHOTOS + GATE_PHOTOS, 10, seed=5)[:200]
    write_images(root / "good", crops)
    good = sorted((root / "good").iterdir())
    for name, data in BAD.items():
        (root / name).write_bytes(good[0].read_bytes()[:600] if data is None else data)
    return root


def reference_predictions(artifact_folder, paths):
    predictor = Predictor(str(artifact_folder), threads=1)
    try:
        return {p.path: p for p in predictor.predict(paths, topk=5, batch=32)}
    finally:
        predictor.close()


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_ray_data_gives_predicts_rows_and_bad_images_are_rows_with_errors(local_ray, folder, artifact_128s, tmp_path):
    from levit_deploy.ray_predict import predict_on_ray, read_results

    artifact = artifact_128s("onnx").folder
    summary = predict_on_ray(artifact, [str(folder)], tmp_path / "out", actors=2, batch=16)
    assert summary == {"rows": 205, "failed": 5, "output": str(tmp_path / "out")}
    rows = read_results(tmp_path / "out")
    expected = reference_predictions(artifact, [p.resolve() for p in expand_inputs([folder])])
    assert sorted(rows["path"]) == sorted(expected)
    for path, ok, error, indices, probs in zip(rows["path"], rows["ok"], rows["error"], rows["indices"],
                                               rows["probs"]):
        ref = expected[path]
        assert ok == ref.ok, (path, error)
        if not ok:
            assert path.rsplit("/", 1)[-1] in BAD and error.startswith(path)
            continue
        assert indices[0] == ref.topk[0]["index"]  # the same class, from the same preprocessing
        np.testing.assert_allclose(probs, [t["prob"] for t in ref.topk], rtol=0, atol=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_cli_predict_on_ray_writes_parquet_and_exits_1_for_bad_images(local_ray, folder, artifact_128s, tmp_path):
    result = runner.invoke(app, ["predict", str(folder / "good"), str(folder / "text.jpg"), "--ray", "--model",
                                 str(artifact_128s("onnx").folder), "--output", str(tmp_path / "p"), "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["rows"] == 201 and doc["failed"] == 1 and any((tmp_path / "p").glob("*.parquet"))
    again = runner.invoke(app, ["predict", str(folder / "good"), "--ray", "--model", str(artifact_128s("onnx").folder),
                                "--output", str(tmp_path / "p"), "--json"])
    assert again.exit_code == 0, again.output  # a rerun replaces the results: no rows counted twice
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows"] == 200
    refused = runner.invoke(app, ["predict", str(folder / "good"), "--ray", "--csv", str(tmp_path / "x.csv")])
    assert refused.exit_code == 2 and "--csv: not taken with --ray" in refused.output


def test_fixed_batch_artifacts_are_refused_for_ray_and_serve_in_one_line():
    from levit_deploy.ray_predict import require_dynamic_batch

    with pytest.raises(ValueError, match="exported for a fixed batch of 4: re-export with --batch dynamic"):
        require_dynamic_batch({"input": {"shape": [4, 3, 224, 224]}}, "serve")
    require_dynamic_batch({"input": {"shape": ["batch", 3, 224, 224]}}, "serve")


@pytest.mark.timeout(300)
def test_serve_answers_concurrent_clients_in_batches_like_predict(local_ray, folder, artifact_128s):
    from ray import serve

    from levit_deploy.serve import start

    artifact = artifact_128s("onnx").folder
    url = start(artifact, port=8765, max_batch=8, batch_wait_ms=50, max_bytes=100_000)
    try:
        good = sorted((folder / "good").iterdir())[:40]
        bad = [folder / "text.jpg", folder / "truncated.jpg"]
        sent = good[:20] + bad + good[20:]

        def post(path):
            req = urllib.request.Request(f"{url}?name={path.name}", data=path.read_bytes(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        with cf.ThreadPoolExecutor(16) as pool:
            answers = dict(zip(sent, pool.map(post, sent)))
        expected = reference_predictions(artifact, good)
        for path in good:
            status, doc = answers[path]
            assert status == 200 and doc["topk"][0]["index"] == expected[str(path)].topk[0]["index"]
            np.testing.assert_allclose([t["prob"] for t in doc["topk"]],
                                       [t["prob"] for t in expected[str(path)].topk], rtol=0, atol=1e-5)
        for path in bad:
            status, doc = answers[path]
            assert status == 400 and not doc["ok"] and doc["error"].startswith(path.name)
        health = json.loads(urllib.request.urlopen(f"{url}healthz", timeout=30).read())
        sizes = {int(k): v for k, v in health["batch_sizes"].items()}
        assert sum(k * v for k, v in sizes.items()) == len(good) and max(sizes) > 1  # batching happened
        too_big = urllib.request.Request(url, data=bytes(120_000), method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(too_big, timeout=30)
        assert refused.value.code == 413
    finally:
        serve.shutdown()
