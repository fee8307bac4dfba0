"""Hostile checkpoints: odd tensors, deep or cyclic pickled objects, memory bombs, files that are not files.

Each is refused in one line (what was found, what was expected) or read with a bounded placeholder, never a
traceback, a hang or gigabytes of memory. Most cases use the API in-process; a few run the CLI as a user would."""
import contextlib
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import warnings
import zipfile

import pytest
import torch

from conftest import run_measured
from levit_deploy import checkpoints
from levit_deploy.checkpoints import MAX_BUILT_BYTES, CheckpointError, load, read_checkpoint

KEY = "patch_embed.0.c.weight"  # the first weight of LeViT's official layout
GIB = 1 << 30


@pytest.fixture(scope="module")
def official_sd():
    """A valid LeViT-128S state dict in the official layout (random weights)."""
    from levit_deploy.families.levit.layouts import from_canonical

    model = load("levit_128s", init="random", seed=1)
    return from_canonical(model.state_dict(), "official", model.config)


def _save(path, sd, **others):
    torch.save({"model": sd, **others}, path)
    return path


def _cli(*args, timeout=60, preexec_fn=None):
    """(exit code, stdout, stderr, peak RSS in bytes) of ``levit-deploy ARGS`` in a child process."""
    proc = subprocess.Popen([sys.executable, "-m", "levit_deploy.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"levit-deploy {' '.join(map(str, args))} did not finish within {timeout} s")
    return proc.returncode, out, err


def _assert_one_line_error(code, out, err, *expected, progress=False):
    """Exit 2 and one error line on stderr (after progress lines such as 'loading …', where a command prints them)."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and (progress or len(lines) == 1), err
    for text in expected:
        assert text in errors[0], errors[0]


# ---------------------------------------------------------------------------------------------
# Tensors that cannot be weights


def _quantized(t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized dtypes are deprecated
        return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)


def _with_nan(t):
    t = t.clone()
    t.view(-1)[[3, 7]] = float("nan")
    return t


def _with_inf(t):
    t = t.clone()
    t.view(-1)[0] = float("-inf")
    return t


ODD_TENSORS = {
    "sparse": (lambda t: t.to_sparse(), "is a sparse tensor (sparse_coo); expected dense weights"),
    "meta": (lambda t: torch.empty_like(t, device="meta"), "is a meta tensor"),
    "qint8": (_quantized, "is a quantized tensor (qint8); expected floating-point weights"),
    "complex": (lambda t: t.to(torch.complex64), "is complex (complex64); expected real floating-point weights"),
    "nan": (_with_nan, "holds 2 NaN values (of 432); expected finite weights"),
    "inf": (_with_inf, "holds 1 infinite value (of 432); expected finite weights"),
}


@pytest.mark.parametrize("kind", ODD_TENSORS)
def test_odd_tensors_are_refused_naming_the_key(tmp_path, official_sd, kind):
    make, expected = ODD_TENSORS[kind]
    path = _save(tmp_path / f"{kind}.pth", {**official_sd, KEY: make(official_sd[KEY])})
    with pytest.raises(CheckpointError) as e:
        load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {KEY} {expected}") and "\n" not in message, message


def test_nan_weights_are_refused_by_info_and_export(tmp_path, official_sd):
    """NaN weights used to pass `info` and then be refused by fusion as 'broke parity'."""
    path = _save(tmp_path / "nan.pth", {**official_sd, KEY: _with_nan(official_sd[KEY])})
    _assert_one_line_error(*_cli("info", path), KEY, "holds 2 NaN values", "expected finite weights")
    _assert_one_line_error(*_cli("export", path, "--to", "onnx", "--out", tmp_path / "out"), KEY, "NaN",
                           progress=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Hand-crafted pickles: a valid checkpoint whose 'config' entry is replaced by raw pickle opcodes

PLACEHOLDER = "CONFIG-PLACEHOLDER"


def _crafted(path, sd, config_opcodes: bytes):
    """torch.save({'model': sd, 'config': <config_opcodes>}): the config's opcodes go straight into data.pkl."""
    buffer = io.BytesIO()
    torch.save({"model": sd, "config": PLACEHOLDER}, buffer)
    marker = b"X" + struct.pack("<I", len(PLACEHOLDER)) + PLACEHOLDER.encode()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(marker) == 1
                data = data.replace(marker, config_opcodes)
            zout.writestr(info, data)
    return path


def _long(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def _bytearray_of(n: int) -> bytes:
    return b"c__builtin__\nbytearray\n" + _long(n) + pickle.TUPLE1 + pickle.REDUCE


def _text(s: str) -> bytes:
    return pickle.BINUNICODE + struct.pack("<I", len(s.encode())) + s.encode()


def test_deep_and_cyclic_configs_are_described_in_one_bounded_line(tmp_path, official_sd):
    n = 100_000
    deep_list = pickle.EMPTY_LIST * n + pickle.APPEND * (n - 1)
    # a dict keyed by a tuple nested 100,000 deep: hashing it overflows the C stack (a segfault, not an error)
    deep_key = pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * n + pickle.BININT1 + b"\x01" + pickle.SETITEM
    # a yacs-like config (an unknown dict subclass) that holds itself, and a plain dict that holds itself
    cyclic = (b"cyacs.config\nCfgNode\n" + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.LONG_BINPUT
              + struct.pack("<I", 900_000) + pickle.MARK + _text("self") + pickle.LONG_BINGET
              + struct.pack("<I", 900_000) + _text("plain") + pickle.EMPTY_DICT + pickle.LONG_BINPUT
              + struct.pack("<I", 900_001) + _text("again") + pickle.LONG_BINGET + struct.pack("<I", 900_001)
              + pickle.SETITEM + _text("lists") + deep_list + pickle.SETITEMS)
    config = pickle.MARK + deep_list + deep_key + cyclic + pickle.TUPLE
    path = _crafted(tmp_path / "deep.pth", official_sd, config)
    info = load(path).load_info
    described = info.entries["config"]
    assert info.variant == "levit_128s" and info.entries["model"] == "state dict (336 tensors)"
    assert described.startswith("([[…1 items]], {<tuple nested over 1000 levels deep, not built>: 1}, ")
    assert "yacs.config.CfgNode" in described and len(described) <= 400
    assert any("read as data, not run: yacs.config.CfgNode" in note for note in info.notes)

    code, out, err = _cli("info", path)
    assert code == 0 and "Traceback" not in out + err and not err.strip(), err
    assert re.search(r"^entry +config: \(\[\[…1 items\]\], ", out, re.M), out


class Cfg(dict):
    """A config class the loader has never heard of (it becomes a placeholder)."""


def test_a_self_referential_config_entry(tmp_path, official_sd):
    cfg = Cfg(lr=0.1)
    cfg["self"] = cfg
    plain = {"name": "run"}
    plain["self"] = plain
    path = _save(tmp_path / "cyclic.pth", official_sd, cfg=cfg, plain=plain, args=[plain, [plain]])
    entries = load(path).load_info.entries
    assert entries["cfg"] == ("test_hostile_checkpoints.Cfg (read as data: lr=0.1, self=test_hostile_checkpoints.Cfg"
                              "{lr: 0.1, self: test_hostile_checkpoints.Cfg{lr: 0.1, self: test_hostile_checkpoints.Cfg"
                              "{…2 entries}}})")
    assert entries["plain"] == "dict (2 entries: name, self)"
    assert entries["args"] == "[{name: 'run', self: {…2 entries}}, [{…2 entries}]]"


def test_huge_bytearray_and_memo_in_a_tiny_config_stay_bounded(tmp_path, official_sd):
    """bytearray(3 GiB) costs 26 bytes of pickle; a LONG_BINPUT near 2**32 makes C pickle allocate and clear 32 GiB
    for its memo. Both sit in a config beside valid weights: the weights load, the config is described, and the
    process stays small (its address space is capped at 4 GiB: if either were built, it would fail instead)."""
    config = _bytearray_of(3 * GIB) + pickle.LONG_BINPUT + struct.pack("<I", 0xFFFFFFF0)
    path = _crafted(tmp_path / "bomb.pth", official_sd, config)

    code, out, err, child_peak_kib = run_measured(["info", path], 60, address_space=4 * GIB)
    assert code == 0 and "Traceback" not in out + err, err
    assert re.search(r"^entry +config: <bytearray of 3,221,225,472 bytes, not built>$", out, re.M), out
    assert 0 < child_peak_kib < 1.5 * (1 << 20), f"a child peaked at {child_peak_kib / (1 << 20):.1f} GiB"


def test_amplifying_constructors_build_placeholders(tmp_path, official_sd):
    """Each of these would build far more than the file holds; they become descriptions, and the weights load."""
    encode = b"c_codecs\nencode\n"
    hex_chain = pickle.SHORT_BINBYTES + bytes([64]) + b"\0" * 64  # 64 bytes, hex-encoded 30 times: 64 GiB
    for _ in range(30):
        hex_chain = encode + pickle.MARK + hex_chain + _text("hex") + pickle.TUPLE + pickle.REDUCE
    legacy_tensor = b"ctorch\nByteTensor\n" + _long(GIB) + pickle.TUPLE1 + pickle.REDUCE  # uninitialised, 1 GiB
    as_set = b"c__builtin__\nset\n" + legacy_tensor + pickle.TUPLE1 + pickle.REDUCE  # a billion 0-d tensors
    config = (pickle.EMPTY_DICT + pickle.MARK + _text("hex") + hex_chain + _text("set") + as_set
              + _text("blob") + _bytearray_of(MAX_BUILT_BYTES + 1) + _text("small") + _bytearray_of(3)
              + pickle.SETITEMS)
    raw = read_checkpoint(_crafted(tmp_path / "amplifiers.pth", official_sd, config))
    assert len(raw.tensors) == 336
    assert raw.entries["config"] == "dict (4 entries: hex, set, blob, small)"
    obj = torch.load(tmp_path / "amplifiers.pth", weights_only=False,
                     pickle_module=checkpoints._restricted_pickle_module([]))["config"]
    assert obj["hex"] == "<encoded bytes of 2,097,152 bytes, not built>"
    assert obj["set"] == f"<set of {GIB:,} bytes, not built>"
    assert obj["blob"] == f"<bytearray of {MAX_BUILT_BYTES + 1:,} bytes, not built>"
    assert obj["small"] == bytearray(3)


def test_a_compressed_record_is_not_inflated(tmp_path, official_sd):
    """torch.load inflates deflated zip records; torch.save never writes one: a zip bomb is refused unread."""
    path = _save(tmp_path / "plain.pth", official_sd)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
        zout.writestr(f"{info.filename.split('/')[0]}/data/999", b"\0" * (64 << 20), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"would inflate to 67,108,864 bytes from a [\d,]+-byte file; "
                                              r"torch.save never compresses"):
        read_checkpoint(bomb)


def test_pickled_code_still_never_runs(tmp_path, official_sd):
    """The restricted unpickler calls only allowed globals and changes only what it built."""
    marker = tmp_path / "pwned"
    system = b"cposix\nsystem\n" + _text(f"touch {marker}") + pickle.TUPLE1 + pickle.REDUCE
    # BUILD on an allowed global: would set torch.Tensor.__reduce_ex__ for the whole process
    patch_class = (b"ctorch\nTensor\n" + pickle.NONE + pickle.EMPTY_DICT + _text("__reduce_ex__") + system
                   + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD)
    original = vars(torch.Tensor)["__reduce_ex__"]
    raw = read_checkpoint(_crafted(tmp_path / "ok.pth", official_sd, system))
    assert raw.entries["config"] == "posix.system (read as data)" and not marker.exists()
    with pytest.raises(CheckpointError, match=r"corrupt or truncated torch checkpoint \(UnpicklingError: the "
                                              r"pickle's BUILD changes <torch.Tensor>, which it did not build\)"):
        read_checkpoint(_crafted(tmp_path / "patch.pth", official_sd, patch_class))
    assert vars(torch.Tensor)["__reduce_ex__"] is original and not marker.exists()


# ---------------------------------------------------------------------------------------------
# Paths that are not regular files


@contextlib.contextmanager
def _unblocked_after(fifo, seconds=30):
    """A reader blocked on ``fifo`` gets end-of-file after ``seconds``: a regression fails instead of hanging."""
    def writer_comes_and_goes():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: nothing was blocked
            pass

    timer = threading.Timer(seconds, writer_comes_and_goes)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def test_a_fifo_is_refused_at_once(tmp_path, official_sd):
    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)
    _assert_one_line_error(*_cli("info", fifo), f"{fifo}: is a named pipe (FIFO), not a regular file")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    os.mkfifo(hf / "model.safetensors")
    with _unblocked_after(hf / "model.safetensors"), pytest.raises(
            CheckpointError, match=r"hf/model.safetensors: is a named pipe \(FIFO\), not a regular file"):
        load(hf)  # a folder's weights file is read only when it is a regular file too


def test_a_device_and_a_folder_are_refused(tmp_path, official_sd):
    with pytest.raises(CheckpointError, match=r"^/dev/zero: is a character device, not a regular file; expected"):
        load("/dev/zero")
    with pytest.raises(CheckpointError, match=r"^/dev/zero: is a character device"):
        load("levit_128s", weights="/dev/zero")
    with pytest.raises(CheckpointError, match=r": is a folder; pass the checkpoint file"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r": no weights file; expected one of model.safetensors"):
        load(tmp_path)
    folder = tmp_path / "pytorch_model.bin"  # a folder where the weights file should be
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: is a folder"):
        load(tmp_path)
    _save(tmp_path / "model.pth", official_sd)  # a regular weights file next to it is the one read
    assert load(tmp_path).load_info.variant == "levit_128s"
