"""CoreML ML Program (.mlpackage) through torch.jit.trace, coremltools' recommended path, run by Core ML.

Options: an image input (``ct.ImageType``, 0-255 RGB) with the ImageNet normalisation done inside
the model (CoreML's ImageType has one scale for all channels, ImageNet std has three, so the exact
per-channel step is a layer), and class labels (``ct.ClassifierConfig``; the output is then softmax
probabilities, and the runtime returns log-probabilities). CoreML predicts only on macOS: on other
systems the package is validated structurally and numeric parity is recorded as pending, to be run by
``levit-deploy parity`` on a Mac.
"""
from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..labels import load_labels, unique_labels
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..probe import Graph, LocateError, Node, Probe, run_in_chunks
from .base import Backend, ExportError, Runtime, RuntimeConfig, RuntimeUnavailable, StagedArtifact

PACKAGE = "model.mlpackage"


@dataclass
class CoremlOptions:
    image_input: bool = field(default=False, metadata={"help": "take an RGB image (0-255) of the model's size; the "
                                                               "ImageNet normalisation runs inside the model"})
    labels: bool = field(default=False, metadata={"help": "embed class labels (ClassifierConfig): outputs "
                                                          "probabilities and the top class"})
    label_file: str | None = field(default=None, metadata={"help": "class names, one per line (default: ImageNet "
                                                                   "for 1000 classes)"})
    min_target: str = field(default="macOS13", metadata={"help": "minimum deployment target (macOS13, iOS16, ...)"})


class NormalisedInput(torch.nn.Module):
    """0-255 RGB in, ImageNet normalisation per channel, then the model (for image-input packages)."""

    def __init__(self, model: torch.nn.Module, probabilities: bool):
        super().__init__()
        self.model = model
        self.probabilities = probabilities
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("inv_std", 1 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255))

    def forward(self, x):
        out = self.model((x - self.mean) * self.inv_std)
        return out.softmax(-1) if self.probabilities else out


class Probabilities(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).softmax(-1)


def target(ct, name: str):
    try:
        return getattr(ct.target, name)
    except AttributeError:
        known = ", ".join(t.name for t in ct.target)
        raise ExportError(f"unknown CoreML deployment target {name!r}; choose one of {known}") from None


def write(model: torch.nn.Module, staging: Path, opts) -> StagedArtifact:
    ct = BACKEND.require("CoreML export")
    options: CoremlOptions = opts.target
    image_input, labels = options.image_input, options.labels
    min_target = target(ct, options.min_target)
    size = model.config.img_size
    wrapped = NormalisedInput(model, labels) if image_input else Probabilities(model) if labels else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapped.eval(), torch.rand(1, 3, size, size) * (255 if image_input else 1))
    if image_input:
        # image inputs have a fixed batch of one, as CoreML images are single frames
        inputs = [ct.ImageType(name="image", shape=(1, 3, size, size), scale=1.0, bias=[0.0, 0.0, 0.0],
                               color_layout=ct.colorlayout.RGB)]
    else:
        batch = ct.RangeDim(1, 1024, default=1) if opts.batch == "dynamic" else int(opts.batch)
        inputs = [ct.TensorType(name="pixel_values", shape=ct.Shape((batch, 3, size, size)))]
    classifier = None
    if labels:
        classifier = ct.ClassifierConfig(class_names(options.label_file, model.config.num_classes))
    precision = ct.precision.FLOAT32 if opts.precision == "fp32" else ct.precision.FLOAT16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(traced, inputs=inputs, outputs=None if labels else [ct.TensorType(name="logits")],
                             classifier_config=classifier, convert_to="mlprogram", compute_precision=precision,
                             minimum_deployment_target=min_target)
    mlmodel.short_description = f"{model.config.name} ({opts.precision}) exported by levit-deploy"
    mlmodel.save(str(staging / PACKAGE))
    checks = validate_package(staging / PACKAGE, min_target, image_input, labels, model.config)
    pending = None if platform.system() == "Darwin" else (
        f"CoreML predicts only on macOS; validated structurally on {platform.system()} "
        f"({checks['op_count']} ops, all supported for {min_target.name}); run `levit-deploy parity` on a Mac")
    details = {"coreml": {"min_target": min_target.name, "image_input": image_input, "labels": labels, **checks},
               "coremltools": ct.__version__}
    return StagedArtifact(file=PACKAGE, details=details, parity_pending=pending,
                          runtime_options={"image_input": image_input, "labels": labels,
                                           "label_file": options.label_file})


def class_names(label_file: str | None, num_classes: int) -> list[str]:
    """The classifier's class names in class-index order, unique (the package keys probabilities by name)."""
    return unique_labels(load_labels(label_file, num_classes))


def validate_package(path: Path, min_target, image_input: bool, labels: bool, config) -> dict:
    """Load the package spec and check names, types, shapes and that every op exists for the target."""
    ct = BACKEND.require("CoreML validation")
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    desc = spec.description
    inputs = {i.name: i for i in desc.input}
    outputs = {o.name: o for o in desc.output}
    expected_in = "image" if image_input else "pixel_values"
    problems = []
    if list(inputs) != [expected_in]:
        problems.append(f"inputs {list(inputs)}, expected [{expected_in!r}]")
    elif image_input:
        img = inputs["image"].type.imageType
        if (img.width, img.height) != (config.img_size, config.img_size):
            problems.append(f"image input {img.width}x{img.height}, expected {config.img_size}")
    else:
        arr = inputs["pixel_values"].type.multiArrayType
        dims = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges] or [(d, d) for d in arr.shape]
        if dims[1:] != [(3, 3), (config.img_size, config.img_size), (config.img_size, config.img_size)]:
            problems.append(f"input shape {dims}, expected (B, 3, {config.img_size}, {config.img_size})")
    if labels:
        if desc.predictedFeatureName not in outputs or not desc.predictedProbabilitiesName:
            problems.append(f"classifier outputs missing: {list(outputs)}")
    elif list(outputs) != ["logits"]:
        problems.append(f"outputs {list(outputs)}, expected ['logits']")
    if not spec.HasField("mlProgram"):
        problems.append("not an ML Program")
        ops: list[str] = []
    else:
        fn = spec.mlProgram.functions["main"]
        ops = [op.type for op in fn.block_specializations[fn.opset].operations]
    unsupported = sorted({op for op in ops if op != "const" and min_target not in SSAOpRegistry.core_ops.get(op, {})})
    if unsupported:
        problems.append(f"ops not available for {min_target.name}: {unsupported}")
    if problems:
        raise ExportError(f"CoreML package failed validation: {'; '.join(problems)}")
    return {"op_count": len(ops), "op_types": sorted(set(ops)), "spec_version": spec.specificationVersion,
            "inputs": list(inputs), "outputs": list(outputs)}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


class CoreMlRuntime(Runtime):
    """Core ML on macOS. A classifier package (labels) answers probabilities: ``infer`` returns their logs,
    and ``output_transform`` maps reference logits into the same space for parity."""

    name = "coreml"

    def __init__(self, path, config: RuntimeConfig = RuntimeConfig(threads=None), image_input: bool = False,
                 labels: bool = False, label_file: str | None = None):
        super().__init__(path, config)
        if platform.system() != "Darwin":
            raise RuntimeUnavailable(f"coreml runtime: Core ML predicts only on macOS, this is {platform.system()}; "
                                     f"the package was validated structurally at export")
        self.units = "CPU_ONLY" if self.device == "cpu" else "ALL"  # Core ML picks CPU, GPU or Neural Engine
        self.image_input, self.labels, self.label_file = image_input, labels, label_file
        self.output_transform = log_softmax if labels else None

    def _open(self) -> None:
        ct = BACKEND.require("the 'coreml' runtime")
        self.model = ct.models.MLModel(self.path, compute_units=getattr(ct.ComputeUnit, self.units))
        spec = self.model.get_spec().description
        self.input_name = spec.input[0].name
        self.prob_name = spec.predictedProbabilitiesName
        if self.labels:
            classes = self.manifest["model"]["num_classes"] if self.manifest else 1000
            self.classes = class_names(self.label_file, classes)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        if self.image_input:
            return np.concatenate([self._predict_image(img) for img in x])
        if self.labels:  # classifier packages answer one input at a time
            return np.concatenate([self._log_probs(self.model.predict({self.input_name: x[i:i + 1]}))
                                   for i in range(len(x))])
        return np.asarray(self.model.predict({self.input_name: x})["logits"], dtype=np.float32)

    def _predict_image(self, chw: np.ndarray) -> np.ndarray:
        from PIL import Image

        rgb = (chw.transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255
        img = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
        out = self.model.predict({self.input_name: img})
        return self._log_probs(out) if self.labels else np.asarray(out["logits"], np.float32).reshape(1, -1)

    def _log_probs(self, out: dict) -> np.ndarray:
        probs = out[self.prob_name]
        return np.log(np.maximum(np.array([[probs[c] for c in self.classes]], np.float64), 1e-45)).astype(np.float32)

    def _info(self) -> dict:
        return {"compute_units": self.units, "image_input": self.image_input, "labels": self.labels}

    def _close(self) -> None:
        self.model = None


class CoremlProbe(Probe):
    """The package's ML Program read as it is. Its constants are named after the deployed model's parameters, dots
    as underscores (``stages_9_inner_up_bias``; an fp16 package adds ``_to_fp16``), so each maps back to its
    parameter. A prefix is a copy of the program cut at the tensors (the operations they need, the tensors as its
    outputs) over the shipped weight file, which coremltools copies into a temporary package; Core ML predicts
    it with the gate's compute units (CPU only). Predicting needs macOS; reading and cutting do not."""

    def __init__(self, folder: Path, manifest: dict, deploy: torch.nn.Module):
        self.ct = BACKEND.require("--locate")
        options = manifest["artifact"].get("runtime_options", {})
        if options.get("image_input") or options.get("labels"):
            raise LocateError("--locate takes Core ML packages with a tensor input and logits out; this one has "
                              "an image input or class labels (export it without them to locate a fault)")
        self.package = folder / manifest["artifact"]["file"]
        self.batch = manifest["export"]["batch"]
        self.spec = self.ct.utils.load_spec(str(self.package))
        self.parameters = {name.replace(".", "_"): name
                           for name in [*dict(deploy.named_parameters()), *dict(deploy.named_buffers())]}

    @staticmethod
    def _block(spec):
        main = spec.mlProgram.functions["main"]
        return main, main.block_specializations[main.opset]

    def _parameter(self, const: str) -> str | None:
        """The deployed model's parameter a constant holds: its name, less the suffixes the converter adds."""
        parts = const.split("_")
        return next((self.parameters[key] for end in range(len(parts), 0, -1)
                     if (key := "_".join(parts[:end])) in self.parameters), None)

    @staticmethod
    def _inputs(op) -> list[str]:
        return [a.name for arg in op.inputs.values() for a in arg.arguments if a.WhichOneof("binding") == "name"]

    def graph(self) -> Graph:
        main, block = self._block(self.spec)
        consts = {op.outputs[0].name: self._parameter(op.outputs[0].name) for op in block.operations
                  if op.type == "const"}
        nodes = [Node(op.outputs[0].name, [t for t in self._inputs(op) if t not in consts],
                      [o.name for o in op.outputs], [p for t in self._inputs(op) if (p := consts.get(t))],
                      shape_only=op.type == "shape")
                 for op in block.operations if op.type != "const"]
        return Graph(nodes, main.inputs[0].name, block.outputs[0])

    def prefix(self, tensors: list[str]):
        """A copy of the program whose outputs are ``tensors``, with only the operations they need."""
        spec = type(self.spec)()
        spec.CopyFrom(self.spec)
        _, block = self._block(spec)
        needed, kept, types = set(tensors), [], {}
        for op in reversed(block.operations):
            if any(o.name in needed for o in op.outputs):
                kept.append(op)
                needed.update(self._inputs(op))
                types.update({o.name: o.type.tensorType.dataType for o in op.outputs})
        ops = [type(op)() for op in kept]  # copies: the originals go with the block's list
        for new, old in zip(ops, kept):
            new.CopyFrom(old)
        del block.operations[:]
        block.operations.extend(reversed(ops))
        del block.outputs[:]
        block.outputs.extend(tensors)
        del spec.description.output[:]
        array = self.ct.proto.FeatureTypes_pb2.ArrayFeatureType
        mil = self.ct.proto.MIL_pb2
        for t in tensors:
            out = spec.description.output.add()
            out.name = t
            out.type.multiArrayType.dataType = array.FLOAT16 if types[t] == mil.FLOAT16 else array.FLOAT32
        return spec

    def run(self, tensors: list[str], inputs: np.ndarray) -> list[np.ndarray]:
        if platform.system() != "Darwin":
            raise RuntimeUnavailable(f"Core ML predicts only on macOS, this is {platform.system()}")
        weights = self.ct.models.MLModel(str(self.package), skip_model_load=True).weights_dir
        model = self.ct.models.MLModel(self.prefix(tensors), weights_dir=weights,
                                       compute_units=self.ct.ComputeUnit.CPU_ONLY)
        name, fixed = self.spec.description.input[0].name, self.batch != "dynamic"

        def predict(chunk: np.ndarray) -> list[np.ndarray]:
            out = model.predict({name: chunk})
            return [out[t] for t in tensors]
        return run_in_chunks(predict, inputs, int(self.batch) if fixed else 16, pad=fixed)


BACKEND = Backend(
    name="coreml", runtime="coreml", description="Core ML ML Program (.mlpackage), run by Core ML on macOS",
    runtime_class=CoreMlRuntime, module="coremltools", extra="coreml", packages=("coremltools",),
    suffixes=(".mlpackage",), precisions=("fp32", "fp16"), options=CoremlOptions, write=write, needs="macos",
    probe=CoremlProbe)
