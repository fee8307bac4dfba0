"""ONNX: the fused model through torch.onnx (batch axis dynamic or fixed, image size fixed), simplified and
checked clean, run by ONNX Runtime (CPU by default; CUDA and TensorRT execution providers on request)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..env import int8_products_saturate, require
from ..probe import Graph, Node, Probe, param_name, run_in_chunks
from ..quantize import QuantOptions, check_recipe
from .base import Backend, ExportError, Runtime, RuntimeConfig, RuntimeUnavailable, StagedArtifact

MIN_OPSET = 13  # strided slicing (the shrink-attention subsample) needs 13+
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter implements 18 and later
FORBIDDEN_OPS = {"BatchNormalization", "Dropout", "GatherND", "ScatterND", "If", "Loop"}
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


@dataclass
class OnnxOptions(QuantOptions):
    # 20: GELU is one Gelu op (ONNX Runtime runs LightViT-S 1.12x faster than with opset 19's erf pattern,
    # which it does not fuse after this exporter); LITv2's DeformConv needs 19
    opset: int = field(default=20, metadata={"help": "ONNX opset: 18+ uses the torch.export exporter, 13-17 the "
                                                     "TorchScript one (LITv2's DeformConv needs 19+)"})
    simplify: bool = field(default=True, metadata={"help": "simplify the graph with onnxsim when installed"})
    int8_weights: str = field(default="auto", metadata={
        "help": "int8: weight type. int8 (U8S8 kernels): the fast path on CPUs with VNNI or AMX, but on x86-64 "
                "without them its 16-bit intermediate sums saturate (LightViT-T: worst cosine 0.907 instead of "
                "0.990). uint8 (U8U8): exact on every CPU. auto: uint8 on a CPU that saturates, else int8"})

    def __post_init__(self):
        if self.int8_weights not in WEIGHT_TYPES:
            raise ValueError(f"int8_weights must be one of {', '.join(WEIGHT_TYPES)}, got {self.int8_weights!r}")


REDUCED = {"fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_TYPES = ("auto", "uint8", "int8")


class ReducedPrecisionGraph(torch.nn.Module):
    """fp16 or bf16 weights and compute behind a float32 interface: the graph casts on the way in and out
    (what a strongly typed TensorRT network builds its reduced-precision engine from)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype
        self.config = model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def _torch_export(model: torch.nn.Module, path: Path, precision: str, batch, opset: int, optimize: bool = True) -> None:
    """``optimize``: the torch.export exporter's own graph optimisation; skipped when onnxsim simplifies
    afterwards, which gives the same graph (same node count, same outputs, same speed measured) in a
    quarter less time."""
    if precision in REDUCED:
        model = ReducedPrecisionGraph(copy.deepcopy(model), REDUCED[precision])
    example = torch.randn(2 if batch == "dynamic" else int(batch), 3, model.config.img_size, model.config.img_size)
    common = dict(input_names=["pixel_values"], output_names=["logits"], opset_version=opset)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if opset >= DYNAMO_MIN_OPSET:
            shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if batch == "dynamic" else None
            translations = getattr(model, "onnx_translations", dict)()  # a model's own custom ops, if any
            torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=shapes,
                              external_data=False, verbose=False, optimize=optimize,
                              custom_translation_table=translations or None, **common)
        else:  # the TorchScript exporter, for older runtimes that need opset 13-17
            axes = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if batch == "dynamic" else None
            torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes, **common)


def check_graph(graph) -> dict[str, int]:
    """Op histogram; raises ExportError on ops a deploy graph must not contain."""
    ops = Counter(node.op_type for node in graph.node)
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer if i.data_type in (6, 7)}  # INT32, INT64
    gathers = [n.name for n in graph.node if n.op_type == "Gather" and len(n.input) > 1 and sizes.get(n.input[1], 0) > 1]
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    if bad or gathers:
        raise ExportError(f"exported graph is not deploy-clean: forbidden ops {bad}, index-table gathers "
                          f"{gathers[:3]}")
    return dict(sorted(ops.items()))


def write_onnx(model: torch.nn.Module, staging: Path, precision: str = "fp32", batch="dynamic",
               options: OnnxOptions | None = None) -> StagedArtifact:
    """model.onnx in ``staging``; also the first step of the backends that convert from ONNX."""
    onnx = require("onnx", "ONNX export", "onnx")
    require("onnxscript", "ONNX export", "onnx")
    options = options or OnnxOptions()
    if options.opset < MIN_OPSET:
        raise ExportError(f"opset {options.opset} is too old: strided token subsampling needs "
                          f"opset >= {MIN_OPSET}")
    path = staging / "model.onnx"
    onnxsim = _optional("onnxsim") if options.simplify else None
    _torch_export(model, path, precision, batch, options.opset, optimize=onnxsim is None)
    proto = onnx.load(str(path))
    notes, simplified = [], False
    if options.simplify and onnxsim is None:
        notes.append("onnxsim is not installed: the graph was not simplified (pip install 'levit-deploy[onnx]')")
    elif options.simplify:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                candidate, ok = onnxsim.simplify(proto)
            if ok:
                proto, simplified = candidate, True
            else:
                notes.append("onnxsim could not validate the simplified graph; kept the exporter's optimised one")
        except Exception as e:  # noqa: BLE001 - simplification is an optimisation, never a failure
            notes.append(f"simplification failed ({type(e).__name__}: {str(e)[:200]}); kept the exporter's "
                         f"optimised graph")
        if not simplified:  # fall back to the exporter's own optimisation
            _torch_export(model, path, precision, batch, options.opset, optimize=True)
            proto = onnx.load(str(path))
    if precision in REDUCED:
        notes.append(f"weights and compute in {REDUCED[precision]}; input pixel_values and output logits stay float32")
    ops = check_graph(proto.graph)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    details = {"opset": opset, "simplified": simplified, "ops": ops,
               "exporter": "torch.onnx (dynamo)" if options.opset >= DYNAMO_MIN_OPSET else "torch.onnx (TorchScript)"}
    return StagedArtifact(file="model.onnx", details=details, notes=notes)


@contextlib.contextmanager
def fp32_onnx(model: torch.nn.Module, opts, options: OnnxOptions | None = None):
    """(path, staged) of the fused fp32 ONNX graph an int8 or OpenVINO artifact is made from. With the export's
    scratch folder (``opts.scratch``: an int8 search quantizes the same graph on every attempt) it is written
    for the first attempt and read back for the others; without one, into a folder removed afterwards."""
    with contextlib.ExitStack() as stack:
        folder = (opts.scratch / "fp32-onnx" if opts.scratch
                  else Path(stack.enter_context(tempfile.TemporaryDirectory())))
        record = folder / "staged.json"
        if not record.is_file():
            folder.mkdir(exist_ok=True)
            staged = write_onnx(model, folder, "fp32", opts.batch, options)
            record.write_text(json.dumps({"file": staged.file, "details": staged.details, "notes": staged.notes}))
        written = json.loads(record.read_text())
        yield folder / written["file"], StagedArtifact(file=written["file"], details=written["details"],
                                                       notes=written["notes"])


def _optional(module: str):
    try:
        return require(module, "", "onnx")
    except ImportError:
        return None


#: what ONNX Runtime quantizes: the ops with weights, which carry the FLOPs. Measured on LeViT-128S (1 thread,
#: batch 16): adding Add and Mul cost 15 % speed for no accuracy; HardSwish is not in ORT's quantizable list, so
#: it runs in fp32 between a DequantizeLinear and a QuantizeLinear either way. Attention's activation-by-
#: activation MatMuls stay fp32, and so do convolutions: with them quantized, trained-like LightViT-T reached
#: cosine 0.92 to fp64 on photos, 0.98 with only its depthwise ones kept fp32, 0.9995 with none (measured).
#: Quantizing the activation-by-activation MatMuls as well changed no accuracy and moved speed both ways
#: (LeViT-128S 430 vs 461 img/s, LightViT-T 102 vs 89): kept fp32 for LeViT, the flagship
INT8_OPS = ("MatMul", "Gemm")


def layer_paths(graph, op_types) -> dict[str, str]:
    """ONNX node name -> module path of the deployed model, for the nodes of ``op_types`` that carry weights.

    The exporter names initializers after the module's parameters (``stages.0.inner.qkv.bias``); a weight it
    transposed into a new constant keeps the bias's name beside it, so one of the two always names the module."""
    weights = {i.name for i in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        params = [i for i in node.input if i in weights and i.rsplit(".", 1)[-1] in ("weight", "bias")]
        if params:
            out[node.name] = params[0].rsplit(".", 1)[0]
    return out


def quantize_qdq(fp32_path: Path, out_path: Path, calibration, keep_float=(), weights: str = "auto") -> dict:
    """ONNX Runtime static quantization: QDQ format, per-channel 8-bit weights, uint8 activations with MinMax
    ranges from the calibration images fed at batch 1. ``weights``: int8 (U8S8, VNNI's path; it saturates on
    x86-64 CPUs without VNNI: ``env.int8_products_saturate``), uint8 (U8U8, exact everywhere), or auto (uint8 where
    this CPU saturates). S8S8 saturates the same way and ran no faster than fp32 here. ``keep_float``: module paths
    left in float. Returns what the manifest records, with ``layers``: the module paths quantized."""
    require("onnxruntime", "int8 ONNX export", "onnx")
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration.inputs)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"pixel_values": np.ascontiguousarray(x[None])}

    prepared = out_path.with_name("prepared.onnx")
    if weights == "auto":
        weights = "uint8" if int8_products_saturate() else "int8"
    weight_type = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[weights]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32_path), str(prepared))
        onnx = require("onnx", "int8 ONNX export", "onnx")
        graph = onnx.load(str(prepared)).graph
        paths = layer_paths(graph, INT8_OPS)
        check_recipe(keep_float, list(paths.values()))
        nodes = [name for name, path in paths.items() if path not in keep_float]
        quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=weight_type, nodes_to_quantize=nodes,
                        op_types_to_quantize=list(INT8_OPS), calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink()
    kept = sum(n.op_type in INT8_OPS for n in graph.node) - len(paths)
    kernels = {"weights": weights, "saturate_without_vnni": weights == "int8", "exact_with": "-o int8_weights=uint8"}
    return {"layers": [paths[n] for n in nodes],
            "method": f"onnxruntime quantize_static, QDQ, per-channel {weights} weights, uint8 activations, MinMax",
            "kernels": kernels, "quantized_ops": f"{len(nodes)} {'/'.join(INT8_OPS)} nodes with weights",
            "ignored_scope": f"{len(keep_float)} layers kept in float (keep_float), {kept} activation-by-activation "
                             f"MatMuls (attention q·kᵀ, attn·v), convolutions and every other op type stay fp32",
            "calibration_batch": 1}


def write(model: torch.nn.Module, staging: Path, opts) -> StagedArtifact:
    if opts.precision != "int8":
        return write_onnx(model, staging, opts.precision, opts.batch, opts.target)
    with fp32_onnx(model, opts, opts.target) as (fp32_path, staged):
        quant = quantize_qdq(fp32_path, staging / "model.onnx", opts.calibration, opts.keep_float,
                             (opts.target or OnnxOptions()).int8_weights)
    onnx = require("onnx", "ONNX export", "onnx")
    ops = Counter(n.op_type for n in onnx.load(str(staging / "model.onnx")).graph.node)
    details = {**staged.details, "ops": dict(sorted(ops.items())), "quantization": quant}
    return StagedArtifact(file="model.onnx", details=details, notes=list(staged.notes))


PLAIN_OPSET = 17  # torch.onnx.export's TorchScript path, what most export scripts in the wild still call


def write_plain(model: torch.nn.Module, stem: Path) -> Path:
    """The baseline a user has without us: the unfused model straight through torch.onnx (written once).
    The TorchScript path exports in a second where the dynamo path needs up to 80 s on unfused graphs, and
    its graph ran no slower under ORT (LeViT-128S, batch 16, 1 thread: 56.1 vs 59.6 ms median)."""
    path = stem.with_suffix(".onnx")
    if not path.exists():
        _torch_export(model, path, "fp32", "dynamic", PLAIN_OPSET)
    return path


class OrtRuntime(Runtime):
    """ONNX Runtime, one session; ``threads`` sets intra-op threads (inter-op 1, sequential)."""

    name = "ort"

    def __init__(self, path, config: RuntimeConfig = RuntimeConfig(), provider: str | None = None):
        """``provider``: cpu, cuda or tensorrt (execution providers of onnxruntime-gpu); default from device."""
        super().__init__(path, config)
        if self.compute != self.precision:
            raise ValueError(f"ort runs a {self.precision} graph as it is; export in {self.compute} instead")
        self.provider = provider or ("cuda" if self.device.startswith("cuda") else "cpu")

    def _open(self) -> None:
        ort = BACKEND.require("the 'ort' runtime")
        wanted = PROVIDERS[self.provider]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise RuntimeUnavailable(f"ort runtime: {wanted[0]} is not available in this onnxruntime "
                                     f"(available: {', '.join(available)}); install onnxruntime-gpu for "
                                     f"CUDA/TensorRT")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, sess_options=opts,
                                            providers=[p for p in wanted if p in available])
        self.input_name = self.session.get_inputs()[0].name
        self.ort_version = ort.__version__

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0].astype(np.float32, copy=False)

    def _info(self) -> dict:
        return {"onnxruntime": self.ort_version, "providers": self.session.get_providers(),
                "graph_optimization": "all"}

    def _close(self) -> None:
        self.session = None


class OnnxProbe(Probe):
    """The shipped ONNX graph read into memory; a prefix is the nodes the tensor depends on, run by ONNX Runtime
    with the runtime's own session options. The file is only read."""

    def __init__(self, folder: Path, manifest: dict, deploy=None):
        self.load(folder / manifest["artifact"]["file"])

    def load(self, path: Path) -> None:
        onnx = require("onnx", "--locate", "onnx")
        self.model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        self.types = {v.name: v.type.tensor_type.elem_type for v in self.model.graph.value_info}
        self.types.update({v.name: v.type.tensor_type.elem_type for v in self.model.graph.output})

    def graph(self) -> Graph:
        g = self.model.graph
        weights = {i.name for i in g.initializer}
        nodes = [Node(n.name, list(n.input), list(n.output), [p for i in n.input if i in weights and (p := param_name(i))],
                      shape_only=n.op_type in ("Shape", "Size")) for n in g.node]
        return Graph(nodes, g.input[0].name, g.output[0].name)

    def prefix(self, tensors: list[str]):
        """A copy of the graph that ends at ``tensors``: the nodes they depend on, the initializers those read."""
        onnx = require("onnx", "--locate", "onnx")
        g = self.model.graph
        producer = {o: n for n in g.node for o in n.output}
        needed, stack = set(), list(tensors)
        while stack:
            node = producer.get(stack.pop())
            if node is not None and id(node) not in needed:
                needed.add(id(node))
                stack.extend(node.input)
        kept = [n for n in g.node if id(n) in needed]
        used = {i for n in kept for i in n.input}
        outs = [onnx.helper.make_tensor_value_info(t, self.types.get(t, onnx.TensorProto.FLOAT), None) for t in tensors]
        graph = onnx.helper.make_graph(kept, "prefix", [g.input[0]], outs, [i for i in g.initializer if i.name in used])
        return onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)

    def run(self, tensors: list[str], inputs: np.ndarray) -> list[np.ndarray]:
        ort = BACKEND.require("--locate")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(self.prefix(tensors).SerializeToString(), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return run_in_chunks(lambda batch: session.run(None, {name: batch}), inputs, 16)


BACKEND = Backend(
    name="onnx", runtime="ort", description="ONNX graph, run by ONNX Runtime", runtime_class=OrtRuntime,
    module="onnxruntime", extra="onnx", packages=("onnx", "onnxruntime", "onnxsim", "onnxscript"),
    suffixes=(".onnx",), precisions=("fp32", "fp16", "int8"), options=OnnxOptions, write=write, write_plain=write_plain,
    probe=OnnxProbe)
