"""A Triton Inference Server model repository from an artifact: ``repo/<name>/config.pbtxt`` beside
``repo/<name>/1/<model file>`` and the labels, for the artifacts Triton has a backend for.

- ONNX: ``platform: "onnxruntime_onnx"``, ``1/model.onnx``.
- OpenVINO: ``backend: "openvino"``, ``1/model.xml`` + ``model.bin``, with threads, one stream and the latency
  hint set explicitly. The backend reads only INFERENCE_NUM_THREADS, COMPILATION_NUM_THREADS, HINT_BF16,
  NUM_STREAMS and PERFORMANCE_HINT (its ``ParseParameters``), so there is no key that pins f32: on a CPU with
  bf16 (AVX-512 bf16, AMX) OpenVINO computes in bf16 inside Triton. ``levit-deploy bench ARTIFACT -r openvino
  --precision bf16`` shows how the artifact fares in bf16 (parity included); where it must be fp32, serve the
  ONNX artifact instead.
- TensorRT: ``platform: "tensorrt_plan"``, ``1/model.plan``, a GPU instance (a plan runs only on the GPU model and
  TensorRT version it was built with; both are in the artifact's manifest).

The batch axis: a dynamic-batch artifact gets ``max_batch_size`` and dims without the batch; a fixed-batch one
gets ``max_batch_size: 0`` and its full shape (Triton cannot batch it). Every generated config is parsed with
Triton's own protobuf schema when ``tritonclient`` is installed, and the repository is written into a staging
folder and renamed into place, so a half-written model never replaces a good one.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .backends import open_artifact
from .labels import load_labels

PLATFORMS = {"onnx": ("platform", "onnxruntime_onnx", "model.onnx"),
             "openvino": ("backend", "openvino", "model.xml"),
             "tensorrt": ("platform", "tensorrt_plan", "model.plan")}


class TritonError(ValueError):
    """The artifact cannot be served by Triton as asked (format, options)."""


@dataclass
class TritonOptions:
    name: str | None = None  # model name in the repository (default: the variant and format)
    max_batch: int = 32  # max_batch_size for a dynamic-batch artifact
    preferred_batch: tuple[int, ...] = (8, 16)  # dynamic_batching's preferred sizes
    max_queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    instances: int = 1  # instance_group count
    threads: int = 1  # OpenVINO: INFERENCE_NUM_THREADS per instance


def config_text(manifest: dict, name: str, options: TritonOptions, labels_file: str) -> str:
    """The config.pbtxt of an artifact (text format of Triton's ModelConfig)."""
    fmt = manifest["artifact"]["format"]
    servable(fmt)
    key, value, _ = PLATFORMS[fmt]
    _, channels, height, width = manifest["input"]["shape"]
    batch = manifest["input"]["shape"][0]
    fixed = isinstance(batch, int)
    if options.max_batch < 1 or options.instances < 1 or options.threads < 1 or min(options.preferred_batch) < 1:
        raise TritonError("max_batch, preferred batch sizes, instances and threads must be at least 1")
    engine_max = manifest["artifact"].get("profile", {}).get("max") if fmt == "tensorrt" else None
    if engine_max and not fixed and options.max_batch > int(engine_max):
        raise TritonError(f"max_batch {options.max_batch} is above the TensorRT engine's profile maximum {engine_max}; "
                          f"pass --max-batch {engine_max} or re-export with -o max_batch={options.max_batch}")
    lines = [f'name: "{name}"', f'{key}: "{value}"', f"max_batch_size: {0 if fixed else options.max_batch}"]
    in_dims = [batch, channels, height, width] if fixed else [channels, height, width]
    out_dims = [batch, manifest["output"]["shape"][1]] if fixed else [manifest["output"]["shape"][1]]
    lines += ["input [", "  {", '    name: "pixel_values"', "    data_type: TYPE_FP32",
              f"    dims: [ {', '.join(map(str, in_dims))} ]", "  }", "]",
              "output [", "  {", '    name: "logits"', "    data_type: TYPE_FP32",
              f"    dims: [ {', '.join(map(str, out_dims))} ]", f'    label_filename: "{labels_file}"', "  }", "]"]
    if not fixed:
        preferred = sorted(b for b in options.preferred_batch if b <= options.max_batch) or [options.max_batch]
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
                  f"  max_queue_delay_microseconds: {options.max_queue_delay_us}", "}"]
    kind = "KIND_GPU" if fmt == "tensorrt" else "KIND_CPU"
    lines += ["instance_group [", "  {", f"    count: {options.instances}", f"    kind: {kind}", "  }", "]"]
    if fmt == "openvino":
        params = {"INFERENCE_NUM_THREADS": str(options.threads), "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
        for k, v in params.items():
            lines += ["parameters {", f'  key: "{k}"', f'  value: {{ string_value: "{v}" }}', "}"]
    return "\n".join(lines) + "\n"


def validate_config(text: str):
    """Parse ``text`` with Triton's ModelConfig schema (tritonclient); returns the message, or None when
    tritonclient[grpc] is not installed. A config that does not fit the schema raises TritonError (the schema
    checks field names, types and enums, not every value Triton would refuse at load time)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient without its grpc extra raises RuntimeError
        return None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise TritonError(f"generated config.pbtxt does not parse with Triton's schema: {e}") from None


def servable(fmt: str) -> None:
    """Raise TritonError unless Triton has a backend for artifacts of format ``fmt``."""
    if fmt not in PLATFORMS:
        raise TritonError(f"Triton has no backend for {fmt} artifacts; export --to onnx, openvino or tensorrt")


def write_repository(artifact, repo, options: TritonOptions | None = None) -> Path:
    """Add ``artifact`` (folder or file with a manifest) to the Triton model repository ``repo``; returns the
    model's folder. The artifact's files are hash-checked first; an existing model of the same name is replaced
    only once the new one is complete."""
    options = options or TritonOptions()
    manifest, folder, _, _ = open_artifact(Path(artifact))
    fmt = manifest["artifact"]["format"]
    servable(fmt)
    name = options.name or f"{manifest['model']['variant']}_{fmt}"
    if not name.replace("_", "").replace("-", "").isalnum():
        raise TritonError(f"model name {name!r}: use letters, digits, '_' and '-'")
    labels = load_labels(None, manifest["model"]["num_classes"])
    text = config_text(manifest, name, options, "labels.txt")
    validate_config(text)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=repo))
    try:
        version = staging / "1"
        version.mkdir()
        for rel in manifest["artifact"]["files"]:
            target = version / PLATFORMS[fmt][2] if rel == manifest["artifact"]["file"] else version / Path(rel).name
            shutil.copy2(folder / rel, target)
        (staging / "labels.txt").write_text("\n".join(labels) + "\n")
        (staging / "config.pbtxt").write_text(text)
        (staging / "levit-deploy.json").write_text(json.dumps(
            {"source_artifact": str(folder), "manifest_sha256": manifest["artifact"]["files"],
             "precision": manifest["export"]["precision"], "parity": manifest["parity"].get("status")}, indent=2))
        for p in staging.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        staging.chmod(0o755)
        final = repo / name
        old = repo / f".{name}-replaced-{staging.name}" if final.exists() else None
        if old is not None:
            final.rename(old)
        try:
            staging.rename(final)
        except BaseException:
            if old is not None:
                old.rename(final)  # the working model goes back in place
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
