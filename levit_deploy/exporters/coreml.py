"""CoreML ML Program (.mlpackage) through torch.jit.trace, coremltools' recommended path.

Options: an image input (``ct.ImageType``, 0-255 RGB) with the ImageNet normalisation done inside
the model (CoreML's ImageType has one scale for all channels, ImageNet std has three, so the exact
per-channel step is a layer), and class labels (``ct.ClassifierConfig``; the output is then softmax
probabilities). CoreML predicts only on macOS: on other systems the package is validated
structurally and numeric parity is recorded as pending, to be run by ``levit-deploy parity``.
"""
from __future__ import annotations

import platform
import warnings
from pathlib import Path

import torch

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..runtimes.base import require
from . import ExportError, ExportOptions, StagedArtifact

PACKAGE = "model.mlpackage"


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


def write(model: torch.nn.Module, staging: Path, opts: ExportOptions) -> StagedArtifact:
    ct = require("coremltools", "CoreML export")
    if opts.precision not in ("fp32", "fp16"):
        raise ExportError(f"CoreML export supports fp32 and fp16, not {opts.precision}")
    image_input = bool(opts.extra.get("image_input"))
    labels = bool(opts.extra.get("labels"))
    min_target = target(ct, opts.extra.get("min_target") or "macOS13")
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
        from ..labels import load_labels
        names = load_labels(opts.extra.get("label_file"), model.config.num_classes)
        classifier = ct.ClassifierConfig(names)
    precision = ct.precision.FLOAT32 if opts.precision == "fp32" else ct.precision.FLOAT16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(traced, inputs=inputs, outputs=None if labels else [ct.TensorType(name="logits")],
                             classifier_config=classifier, convert_to="mlprogram", compute_precision=precision,
                             minimum_deployment_target=min_target)
    mlmodel.short_description = f"LeViT {model.config.name} ({opts.precision}) exported by levit-deploy"
    mlmodel.save(str(staging / PACKAGE))
    checks = validate_package(staging / PACKAGE, min_target, image_input, labels, model.config)
    pending = None if platform.system() == "Darwin" else (
        f"CoreML predicts only on macOS; validated structurally on {platform.system()} "
        f"({checks['op_count']} ops, all supported for {min_target.name}); run `levit-deploy parity` on a Mac")
    details = {"coreml": {"min_target": min_target.name, "image_input": image_input, "labels": labels, **checks},
               "coremltools": ct.__version__}
    return StagedArtifact(file=PACKAGE, runtime="coreml", details=details, parity_pending=pending,
                          runtime_options={"image_input": image_input, "labels": labels})


def validate_package(path: Path, min_target, image_input: bool, labels: bool, config) -> dict:
    """Load the package spec and check names, types, shapes and that every op exists for the target."""
    ct = require("coremltools", "CoreML validation")
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
