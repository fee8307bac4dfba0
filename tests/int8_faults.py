"""Faults an int8 gate must refuse, shared by tests/test_int8_remedy.py and benchmarks/int8_floor_factor.py: an
activation's dequantization scale doubled in a shipped ONNX graph (a converter bug), and a calibration set of
blank images (a user mistake)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image


def double_one_activation_scale(folder: Path) -> None:
    """The dequantization scale of one activation in the middle of the network doubled (its QuantizeLinear keeps the
    old one): that activation comes out twice too large, as a converter bug would make it. The manifest is rehashed,
    so the gate and not the tamper check refuses it."""
    import onnx  # optional, as the onnx backend is
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits
                   and numpy_helper.to_array(inits[n.input[1]]).size == 1]
    node = activations[len(activations) // 2]
    doubled = numpy_helper.from_array(numpy_helper.to_array(inits[node.input[1]]) * 2, node.input[1] + "_doubled")
    model.graph.initializer.append(doubled)
    node.input[1] = doubled.name
    onnx.save(model, str(folder / "model.onnx"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifact"]["files"]["model.onnx"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def write_blank_images(folder: Path, n: int = 20) -> Path:
    """``n`` flat grey-pink PNGs: a calibration set with no content."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (256, 256), (128 + i, 128, 128)).save(folder / f"{i}.png")
    return folder
