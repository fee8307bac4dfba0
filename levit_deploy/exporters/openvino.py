"""OpenVINO IR (.xml + .bin) from the fused, simplified ONNX graph.

``ov.save_model`` compresses weights to fp16 by default; fp32 here passes compress_to_fp16=False so
an fp32 artifact really holds fp32 weights, and fp16 says so in the manifest.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..runtimes.base import require
from . import ExportError, ExportOptions, StagedArtifact
from . import onnx as onnx_exporter


def write(model: torch.nn.Module, staging: Path, opts: ExportOptions) -> StagedArtifact:
    ov = require("openvino", "OpenVINO export")
    if opts.precision not in ("fp32", "fp16"):
        raise ExportError(f"OpenVINO export supports fp32 and fp16, not {opts.precision}")
    onnx_dir = staging / "onnx"
    onnx_dir.mkdir()
    # the IR is converted from an fp32 graph; fp16 is a property of how the IR stores its weights
    staged_onnx = onnx_exporter.write(model, onnx_dir, dataclasses.replace(opts, precision="fp32"))
    batch = -1 if opts.batch == "dynamic" else int(opts.batch)
    size = model.config.img_size
    ir = ov.convert_model(str(onnx_dir / staged_onnx.file), input=[("pixel_values", [batch, 3, size, size])])
    ov.save_model(ir, str(staging / "model.xml"), compress_to_fp16=opts.precision == "fp16")
    for f in onnx_dir.iterdir():
        f.unlink()
    onnx_dir.rmdir()
    notes = list(staged_onnx.notes)
    if opts.precision == "fp16":
        notes.append("weights stored as fp16 (compress_to_fp16=True); the CPU plugin computes in fp32 unless "
                     "asked for bf16")
    details = {"ir_weights": "fp16" if opts.precision == "fp16" else "fp32", "openvino": ov.__version__,
               "converted_from": f"fused ONNX opset {staged_onnx.details['opset']}"}
    return StagedArtifact(file="model.xml", runtime="openvino", details=details, notes=notes,
                          extra_files=["model.bin"])
