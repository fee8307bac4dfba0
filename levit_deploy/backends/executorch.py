"""ExecuTorch program (.pte) with the XNNPACK delegate, run by ExecuTorch's runtime: PyTorch's on-device path
(Android, iOS, Linux ARM boards, Graviton), the same file a phone loads.

The fused model goes through ``torch.export``, one export-time rewrite (below), and
``to_edge_transform_and_lower`` with the XNNPACK partitioner. What XNNPACK does not take stays in
ExecuTorch's portable kernels between delegated pieces; the manifest records how many pieces the program
has and which ops stayed outside, per family.

int8 is PT2E post-training quantization with XNNPACK's quantizer (symmetric int8, per-channel weights,
static activation ranges calibrated at batch 1 on ``--calib`` or the stand-in set).

Batch: XNNPACK takes slices and reshapes of static shapes only, so a fixed ``--batch N`` lowers into a few
pieces; ``--batch dynamic`` exports batch 1..``max_batch`` (the memory plan is sized for it), and the
runtime feeds larger batches in chunks.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..env import require
from ..probe import Graph, LocateError, Node, Probe, run_in_chunks
from ..quantize import QuantOptions, check_recipe
from .base import Backend, ExportError, Runtime, RuntimeConfig, StagedArtifact, in_chunks

PROGRAM = "model.pte"


@dataclass
class ExecutorchOptions(QuantOptions):
    max_batch: int = field(default=32, metadata={"help": "--batch dynamic: the largest batch one call takes (the "
                                                         "memory plan is sized for it; larger batches run in chunks)"})
    per_channel: bool = field(default=True, metadata={"help": "int8: per-channel weight scales (False: per-tensor)"})
    quantize_convs: bool = field(default=False, metadata={"help": "int8: quantize convolutions too (default: they "
                                                                  "stay fp32, chosen by measurement)"})


def _quiet_imports() -> None:
    """torchao logs a warning per CUDA kernel library it cannot load on a CPU build; nothing is wrong."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


@contextlib.contextmanager
def _native_logs_silenced():
    """ExecuTorch's C++ runtime logs its CPU probing straight to file descriptor 2 when it first starts
    (``cpuinfo_utils.cpp: Failed to open midr file`` ...): nothing is wrong, and the terminal is for our lines.
    If the block fails, what the runtime logged is the reason: it is added to the error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except Exception as e:
            os.dup2(saved, 2)
            sink.seek(0)
            logged = [line for line in sink.read().decode(errors="replace").splitlines() if "cpuinfo" not in line]
            raise RuntimeError(f"{e}" + (f" ({' | '.join(logged[-2:])})" if logged else "")) from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _lowering_quietly():
    """torch.export and the lowering warn and print about internals (deprecations, graph breaks it handles)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _batched_4d(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == 4 and b.dim() == 4 and a.shape[:2] == b.shape[:2]


def _batched_matmul_3d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of two (B, H, M, K) x (B, H, K, N) tensors as one 3-D ``bmm``. Left as a 4-D matmul, the
    edge dialect expands it into ``expand_copy`` ops that XNNPACK does not take, and a LeViT program falls
    apart into 26 pieces instead of 4 (measured)."""
    if _batched_4d(a, b):
        return torch.bmm(a.flatten(0, 1), b.flatten(0, 1)).unflatten(0, a.shape[:2])
    return NotImplemented


VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def xnnpack_form(program: torch.export.ExportedProgram) -> tuple[torch.export.ExportedProgram, dict[str, int]]:
    """The export-time rewrites (exact; the fused model is unchanged), and how many nodes each touched:

    - batched 4-D matmuls become 3-D ``bmm`` (see ``_batched_matmul_3d``);
    - a reshape whose target size has one symbolic dimension (the dynamic batch) gets -1 there instead:
      XNNPACK lowers no reshape with a symbolic size but infers one -1. Measured with a dynamic batch:
      LeViT-128S 73 -> 13 delegated pieces; LightViT-T's export finished in 2 min instead of not within 6.
    """
    matmuls = sum(n.target is torch.ops.aten.matmul.default and _batched_4d(*(a.meta["val"] for a in n.args[:2]))
                  for n in program.graph.nodes)
    program = program.run_decompositions({torch.ops.aten.matmul.default: _batched_matmul_3d})
    views = 0
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in VIEWS:
            shape = list(node.args[1])
            symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
            if len(symbolic) == 1 and -1 not in shape:
                shape[symbolic[0]] = -1
                node.args = (node.args[0], shape, *node.args[2:])
                views += 1
    if views:
        program.graph.eliminate_dead_code()
        program.graph_module.recompile()
    return program, {"4-D matmul -> 3-D bmm": matmuls, "symbolic reshape size -> -1": views}


def _export(model: torch.nn.Module, example: torch.Tensor, dynamic: bool, max_batch: int):
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=max_batch)}} if dynamic else None
    return torch.export.export(model, (example,), dynamic_shapes=shapes)


def quantize_pt2e(model: torch.nn.Module, calibration, options: ExecutorchOptions,
                  largest_batch: int, keep_float=()) -> tuple[torch.nn.Module, dict]:
    """PT2E with XNNPACK's quantizer: observers inserted, the calibration images run at batch 1, then the
    quantize/dequantize pairs XNNPACK fuses into int8 kernels. ``keep_float``: module paths the quantizer skips,
    through its filter function on each node's ``nn_module_stack`` (this version refuses ``set_module_name(path,
    None)``: "quantization_config == None is not supported yet")."""
    require("torchao", "ExecuTorch int8 export", "executorch")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    size = model.config.img_size
    # the calibration graph takes batch 1 (calibration) up to the largest batch the final program will take
    graph = _export(model, torch.randn(2, 3, size, size), dynamic=True, max_batch=max(64, largest_batch)).module()
    config = get_symmetric_quantization_config(is_per_channel=options.per_channel)
    quantizer = XNNPACKQuantizer().set_operator_type(torch.ops.aten.linear.default, config)
    if options.quantize_convs:
        quantizer.set_operator_type(torch.ops.aten.conv2d.default, config)
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if options.quantize_convs else (torch.nn.Linear,)
    layers = [name for name, m in model.named_modules() if isinstance(m, kinds)]
    check_recipe(keep_float, layers)
    if keep_float:
        quantizer.set_filter_function(_outside(set(keep_float)))
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in calibration.inputs:
            prepared(torch.from_numpy(np.ascontiguousarray(x[None])))
    quantized = convert_pt2e(prepared)
    quantized.config = model.config
    return quantized, {
        "layers": [name for name in layers if name not in keep_float],
        "method": f"PT2E post-training quantization, XNNPACKQuantizer symmetric int8, "
                  f"{'per-channel' if options.per_channel else 'per-tensor'} weights, static activations",
        "quantized_ops": "linear" + (" and conv2d" if options.quantize_convs else "") + " (the ops with weights)",
        "ignored_scope": ("" if options.quantize_convs else "convolutions, ") + "residual adds, attention's "
                         "activation-by-activation matmuls, softmax, hardswish/GELU and normalisation stay fp32",
        # XNNPACK's QS8 GEMMs on AVX2 (no VNNI): LightViT-T passes keeping 1 of 134 layers in float, as with ORT's exact
        # U8U8 kernels, where ORT's saturating U8S8 was refused at 33 of 132
        "kernels": {"weights": "int8", "saturate_without_vnni": False},
        "calibration_batch": 1}


def _outside(keep_float: set[str]):
    """A quantizer filter: True for graph nodes that belong to none of the ``keep_float`` modules."""
    def quantize(node) -> bool:
        return not any(path in keep_float for path, _ in node.meta.get("nn_module_stack", {}).values())
    return quantize


def write(model: torch.nn.Module, staging: Path, opts) -> StagedArtifact:
    _quiet_imports()
    BACKEND.require("ExecuTorch export")
    options: ExecutorchOptions = opts.target or ExecutorchOptions()
    dynamic = opts.batch == "dynamic"
    if dynamic and options.max_batch < 2:
        raise ExportError(f"max_batch must be at least 2 for a dynamic batch, got {options.max_batch} (for one image "
                          f"per call export --batch 1)")
    size = model.config.img_size
    example = torch.randn(min(2, options.max_batch) if dynamic else int(opts.batch), 3, size, size)
    quant = None
    with _lowering_quietly():
        if opts.precision == "int8":
            model, quant = quantize_pt2e(model, opts.calibration, options,
                                         options.max_batch if dynamic else int(opts.batch), opts.keep_float)
        program, rewrites = xnnpack_form(_export(model, example, dynamic, options.max_batch))
        # torch.export may narrow the batch range (an int8 LightViT program came out as 1..15): plan for what it says
        max_batch = _batch_bound(program, options.max_batch) if dynamic else int(opts.batch)
        executable, (pieces, outside) = _lower(program)
    (staging / PROGRAM).write_bytes(executable)
    notes = []
    if outside:
        notes.append(f"XNNPACK runs {pieces} delegated piece(s); outside it, in ExecuTorch's portable kernels: "
                     + ", ".join(f"{op} x{n}" for op, n in outside.items()))
    if dynamic:
        notes.append(f"batch 1..{max_batch} per call (larger batches run in chunks); XNNPACK lowers no "
                     f"slice of a dynamic-shape tensor, so a fixed --batch gives fewer pieces")
    details = {"executorch": {"delegate": "XnnpackBackend", "delegated_pieces": pieces, "ops_outside": outside,
                              "max_batch": max_batch,
                              "rewrites": rewrites}}
    if quant:
        details["quantization"] = quant
    return StagedArtifact(file=PROGRAM, details=details, notes=notes,
                          runtime_options={"max_batch": max_batch})


def _lower(program: torch.export.ExportedProgram) -> tuple[bytes, tuple[int, dict[str, int]]]:
    """(.pte bytes, its ``delegation``): ``program`` lowered with the XNNPACK partitioner, as every program we
    write. The delegation is read from the edge graph before ``to_executorch``, which rewrites that graph in place
    into out-variants and memory planning (``alloc``, ``mean.out``)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    pieces = delegation(edge.exported_program().graph)
    return edge.to_executorch().buffer, pieces


def _batch_bound(program: torch.export.ExportedProgram, asked: int) -> int:
    """The largest batch the exported program's shape range allows (the batch is its only dynamic size)."""
    bounds = []
    for value_range in program.range_constraints.values():
        try:
            bounds.append(int(value_range.upper))
        except (TypeError, ValueError, OverflowError):  # an unbounded symbol
            pass
    return min(bounds, default=asked)


def delegation(graph) -> tuple[int, dict[str, int]]:
    """(delegated pieces, {op: count} left outside the delegate) of a lowered edge graph."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    pieces = sum("executorch_call_delegate" in str(n.target) for n in calls)
    outside = Counter(_op_name(n.target) for n in calls
                      if "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)
                      and "sym_size" not in str(n.target) and getattr(n.target, "__module__", "") != "_operator")
    return pieces, dict(sorted(outside.items()))


def _op_name(target) -> str:
    name = getattr(target, "_name", None) or getattr(target, "__name__", str(target))
    return name.replace("aten::", "").replace(".default", "")


class ExecutorchRuntime(Runtime):
    """ExecuTorch's Python runtime (the same C++ runtime a phone links). ``threads`` sizes its XNNPACK
    threadpool, which is process-wide: the last runtime opened sets it (recorded in info())."""

    name = "executorch"

    def __init__(self, path, config: RuntimeConfig = RuntimeConfig(), max_batch: int | None = None):
        super().__init__(path, config)
        if self.device != "cpu":
            raise ValueError(f"executorch runs on cpu here (XNNPACK), not {self.device!r}")
        if self.compute != self.precision:
            raise ValueError(f"executorch runs a {self.precision} program as it is; export in {self.compute} instead")
        self.max_batch = max_batch

    def _open(self) -> None:
        _quiet_imports()
        BACKEND.require("the 'executorch' runtime")
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime as EtRuntime

        with _native_logs_silenced():  # the threadpool's first use probes the CPU, loudly
            if self.threads is not None:
                portable_lib._unsafe_reset_threadpool(self.threads)
            self.et_threads = portable_lib._threadpool_get_thread_count()
            self.program = EtRuntime.get().load_program(self.path)
            self.method = self.program.load_method("forward")
        meta = self.method.metadata
        planned = int(meta.input_tensor_meta(0).sizes()[0])  # the memory plan's largest batch
        self.max_batch = min(self.max_batch or planned, planned)
        self.classes = int(meta.output_tensor_meta(0).sizes()[-1])
        # a manifest says whether the batch is fixed; a bare .pte is treated as static (padding is always safe)
        self.static = self.input_spec.batch is not None or self.manifest is None

    def _infer(self, x: np.ndarray) -> np.ndarray:
        """Chunks of at most the planned batch; a static program (a bare fixed-batch .pte) gets its last chunk
        zero-padded to its batch."""
        if not len(x):
            return np.zeros((0, self.classes), np.float32)
        run = lambda chunk: self.method.execute([torch.from_numpy(chunk)])[0].numpy()  # noqa: E731
        return in_chunks(run, x, self.max_batch, pad=self.static).astype(np.float32, copy=False)

    def _info(self) -> dict:
        from executorch.version import __version__
        return {"executorch": __version__, "threads": self.et_threads, "max_batch": self.max_batch}

    def _close(self) -> None:
        self.method = self.program = None


def constant_spans(pte: bytes) -> tuple[dict[str, slice], list[slice]]:
    """Where a .pte keeps its constants: XNNPACK's by their key (the sha256 of the bytes the exporter wrote; the
    key stays when the bytes are changed afterwards), and the program's own (ops outside the delegate), in order,
    each with the padding up to the next."""
    try:  # private helpers: ExecuTorch 1.5 has no public reader of the segment offsets
        from executorch.exir._serialize._program import _flatbuffer_to_program, _get_extended_header
    except ImportError as e:
        raise LocateError(f"this ExecuTorch cannot be read for --locate ({e}); it was written for ExecuTorch 1.5") \
            from None

    header = _get_extended_header(pte)
    if header is None:
        raise LocateError("the .pte has no segments (constants inlined in the flatbuffer): cannot read its constants")
    program = _flatbuffer_to_program(pte[:header.program_size])
    start = lambda index: header.segment_base_offset + program.segments[index].offset  # noqa: E731
    named = {e.key: slice(start(e.segment_index), start(e.segment_index) + program.segments[e.segment_index].size)
             for e in program.named_data}
    offsets = list(program.constant_segment.offsets)
    if not offsets:
        return named, []
    index = program.constant_segment.segment_index
    ends = [*offsets[1:], program.segments[index].size]
    return named, [slice(start(index) + a, start(index) + b) for a, b in zip(offsets, ends)]


class ExecutorchProbe(Probe):
    """A .pte cannot be cut: its XNNPACK pieces are opaque. A prefix is the deployed model's exported graph cut at
    the tensor, lowered as the shipped program was (the same rewrites, partitioner and batch range), then run on
    the *shipped* constants: XNNPACK names each constant by the sha256 of its bytes, so the prefix's constant under
    a key is overwritten with the shipped file's bytes under that key; the program's own constants are matched
    through a fresh lowering of the whole model, place by place. A fresh lowering whose constants do not line up
    with the shipped program's (another ExecuTorch, another checkpoint) is refused rather than guessed at. int8 is
    refused too: a prefix would be re-calibrated, so its activation ranges would not be the shipped ones."""

    def __init__(self, folder: Path, manifest: dict, deploy: torch.nn.Module):
        if manifest["export"]["precision"] != "fp32":
            raise LocateError(f"--locate on an ExecuTorch artifact takes fp32 programs, this one is "
                              f"{manifest['export']['precision']}: a prefix of an int8 program would be calibrated "
                              f"again, not the shipped one (export the model in fp32 to locate a converter fault)")
        _quiet_imports()
        BACKEND.require("--locate")
        self.shipped = (folder / manifest["artifact"]["file"]).read_bytes()
        self.dynamic = manifest["export"]["batch"] == "dynamic"
        self.export_max = int(manifest["export"]["options"].get("max_batch", 32))
        self.batch = int(manifest["artifact"]["runtime_options"]["max_batch"]) if self.dynamic \
            else int(manifest["export"]["batch"])
        size = deploy.config.img_size
        self.example = torch.randn(min(2, self.batch) if self.dynamic else self.batch, 3, size, size)
        with _lowering_quietly():
            self.program, _ = xnnpack_form(_export(deploy, self.example, self.dynamic, self.export_max))
            self.by_key, self.by_content = self._shipped_constants(_lower(self.program)[0])

    def _shipped_constants(self, fresh: bytes) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """The shipped constants: XNNPACK's by key, the program's by the sha256 of the fresh bytes at its place."""
        shipped_named, shipped_own = constant_spans(self.shipped)
        fresh_named, fresh_own = constant_spans(fresh)
        size = lambda span: span.stop - span.start  # noqa: E731
        if {k: size(v) for k, v in fresh_named.items()} != {k: size(v) for k, v in shipped_named.items()} \
                or [size(s) for s in fresh_own] != [size(s) for s in shipped_own]:
            raise LocateError("lowering the model again does not give the shipped program's constants (another "
                              "ExecuTorch version, or the checkpoint changed since the export): its prefixes would "
                              "not be the shipped program's")
        return ({key: self.shipped[span] for key, span in shipped_named.items()},
                {hashlib.sha256(fresh[f]).hexdigest(): self.shipped[s] for f, s in zip(fresh_own, shipped_own)})

    def graph(self) -> Graph:
        signature = self.program.graph_signature
        weights = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
                   **signature.inputs_to_lifted_tensor_constants}
        nodes, source, result = [], None, None
        for node in self.program.graph.nodes:
            if node.op == "placeholder" and node.name not in weights:
                source = node.name
            elif node.op == "call_function":
                inputs = [a.name for a in node.all_input_nodes]
                nodes.append(Node(node.name, inputs, [node.name], [weights[a] for a in inputs if a in weights],
                                  shape_only=node.target is torch.ops.aten.sym_size.int))
            elif node.op == "output":
                result = node.args[0][0].name
        return Graph(nodes, source, result)

    def prefix(self, tensors: list[str]) -> torch.export.ExportedProgram:
        """The exported graph cut at ``tensors``, exported again over the same batch range."""
        module = self.program.module()
        graph = module.graph
        by_name = {n.name: n for n in graph.nodes}
        output = next(n for n in graph.nodes if n.op == "output")
        output.args = (tuple(by_name[t] for t in tensors),)
        graph._codegen = torch.fx.graph.CodeGen()  # a plain tuple out: the exported pytree spec is the old output's
        graph.eliminate_dead_code()
        module.recompile()
        shapes = ({0: torch.export.Dim("batch", min=1, max=self.export_max)},) if self.dynamic else None
        return torch.export.export(module, (self.example,), dynamic_shapes=shapes)

    def patched(self, pte: bytes) -> bytes:
        """``pte`` with each constant the shipped program has replaced by the shipped bytes."""
        data = bytearray(pte)
        named, own = constant_spans(pte)
        for key, span in named.items():
            if key in self.by_key:
                data[span] = self.by_key[key]
        for span in own:
            shipped = self.by_content.get(hashlib.sha256(pte[span]).hexdigest())
            if shipped is not None:
                data[span] = shipped
        return bytes(data)

    def run(self, tensors: list[str], inputs: np.ndarray) -> list[np.ndarray]:
        from executorch.runtime import Runtime as EtRuntime

        with _lowering_quietly():
            program = self.patched(_lower(self.prefix(tensors))[0])
        with _native_logs_silenced():
            method = EtRuntime.get().load_program(program).load_method("forward")
        return run_in_chunks(lambda chunk: [out.numpy() for out in method.execute([torch.from_numpy(chunk)])],
                             inputs, self.batch, pad=not self.dynamic)


BACKEND = Backend(
    name="executorch", runtime="executorch", description="ExecuTorch program (.pte, XNNPACK delegate), run by "
    "ExecuTorch's runtime", runtime_class=ExecutorchRuntime, module="executorch", extra="executorch",
    packages=("executorch", "torchao"), suffixes=(".pte",), precisions=("fp32", "int8"), options=ExecutorchOptions,
    write=write, probe=ExecutorchProbe)
