"""predict: preprocessing checked independently, every PIL mode, every kind of bad input."""
import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy.cli import app
from levit_deploy.labels import imagenet_labels
from levit_deploy.predict import Predictor, softmax
from levit_deploy.families.levit import FAMILY as LEVIT
from levit_deploy.preprocess import (ImageError, bundled_photos, decode_image, expand_inputs, synthetic_jpegs, to_rgb,
                                     transform)

SPECS = LEVIT.specs

runner = CliRunner()


def rgb_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [(300, 400), (640, 480), (224, 224), (1000, 260)])
def test_transform_matches_hugging_face_processor(size):
    from transformers import LevitImageProcessorPil

    img = rgb_image(*size)
    hf = LevitImageProcessorPil()(img, return_tensors="np")["pixel_values"][0]
    assert np.abs(transform(img, SPECS["hf"]) - hf).max() < 1e-5
    assert np.abs(transform(img, SPECS["official"]) - hf).max() < 1e-5  # same 256/224 recipe
    # timm: crop_pct 0.9 -> resize to 248; HF's processor reaches 248 with shortest_edge 217 (int(217*256/224))
    timm_like = LevitImageProcessorPil(size={"shortest_edge": 217})(img, return_tensors="np")["pixel_values"][0]
    assert np.abs(transform(img, SPECS["timm"]) - timm_like).max() < 1e-5


def test_mode_conversions():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(to_rgb(rgba))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (255, 255, 255)  # composited on white
    la = Image.new("LA", (2, 2), (100, 0))
    assert tuple(np.asarray(to_rgb(la))[0, 0]) == (255, 255, 255)
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.putpixel((0, 0), 0)
    pa = np.asarray(to_rgb(p))
    assert tuple(pa[0, 0]) == (255, 255, 255) and tuple(pa[1, 1]) == (200, 0, 0)
    i16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(i16))[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    i32 = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 4, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == (255, 0, 0)
    assert to_rgb(Image.new("1", (2, 2), 1)).mode == "RGB"


def test_exif_orientation_is_honoured(tmp_path):
    img = rgb_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert decode_image(tmp_path / "o.jpg").size == (20, 40)


def make_folder(root):
    """Good images in every mode, plus each kind of bad input."""
    good = {}
    base = Image.open(io.BytesIO(synthetic_jpegs(1, seed=3)[0])).convert("RGB")
    modes = {"rgb.jpg": base, "gray.png": base.convert("L"), "la.png": base.convert("LA"),
             "pal.png": base.convert("P"), "rgba.png": base.convert("RGBA"), "cmyk.jpg": base.convert("CMYK"),
             "i16.png": Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)),
             "i32.tif": Image.fromarray(np.asarray(base.convert("L"), np.int32) * 257),
             "f.tif": Image.fromarray(np.asarray(base.convert("L"), np.float32) / 255)}
    ptrans = base.convert("P")
    ptrans.info["transparency"] = 0
    modes["ptrans.png"] = ptrans
    for name, img in modes.items():
        img.save(root / name, **({"transparency": 0} if name == "ptrans.png" else {}))
        good[name] = img
    bad = {}
    (root / "zero.jpg").write_bytes(b"")
    bad["zero.jpg"] = "empty file"
    data = (root / "rgb.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    bad["truncated.jpg"] = "cannot decode"
    (root / "text.jpg").write_text("this is not a JPEG")
    bad["text.jpg"] = "not a recognised image format"
    Image.new("L", (9000, 9000)).save(root / "bomb.png", optimize=True)
    bad["bomb.png"] = "exceeds the limit"
    os.symlink(root / "nowhere.jpg", root / "unreadable.jpg")
    bad["unreadable.jpg"] = "no such file"
    return good, bad


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    good, bad = make_folder(root)
    return root, good, bad


def test_folder_with_every_mode_and_every_bad_input(folder, tmp_path):
    root, good, bad = folder
    missing = tmp_path / "missing.jpg"
    result = runner.invoke(app, ["predict", str(root), str(missing), "--init", "random", "--runtime", "torch",
                                 "--json", "--csv", str(tmp_path / "out.csv"), "--batch", "4"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    by_name = {os.path.basename(r["path"]): r for r in doc["results"]}
    assert set(by_name) == set(good) | set(bad) | {"missing.jpg"}
    for name in good:
        topk = by_name[name]["topk"]
        assert by_name[name]["ok"] and [t["rank"] for t in topk] == [1, 2, 3, 4, 5], by_name[name]
        probs = [t["prob"] for t in topk]
        assert probs == sorted(probs, reverse=True) and 0 < probs[-1] and sum(probs) <= 1 + 1e-9
    for name, reason in bad.items():
        assert not by_name[name]["ok"] and reason in by_name[name]["error"], by_name[name]
    assert "no such file" in by_name["missing.jpg"]["error"]
    assert doc["failed"] == len(bad) + 1
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert len(rows) == len(by_name) and {r["status"] for r in rows} == {"ok", "error"}


@pytest.mark.slow
def test_every_installed_runtime_agrees_with_the_fp64_reference(folder, trained_128s_path):
    """A trained-like checkpoint through every runtime, on real photos and on images in every PIL mode.

    Judged by the fp32 parity rule carried into probabilities (softmax moves no probability by more
    than half the largest logit change): |Δp| <= max(1e-4·s, 4·floor) / 2 per image, and the top-1
    must agree wherever the fp64 margin between the two best classes is larger than twice that.
    """
    root, good, _ = folder
    paths = [root / n for n in sorted(good)] + bundled_photos()
    model = ld.load(trained_128s_path)
    x = np.stack([transform(decode_image(p), SPECS["official"]) for p in paths])
    with torch.no_grad():
        z64 = model.double()(torch.from_numpy(x).double()).numpy()
        z32 = model.float()(torch.from_numpy(x)).double().numpy()
    p64 = softmax(z64)
    bound = np.maximum(1e-4 * np.abs(z64).max(1), 4 * np.abs(z32 - z64).max(1)) / 2
    top2 = np.sort(p64, 1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * bound
    assert decisive.sum() >= 5  # enough well-conditioned images for the top-1 check to mean something
    runtimes = ["torch", "ort"] + (["openvino"] if __import__("importlib").util.find_spec("openvino") else [])
    for rt in runtimes:
        pred = Predictor(str(trained_128s_path), runtime=rt, threads=1)
        try:
            results = list(pred.predict(paths, topk=5, batch=4))
        finally:
            pred.close()
        for r, p, b, sure in zip(results, p64, bound, decisive):
            assert r.ok, (rt, r.path, r.error)
            assert abs(r.topk[0]["prob"] - p[r.topk[0]["index"]]) <= b, (rt, r.path)
            if sure:
                assert r.topk[0]["index"] == int(p.argmax()), (rt, r.path)


def test_streams_in_bounded_batches(folder, monkeypatch):
    root, good, _ = folder
    pred = Predictor("levit_128s", init="random", runtime="torch")
    sizes = []
    real = pred.runtime.infer
    monkeypatch.setattr(pred.runtime, "infer", lambda x: sizes.append(len(x)) or real(x))
    seen = []

    def lazy_paths():
        for name in sorted(good) * 3:
            seen.append(name)
            yield root / name
    for _ in pred.predict(lazy_paths(), batch=4):
        assert len(seen) <= 4 * (len(sizes) + 1)  # never reads far ahead of what was inferred
    assert max(sizes) == 4 and sum(sizes) == 3 * len(good)


@pytest.mark.slow
def test_labels(tmp_path):
    names = imagenet_labels()
    assert len(names) == 1000 and names[0] == "tench" and names[207] == "golden retriever"
    from safetensors.torch import save_file

    from levit_deploy.families.levit.layouts import from_canonical
    m = LEVIT.randomize_(LEVIT.create(LEVIT.config("levit_128s", num_classes=3)), 0)
    save_file(from_canonical(m.state_dict(), "timm", m.config), str(tmp_path / "m.safetensors"))
    img = tmp_path / "a.jpg"
    img.write_bytes(synthetic_jpegs(1)[0])
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    r = runner.invoke(app, ["predict", str(img), "--model", str(tmp_path / "m.safetensors"), "--runtime", "torch",
                            "--labels", str(tmp_path / "labels.txt"), "--json"])
    assert r.exit_code == 0, r.output
    assert {t["label"] for t in json.loads(r.stdout)["results"][0]["topk"]} == {"cat", "dog", "bird"}
    r = runner.invoke(app, ["predict", str(img), "--model", str(tmp_path / "m.safetensors"), "--runtime", "torch",
                            "--json"])
    assert {t["label"] for t in json.loads(r.stdout)["results"][0]["topk"]} == {"0", "1", "2"}
    (tmp_path / "bad.txt").write_text("cat\n")
    r = runner.invoke(app, ["predict", str(img), "--model", str(tmp_path / "m.safetensors"), "--labels",
                            str(tmp_path / "bad.txt")])
    assert r.exit_code == 2 and "1 labels for a head with 3 classes" in r.output


def test_default_runtime_exports_once_into_the_cache(tmp_path, fresh_cache, monkeypatch):
    img = tmp_path / "a.jpg"
    img.write_bytes(synthetic_jpegs(1)[0])
    import sys
    export_module = sys.modules["levit_deploy.export"]  # the package's export() shadows the module name
    calls = []
    real = export_module._export_into
    monkeypatch.setattr(export_module, "_export_into", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    for _ in range(2):
        r = runner.invoke(app, ["predict", str(img), "--init", "random", "--json"])
        assert r.exit_code == 0, r.output
        assert "on ort" in json.loads(r.stdout)["model"]
    assert calls == ["onnx"]
    cached = list((fresh_cache / "artifacts").iterdir())
    assert len(cached) == 1 and (cached[0] / "manifest.json").is_file()


@pytest.mark.slow
def test_artifact_cache_is_keyed_by_the_weights(fresh_cache):
    import torch

    from levit_deploy.export import cached_export
    a = ld.load("levit_128s", init="random")
    b = ld.load("levit_128s", init="random")
    with torch.no_grad():
        b.head.linear.bias[0] += 1.0  # same variant and seed label, different weights
    assert cached_export(a, "onnx") != cached_export(b, "onnx")
    assert cached_export(a, "onnx") == cached_export(ld.load("levit_128s", init="random"), "onnx")


def test_offline_default_model_says_what_to_do(tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setitem(LEVIT.pretrained_urls, "levit_128s", "http://127.0.0.1:9/LeViT-128S-96703c44.pth")
    r = runner.invoke(app, ["predict", str(tmp_path)])
    assert r.exit_code == 2 and "--weights PATH" in r.output


def test_unwritable_csv_is_one_line(tmp_path):
    img = tmp_path / "a.jpg"
    img.write_bytes(synthetic_jpegs(1)[0])
    r = runner.invoke(app, ["predict", str(img), "--init", "random", "--runtime", "torch", "--csv",
                            str(tmp_path / "no" / "such" / "dir.csv")])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


def test_pixel_limit_option(tmp_path):
    rgb_image(300, 300).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="90,000 pixels exceeds the limit of 1,000"):
        decode_image(tmp_path / "a.png", max_pixels=1000)
    assert list(expand_inputs([tmp_path])) == [tmp_path / "a.png"]
