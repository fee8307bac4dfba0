"""OpenVINO IR (.xml + .bin) converted from the fused, simplified ONNX graph, run by OpenVINO on CPU.

``ov.save_model`` compresses weights to fp16 by default; fp32 passes compress_to_fp16=False so an
fp32 artifact really holds fp32 weights. On CPUs with AMX or AVX-512 bf16 the CPU plugin runs fp32
models in bf16 unless told otherwise: here fp32 means fp32 (INFERENCE_PRECISION_HINT=f32) unless the
caller asks for bf16 compute, and the precision that actually ran (read back from the compiled
model) is the one parity judges by.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..env import int8_products_saturate, require
from ..probe import Graph, Node, Probe, param_name, run_in_chunks
from ..quantize import QuantOptions, check_recipe
from .base import Backend, ExportError, Runtime, RuntimeConfig, StagedArtifact
from .onnx import fp32_onnx, layer_paths

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
OVERFLOW_FIX = ("auto", "enable", "first_layer_only", "disable")  # auto, then NNCF's OverflowFix values
FLOAT_COMPUTE = ("fp32", "bf16")
WEIGHT_OPS = ("MatMul", "Convolution", "GroupConvolution")  # the OpenVINO ops NNCF quantizes weights of


@dataclass
class OpenVinoOptions(QuantOptions):
    """OpenVINO's own export options: the int8 ones every int8 target takes, and NNCF's overflow fix."""

    overflow_fix: str = field(default="auto", metadata={
        "help": "int8: NNCF's overflow fix. enable: 7-bit weights in every layer, exact on every CPU. "
                "first_layer_only (NNCF's default) and disable keep 8-bit weights, whose products saturate in "
                "oneDNN's int8 kernels on x86-64 without VNNI/AMX (LightViT-T: worst cosine 0.905 instead of "
                "0.964). auto: enable on a CPU that saturates, else first_layer_only"})
    float_compute: str = field(default="fp32", metadata={
        "help": "int8: the precision the operations left in float compute in. bf16 (OpenVINO's own default on CPUs "
                "with AMX or AVX-512 bf16) is recorded in the manifest, and the gate judges the artifact as it runs "
                "so (LeViT-128S yardstick, 1 thread, Xeon with AMX: 1.72x the fp32 IR with fp32, 2.18x with "
                "bf16); on a CPU without bf16 the plugin computes them in fp32"})

    def __post_init__(self):
        if self.overflow_fix not in OVERFLOW_FIX:
            raise ValueError(f"overflow_fix must be one of {', '.join(OVERFLOW_FIX)}, got {self.overflow_fix!r}")
        if self.float_compute not in FLOAT_COMPUTE:
            raise ValueError(f"float_compute must be one of {', '.join(FLOAT_COMPUTE)}, got {self.float_compute!r}")


def onnx_extensions() -> list:
    """ONNX ops OpenVINO's reader lacks, mapped onto OpenVINO's own: DeformConv (opset 19, LITv2) becomes
    DeformableConvolution-8 with ``bilinear_interpolation_pad=True``, the setting whose border samples match
    ONNX's (and the official CUDA kernel's): neighbours outside the image count 0. With False every sample
    touching the border is dropped (max error ~3 on unit inputs, measured)."""
    import openvino.opset8 as ops
    from openvino.frontend.onnx import ConversionExtension

    def deform_conv(node):
        x, weight, offset = node.get_input(0), node.get_input(1), node.get_input(2)
        strides = list(node.get_attribute("strides"))
        pads = list(node.get_attribute("pads"))
        rank = len(strides)
        out = ops.deformable_convolution(x, offset, weight, strides, pads[:rank], pads[rank:], [1] * rank,
                                         bilinear_interpolation_pad=True)
        if node.get_input_size() > 3:
            out = ops.add(out, ops.reshape(node.get_input(3), ops.constant(np.array([1, -1, 1, 1], np.int64)), False))
        return [out.output(0)]

    return [ConversionExtension("DeformConv", deform_conv)]


def ov_layer_names(ir, onnx_graph) -> dict[str, str]:
    """Module path -> OpenVINO op name for every weight op of ``ir``: the converter names each op after the ONNX
    node it came from (``Gemm_31/WithoutBiases``), whose weights name the module (:func:`.onnx.layer_paths`)."""
    paths = layer_paths(onnx_graph, ("MatMul", "Gemm", "Conv"))
    out = {}
    for op in ir.get_ordered_ops():
        if op.get_type_name() in WEIGHT_OPS and op.input_value(1).get_node().get_type_name() != "Parameter":
            path = paths.get(op.get_friendly_name().split("/")[0])
            if path is not None:
                out[path] = op.get_friendly_name()
    return out


def name_weights(ir, onnx_graph) -> int:
    """Name each weight constant of ``ir`` after its parameter (``stages.3.inner.qkv.weight``), as the ONNX graph
    does: the converter folds them into constants named ``Transpose_6296``, and ``--locate`` finds the model's
    units in a graph by its parameter names. Names do not change what runs. Returns how many were named."""
    paths = layer_paths(onnx_graph, ("MatMul", "Gemm", "Conv"))
    named = 0
    for op in ir.get_ordered_ops():
        path = paths.get(op.get_friendly_name().split("/")[0])
        if op.get_type_name() not in WEIGHT_OPS or path is None:
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() != "Constant" and node.get_input_size() > 0:
            node = node.input_value(0).get_node()
        if node.get_type_name() == "Constant":
            node.set_friendly_name(f"{path}.weight")
            named += 1
    return named


def unflatten_linears(ir) -> int:
    """A linear over (B, N, C) tokens that the ONNX graph runs as Reshape to (B·N, C) -> MatMul -> Add -> Reshape
    back becomes one MatMul over the 3-D tensor plus the bias (exact: the same products and sums). OpenVINO's CPU
    plugin cannot compile the int8 form of the flattened one with a dynamic batch: its low-precision
    ReshapeTransformation moves the per-channel dequantization through the Reshape back and fails its shape check
    (``backward_compatible_check || in_out_elements_equal``, LITv2-S's first MLP, OpenVINO 2026.4). The new
    MatMul keeps the old one's name, so layer names and keep_float still apply. Returns how many were rewritten."""
    import openvino.opset13 as ops

    rewritten = 0
    for back in [op for op in ir.get_ordered_ops() if op.get_type_name() == "Reshape"]:
        add = back.input_value(0).get_node()
        matmul = add.input_value(0).get_node() if add.get_type_name() == "Add" else None
        flatten = matmul.input_value(0).get_node() if matmul is not None and matmul.get_type_name() == "MatMul" \
            else None
        if flatten is None or flatten.get_type_name() != "Reshape" or matmul.get_attributes()["transpose_a"]:
            continue
        tokens = flatten.input_value(0)
        before, after = tokens.get_partial_shape(), back.get_output_partial_shape(0)
        if before.rank.is_dynamic or after.rank.is_dynamic or before.rank.get_length() != 3 \
                or after.rank.get_length() != 3 or flatten.get_output_partial_shape(0).rank.get_length() != 2 \
                or before[1].is_dynamic or before[1] != after[1] or before[0].is_static != after[0].is_static:
            continue
        product = ops.matmul(tokens, matmul.input_value(1), False, matmul.get_attributes()["transpose_b"])
        product.set_friendly_name(matmul.get_friendly_name())
        biased = ops.add(product, add.input_value(1))
        biased.set_friendly_name(add.get_friendly_name())
        back.output(0).replace(biased.output(0))
        rewritten += 1
    if rewritten:
        ir.validate_nodes_and_infer_types()
    return rewritten


def quantize_nncf(ir, calibration, layers: dict[str, str], keep_float=(), overflow_fix: str = "auto"
                  ) -> tuple[object, dict]:
    """NNCF post-training quantization of an fp32 IR, transformer mode, calibrated at batch 1.

    SmoothQuant, which transformer mode turns on by default, is off: on LeViT-128S (1 thread, batch 16)
    it cut int8 speed from 653 to 536 images/s and cosine to the fp64 reference from 0.9996 to 0.93
    (measured side by side). Activation ranges are plain MinMax over the calibration images, not NNCF's
    default (the mean of each image's min and max), which clips the rare large activations a trained-like
    LeViT needs: on the in-distribution LeViT-128S yardstick, worst cosine to fp32 on its 30 judging crops
    0.70 with NNCF's default, 0.91 with MinMax (median 0.977 -> 0.988; benchmarks/results/int8_methods.md).
    ``overflow_fix``: see ``OpenVinoOptions``. ``keep_float``: module paths (keys of ``layers``) left in float
    through NNCF's ignored scope."""
    nncf = require("nncf", "int8 OpenVINO export", "int8")
    check_recipe(keep_float, list(layers))
    ignored = nncf.IgnoredScope(names=[layers[k] for k in keep_float]) if keep_float else None
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters, OverflowFix)
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if overflow_fix == "auto":
        overflow_fix = "enable" if int8_products_saturate() else "first_layer_only"
    data = nncf.Dataset(list(calibration.inputs), lambda x: np.ascontiguousarray(x[None]))
    advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1),
                                              activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
                                              overflow_fix=OverflowFix(overflow_fix))
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        quantized = nncf.quantize(ir, data, model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration.inputs), advanced_parameters=advanced,
                                  **({"ignored_scope": ignored} if ignored else {}))
    return quantized, {"method": f"NNCF {nncf.__version__} post-training quantization (model_type=TRANSFORMER, "
                                 f"preset MIXED, fast bias correction, SmoothQuant off, MinMax activation ranges, "
                                 f"overflow fix {overflow_fix})",
                       "kernels": {"weights": "int8 (7-bit range)" if overflow_fix == "enable" else "int8",
                                   "saturate_without_vnni": overflow_fix != "enable",
                                   "exact_with": "-o overflow_fix=enable"},
                       "layers": [k for k in layers if k not in keep_float],
                       "ignored_scope": f"{len(keep_float)} layers kept in float (keep_float); NNCF's transformer "
                                        f"mode keeps softmax, normalisation and elementwise ops in fp32",
                       "calibration_batch": 1}


def write(model: torch.nn.Module, staging: Path, opts) -> StagedArtifact:
    ov = BACKEND.require("OpenVINO export")
    options: OpenVinoOptions = opts.target or OpenVinoOptions()
    if options.float_compute != "fp32" and opts.precision != "int8":
        raise ExportError(f"-o float_compute applies to int8 IRs; a {opts.precision} IR computes in bf16 with "
                          f"`bench`/`parity --precision bf16`")
    batch = -1 if opts.batch == "dynamic" else int(opts.batch)
    size = model.config.img_size
    quant = None
    # the IR is converted from an fp32 graph; fp16 is a property of how the IR stores its weights
    with fp32_onnx(model, opts) as (onnx_path, staged_onnx):
        ir = ov.convert_model(str(onnx_path), input=[("pixel_values", [batch, 3, size, size])],
                              extension=onnx_extensions())
        onnx_graph = require("onnx", "OpenVINO export", "onnx").load(str(onnx_path)).graph
        name_weights(ir, onnx_graph)
        if opts.precision == "int8":
            unflattened = unflatten_linears(ir)
            ir, quant = quantize_nncf(ir, opts.calibration, ov_layer_names(ir, onnx_graph), opts.keep_float,
                                      options.overflow_fix)
            quant["float_compute"] = options.float_compute
            quant["rewrites"] = {"flattened linear -> 3-D MatMul": unflattened}
        ov.save_model(ir, str(staging / "model.xml"), compress_to_fp16=opts.precision == "fp16")
    notes = list(staged_onnx.notes)
    if opts.precision == "fp16":
        notes.append("weights stored as fp16 (compress_to_fp16=True); the CPU plugin computes in fp32 unless "
                     "asked for bf16")
    details = {"ir_weights": {"fp16": "fp16", "int8": "int8 (quantized) and fp32"}.get(opts.precision, "fp32"),
               "openvino": ov.__version__, "converted_from": f"fused ONNX opset {staged_onnx.details['opset']}"}
    if quant:
        details["quantization"] = quant
    runtime_options = {"compute": "bf16"} if options.float_compute == "bf16" else {}
    return StagedArtifact(file="model.xml", details=details, notes=notes, extra_files=["model.bin"],
                          runtime_options=runtime_options)


@lru_cache(maxsize=1)
def shared_core():
    """One ov.Core per process: creating many crashes OpenVINO (a segfault after a few dozen, seen in
    this test suite and in ultralytics/ultralytics#25864)."""
    return BACKEND.require("the 'openvino' runtime").Core()


class OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(self, path, config: RuntimeConfig = RuntimeConfig()):
        # an fp16 IR stores fp16 weights but computes in fp32 unless asked otherwise
        super().__init__(path, replace(config, compute=config.compute or "fp32"))
        if self.compute not in HINTS:
            raise ValueError(f"openvino computes in fp32, bf16 or fp16, not {self.compute!r}")
        self.ov_device = {"cpu": "CPU", "gpu": "GPU"}.get(self.device, self.device.upper())
        self.ov_config = {"INFERENCE_PRECISION_HINT": HINTS[self.compute], "PERFORMANCE_HINT": "LATENCY",
                          "NUM_STREAMS": 1}
        if self.threads is not None and self.ov_device == "CPU":
            self.ov_config["INFERENCE_NUM_THREADS"] = self.threads
        self.exported_precision = self.precision

    def _open(self) -> None:
        ov = BACKEND.require("the 'openvino' runtime")
        self.compiled = shared_core().compile_model(self.path, self.ov_device, self.ov_config)
        self.request = self.compiled.create_infer_request()
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        names = {ov.Type.f32: "fp32", ov.Type.bf16: "bf16", ov.Type.f16: "fp16"}
        self.inference_precision = names.get(ran, str(ran))
        # parity follows what ran: bf16 compute, or fp16-stored weights, are judged as half precision; an int8 IR
        # stays int8 (the int8 rule's floor is the model's own bf16 draw: its float part in bf16 is within it)
        self.precision = self.exported_precision if self.exported_precision == "int8" or \
            self.inference_precision == "fp32" else self.inference_precision
        self.ov_version = ov.__version__

    def _infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: x})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)

    def _info(self) -> dict:
        threads = self.compiled.get_property("INFERENCE_NUM_THREADS") if self.ov_device == "CPU" else None
        return {"openvino": self.ov_version, "device": self.ov_device, "threads": threads,
                "inference_precision": self.inference_precision, "config": self.ov_config}

    def _close(self) -> None:
        self.request = self.compiled = None


class OpenVinoProbe(Probe):
    """The shipped IR read into memory; a prefix is a model over the same operations whose one result is the
    tensor, compiled with the runtime's own configuration. The files are only read."""

    def __init__(self, folder: Path, manifest: dict, deploy=None):
        self.xml = folder / manifest["artifact"]["file"]
        self.model = shared_core().read_model(str(self.xml))
        compute = manifest["artifact"].get("runtime_options", {}).get("compute")  # as the artifact runs
        self.runtime = OpenVinoRuntime(str(self.xml), RuntimeConfig(precision=manifest["export"]["precision"],
                                                                    compute=compute, threads=None))

    @staticmethod
    def _tensor(output) -> str:
        return f"{output.get_node().get_friendly_name()}:{output.get_index()}"

    def graph(self) -> Graph:
        nodes, result = [], None
        for op in self.model.get_ordered_ops():
            name = op.get_friendly_name()
            inputs = [self._tensor(i.get_source_output()) for i in op.inputs()]
            if op.get_type_name() == "Result":
                result = inputs[0]
                continue
            params = [p] if op.get_type_name() == "Constant" and (p := param_name(name)) else []
            nodes.append(Node(name, inputs, [f"{name}:{i}" for i in range(op.get_output_size())], params,
                              shape_only=op.get_type_name() == "ShapeOf"))
        return Graph(nodes, self._tensor(self.model.get_parameters()[0].output(0)), result)

    def run(self, tensors: list[str], inputs: np.ndarray) -> list[np.ndarray]:
        ov = BACKEND.require("--locate")
        ops = {o.get_friendly_name(): o for o in self.model.get_ordered_ops()}
        outputs = [ops[name].output(int(index)) for name, index in (t.rsplit(":", 1) for t in tensors)]
        prefix = ov.Model(outputs, self.model.get_parameters(), "prefix")
        compiled = shared_core().compile_model(prefix, self.runtime.ov_device, self.runtime.ov_config)
        request = compiled.create_infer_request()

        def infer(batch: np.ndarray) -> list[np.ndarray]:
            request.infer({0: batch})
            return [np.array(request.get_output_tensor(k).data) for k in range(len(tensors))]
        return run_in_chunks(infer, inputs, 16)


BACKEND = Backend(
    name="openvino", runtime="openvino", description="OpenVINO IR, run by OpenVINO on CPU",
    runtime_class=OpenVinoRuntime, module="openvino", extra="openvino", packages=("openvino", "nncf"),
    suffixes=(".xml",), companions=(".bin",), precisions=("fp32", "fp16", "int8"),
    compute_precisions=("fp32", "bf16", "fp16"), options=OpenVinoOptions, write=write, probe=OpenVinoProbe)
