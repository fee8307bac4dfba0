"""ONNX export of DeployLevit: batch axis dynamic (or fixed), 224x224 fixed, simplified, checked clean."""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections import Counter
from pathlib import Path

import torch

from ..runtimes.base import require
from . import ExportError, ExportOptions, StagedArtifact

MIN_OPSET = 13  # strided slicing (the shrink-attention subsample) needs 13+
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter implements 18 and later
FORBIDDEN_OPS = {"BatchNormalization", "Dropout", "GatherND", "ScatterND", "If", "Loop"}


class Float16Graph(torch.nn.Module):
    """fp16 weights and compute behind a float32 interface: the graph casts on the way in and out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.half()
        self.config = model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def _torch_export(model: torch.nn.Module, path: Path, opts: ExportOptions) -> None:
    if opts.precision == "fp16":
        model = Float16Graph(copy.deepcopy(model))
    batch = 2 if opts.batch == "dynamic" else int(opts.batch)
    example = torch.randn(batch, 3, model.config.img_size, model.config.img_size)
    common = dict(input_names=["pixel_values"], output_names=["logits"], opset_version=opts.opset)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if opts.opset >= DYNAMO_MIN_OPSET:
            shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if opts.batch == "dynamic" else None
            torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=shapes,
                              external_data=False, verbose=False, **common)
        else:  # the TorchScript exporter, for older runtimes that need opset 13-17
            axes = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if opts.batch == "dynamic" else None
            torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes, **common)


def check_graph(graph) -> dict[str, int]:
    """Op histogram; raises ExportError on ops a deploy graph must not contain."""
    ops = Counter(node.op_type for node in graph.node)
    int_inits = {i.name for i in graph.initializer if i.data_type in (6, 7)}  # INT32, INT64
    gathers = [n.name for n in graph.node if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in int_inits
               and _initializer_size(graph, n.input[1]) > 1]
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    if bad or gathers:
        raise ExportError(f"exported graph is not deploy-clean: forbidden ops {bad}, index-table gathers "
                          f"{gathers[:3]}")
    return dict(sorted(ops.items()))


def _initializer_size(graph, name: str) -> int:
    for init in graph.initializer:
        if init.name == name:
            n = 1
            for d in init.dims:
                n *= d
            return n
    return 0


def write(model: torch.nn.Module, staging: Path, opts: ExportOptions) -> StagedArtifact:
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    if opts.opset < MIN_OPSET:
        raise ExportError(f"opset {opts.opset} is too old: LeViT's stride-2 token subsampling needs "
                          f"opset >= {MIN_OPSET}")
    if opts.precision not in ("fp32", "fp16"):
        raise ExportError(f"ONNX export supports fp32 and fp16, not {opts.precision}")
    path = staging / "model.onnx"
    _torch_export(model, path, opts)
    proto = onnx.load(str(path))
    notes, simplified = [], False
    if opts.simplify:
        try:
            onnxsim = require("onnxsim", "ONNX simplification")
            with contextlib.redirect_stdout(io.StringIO()):
                candidate, ok = onnxsim.simplify(proto)
            if ok:
                proto, simplified = candidate, True
            else:
                notes.append("onnxsim could not validate the simplified graph; kept the unsimplified one")
        except Exception as e:  # noqa: BLE001 - simplification is an optimisation, never a failure
            notes.append(f"simplification failed ({type(e).__name__}: {str(e)[:200]}); kept the unsimplified graph")
    if opts.precision == "fp16":
        notes.append("weights and compute in float16; input pixel_values and output logits stay float32")
    ops = check_graph(proto.graph)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    details = {"opset": opset, "simplified": simplified, "ops": ops,
               "exporter": "torch.onnx (dynamo)" if opts.opset >= DYNAMO_MIN_OPSET else "torch.onnx (TorchScript)"}
    return StagedArtifact(file="model.onnx", runtime="ort", details=details, notes=notes)
