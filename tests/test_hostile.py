"""Hostile artifacts and inputs: every case is refused in one line with the right exit code, no traceback, nothing
read outside the artifact folder and nothing written outside --out (issue 31).

Reading outside the folder is detected, not assumed: an audit hook records every file this process opens, and
each case plants a sentinel file outside the folder whose opening fails the test.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import copy_artifact, run_measured
from levit_deploy.artifacts import MANIFEST_NAME, export_lock
from levit_deploy.cli import app
from levit_deploy.preprocess import bundled_photos

runner = CliRunner()
OPENED: list[str] = []
_RECORDING = [False]


def _audit(event, args):
    if _RECORDING[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def opened_files():
    """Every path this process opens inside the block (resolved), collected into the yielded list."""
    OPENED.clear()
    _RECORDING[0] = True
    seen: list[str] = []
    try:
        yield seen
    finally:
        _RECORDING[0] = False
        seen.extend(str(Path(p).resolve()) for p in OPENED)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    change(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def one_line_refusal(result, code: int, *words: str) -> str:
    """The CLI result's stderr: exactly one 'error:' line containing ``words``, exit ``code``, no traceback."""
    err = result.stderr.strip()
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def onnx_copy(tmp_path, artifact_128s):
    """(artifact folder copy, sentinel ONNX outside it with the same bytes)."""
    folder = copy_artifact(artifact_128s("onnx"), tmp_path / "art")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())
    (outside / "secret.txt").write_text("secret")
    return folder, outside


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return str(bundled_photos()[0])


def _absolute(folder, outside):
    edit_manifest(folder, lambda m: (m["artifact"].update(file=str(outside / "model.onnx")),
                                     m["artifact"]["files"].update({str(outside / "model.onnx"): sha(outside / "model.onnx")})))


def _dotdot(folder, outside):
    name = "../outside/model.onnx"
    edit_manifest(folder, lambda m: (m["artifact"].update(file=name), m["artifact"]["files"].update({name: sha(outside / "model.onnx")})))


def _secret(folder, outside):
    name = "../outside/secret.txt"
    edit_manifest(folder, lambda m: m["artifact"]["files"].update({name: sha(outside / "secret.txt")}))


def _symlink(folder, outside):
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(outside / "model.onnx")


CONTAINMENT = {
    "absolute model path": (_absolute, "not a plain relative path"),
    "model path with ..": (_dotdot, "not a plain relative path"),
    "hashed file outside": (_secret, "not a plain relative path"),
    "symlink leading out": (_symlink, "leads outside the artifact folder"),
}


@pytest.mark.parametrize("case", CONTAINMENT)
def test_an_artifact_cannot_reach_outside_its_folder(onnx_copy, image, case):
    folder, outside = onnx_copy
    plant, words = CONTAINMENT[case]
    plant(folder, outside)
    with opened_files() as seen:
        result = runner.invoke(app, ["predict", image, "--model", str(folder), "--json"])
    one_line_refusal(result, 2, words)
    assert not [p for p in seen if p.startswith(str(outside.resolve()))], "a file outside the folder was opened"


@pytest.mark.parametrize("command", ["predict", "parity", "bench", "triton"])
def test_every_command_refuses_a_file_outside(onnx_copy, image, tmp_path, command):
    folder, outside = onnx_copy
    _secret(folder, outside)
    args = {"predict": ["predict", image, "--model", str(folder)], "parity": ["parity", str(folder)],
            "bench": ["bench", str(folder), "--duration", "0.1"],
            "triton": ["triton", str(folder), "--repo", str(tmp_path / "repo")]}[command]
    with opened_files() as seen:
        result = runner.invoke(app, args)
    one_line_refusal(result, 2, "not a plain relative path")
    assert str((outside / "secret.txt").resolve()) not in seen
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("secret.txt"))


def test_the_tamper_check_cannot_be_emptied(onnx_copy, image):
    folder, outside = onnx_copy
    edit_manifest(folder, lambda m: m["artifact"].update(files={}))
    one_line_refusal(runner.invoke(app, ["predict", image, "--model", str(folder)]), 2, "artifact.files is empty")


def test_the_model_file_must_be_hashed(onnx_copy, image):
    folder, _ = onnx_copy
    (folder / "other.bin").write_bytes(b"x")
    edit_manifest(folder, lambda m: m["artifact"].update(files={"other.bin": sha(folder / "other.bin")}))
    one_line_refusal(runner.invoke(app, ["predict", image, "--model", str(folder)]), 2, "'model.onnx'",
                     "does not hash")


def test_a_file_the_runtime_opens_beside_the_model_must_be_hashed(tmp_path, artifact_128s, image):
    folder = copy_artifact(artifact_128s("openvino"), tmp_path / "ov")
    edit_manifest(folder, lambda m: m["artifact"]["files"].pop("model.bin"))
    one_line_refusal(runner.invoke(app, ["predict", image, "--model", str(folder)]), 2, "'model.bin'")


MALFORMED = {
    "artifact a string": (lambda m: m.update(artifact="model.onnx"), "artifact must be an object"),
    "files a list": (lambda m: m["artifact"].update(files=["model.onnx"]), "artifact.files must be an object"),
    "file empty": (lambda m: m["artifact"].update(file=""), "artifact.file must be a non-empty string"),
    "hash not a sha256": (lambda m: m["artifact"]["files"].update({"model.onnx": 3}), "must be a sha256"),
    "unknown family": (lambda m: m["model"].update(family="resnet"), "not a known family"),
    "unknown format": (lambda m: m["artifact"].update(format="tflite"), "not a known format"),
    "num_classes a string": (lambda m: m["model"].update(num_classes="1000"), "model.num_classes"),
    "input shape": (lambda m: m["input"].update(shape=["batch", 3, 100000, 100000]), "input.shape"),
    "resize 30000": (lambda m: m["preprocessing"].update(resize=30000), "resize and crop"),
    "std zero": (lambda m: m["preprocessing"].update(std=[0, 0, 0]), "std must be three finite numbers > 0"),
    "unknown interpolation": (lambda m: m["preprocessing"].update(interpolation="lanczos"), "interpolation"),
    "source not a path": (lambda m: m["source"].update(source=["x"]), "source.source"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_manifest_is_one_line_in_predict(onnx_copy, image, case):
    folder, _ = onnx_copy
    change, words = MALFORMED[case]
    edit_manifest(folder, change)
    one_line_refusal(runner.invoke(app, ["predict", image, "--model", str(folder), "--json"]), 2, words)


@pytest.mark.parametrize("command", ["parity", "bench", "val", "triton"])
@pytest.mark.parametrize("case", ["unknown family", "files a list", "unknown format"])
def test_a_malformed_manifest_is_one_line_in_every_command(onnx_copy, tmp_path, command, case):
    folder, _ = onnx_copy
    change, words = MALFORMED[case]
    edit_manifest(folder, change)
    data = tmp_path / "val" / "n01440764"
    data.mkdir(parents=True)
    Image.open(bundled_photos()[0]).save(data / "a.jpg")
    args = {"parity": ["parity", str(folder)], "bench": ["bench", str(folder), "--duration", "0.1"],
            "val": ["val", str(tmp_path / "val"), "-m", str(folder)],
            "triton": ["triton", str(folder), "--repo", str(tmp_path / "repo")]}[command]
    one_line_refusal(runner.invoke(app, args), 2, words)


def test_unreadable_manifests(onnx_copy, image):
    folder, _ = onnx_copy
    for text, words in [("{not json", "unreadable manifest"), ("[1, 2]", "not a levit-deploy manifest"),
                        ("[" * 100000 + "]" * 100000, "unreadable manifest")]:
        (folder / MANIFEST_NAME).write_text(text)
        one_line_refusal(runner.invoke(app, ["predict", image, "--model", str(folder)]), 2, words)


def test_a_non_finite_output_is_that_images_error(onnx_copy, image):
    """An artifact whose head bias is NaN (hashes rewritten, so only the output can tell): every image is an error
    record, exit 1, and the JSON holds no NaN."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    folder, _ = onnx_copy
    model = onnx.load(str(folder / "model.onnx"))
    init = next(t for t in model.graph.initializer if numpy_helper.to_array(t).shape == (1000,))
    init.CopyFrom(numpy_helper.from_array(np.full(1000, np.nan, np.float32), init.name))
    onnx.save(model, str(folder / "model.onnx"))
    edit_manifest(folder, lambda m: m["artifact"]["files"].update({"model.onnx": sha(folder / "model.onnx")}))
    result = runner.invoke(app, ["predict", image, "--model", str(folder), "--json"])
    assert result.exit_code == 1, result.output
    records = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))["results"]
    assert records[0]["ok"] is False and "not finite" in records[0]["error"]


def write_hostile_images(folder: Path) -> dict[str, str]:
    """Good photos and strips whose resizing would take gigabytes, with the words each refusal must hold."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in bundled_photos()[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (100000, 1), (200, 10, 10)).save(folder / "wide.png")
    Image.new("L", (1, 250000), 128).save(folder / "tall.png")
    Image.new("RGB", (20000, 1)).save(folder / "strip.png")
    return {"wide.png": "aspect ratio", "tall.png": "aspect ratio", "strip.png": "aspect ratio"}


def test_one_odd_image_does_not_sink_the_run(tmp_path, artifact_128s, monkeypatch):
    images = write_hostile_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "boom.jpg").write_bytes(bundled_photos()[4].read_bytes())
    import levit_deploy.predict as predict_module
    real = predict_module.decode_image

    def decode(source, *args, **kwargs):
        if str(source).endswith("boom.jpg"):
            raise MemoryError()
        return real(source, *args, **kwargs)

    monkeypatch.setattr(predict_module, "decode_image", decode)
    result = runner.invoke(app, ["predict", str(tmp_path / "imgs"), "--model", str(artifact_128s("onnx").folder),
                                 "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    records = {Path(r["path"]).name: r for r in doc["results"]}
    assert sum(r["ok"] for r in records.values()) == 3
    for name, words in {**images, "boom.jpg": "out of memory"}.items():
        assert records[name]["ok"] is False and words in records[name]["error"], records[name]


def test_predict_memory_stays_bounded_on_the_hostile_set(tmp_path, artifact_128s):
    """The whole hostile folder in a fresh process: its peak RSS stays near that of a plain run (measured)."""
    write_hostile_images(tmp_path / "imgs")
    cmd = ["predict", tmp_path / "imgs", "--model", artifact_128s("onnx").folder, "--json"]
    code, _, err, peak_kib = run_measured(cmd, 300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak_mb = peak_kib / 1024
    assert code == 1, err
    assert "Traceback" not in err
    print(f"predict over the hostile set: peak RSS {peak_mb:.0f} MB")
    assert 0 < peak_mb < 2500, f"predict took {peak_mb:.0f} MB of RSS on the hostile set (a 20000x1 strip took 5.6 GB)"


def test_a_fifo_as_source_is_refused_at_once(onnx_copy, tmp_path):
    folder, _ = onnx_copy
    fifo = tmp_path / "ckpt.pth"
    os.mkfifo(fifo)
    edit_manifest(folder, lambda m: m["source"].update(source=str(fifo), layout="official"))
    proc = subprocess.run([sys.executable, "-m", "levit_deploy.cli", "parity", str(folder)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "regular file" in proc.stderr or "FIFO" in proc.stderr or "fifo" in proc.stderr, proc.stderr


# --- publishing ------------------------------------------------------------------------------------------------

def folder_state(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(folder.iterdir())}


def test_a_concurrent_export_into_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    with export_lock(out):
        result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "onnx", "--out", str(out)])
    one_line_refusal(result, 2, "another export is writing into this folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written outside --out, --out removed again


def test_export_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", "levit_128s", "--init", "random", "--to", "onnx", "--out", str(tmp_path)])
    one_line_refusal(result, 2, "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_killed_export_leaves_the_previous_artifact_whole_and_its_staging_is_cleaned(tmp_path, artifact_128s):
    """SIGKILL while the new artifact is staged: the folder is the old artifact, byte for byte, and it verifies;
    the next export removes the killed one's staging folder, and publishes all files at once."""
    import levit_deploy as ld
    from conftest import trained_like_model

    out = copy_artifact(artifact_128s("onnx"), tmp_path / "out")
    before = folder_state(out)
    proc = subprocess.Popen([sys.executable, "-m", "levit_deploy.cli", "export", "levit_128s", "--init", "random",
                             "--to", "onnx", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".out.staging-*/model.onnx")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".out.staging-*")), "the export was not caught while staging"
    assert folder_state(out) == before
    ld.open_runtime(out).close()  # opening verifies every hash
    art = ld.export(trained_like_model("levit_128s"), "onnx", out)
    assert not list(tmp_path.glob(".out.*")), "a staging folder was left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    after = folder_state(out)
    assert after["manifest.json"] != before["manifest.json"]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["artifact"]["files"] == {"model.onnx": after["model.onnx"]} and art.parity["status"] == "passed"


def test_a_failed_publish_keeps_the_previous_artifact(tmp_path, artifact_128s, monkeypatch):
    import levit_deploy as ld
    import levit_deploy.artifacts as artifacts
    from conftest import trained_like_model

    out = copy_artifact(artifact_128s("onnx"), tmp_path / "out")
    before = folder_state(out)

    def broken(new, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts, "_exchange", broken)
    with pytest.raises(OSError):
        ld.export(trained_like_model("levit_128s"), "onnx", out)
    assert folder_state(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

