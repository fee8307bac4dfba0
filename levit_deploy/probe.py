"""A shipped graph seen the same way whatever its backend, for ``--locate``: operations, the tensors between them,
the weights they read (by the deployed model's parameter names), and a prefix of the graph run to one tensor.

Backends that support locating provide a ``Probe`` (``Backend.probe``); ``locate.py`` needs nothing else of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

#: a deployed model's parameter name inside a graph's constant name ("stages.3.inner.qkv.weight_quantized")
PARAM_NAME = re.compile(r"((?:[A-Za-z_][A-Za-z0-9_]*|\d+)(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|\d+))*\.(?:weight|bias))")


def param_name(name: str) -> str | None:
    """The parameter path in a constant's name, or None."""
    found = PARAM_NAME.search(name)
    return found.group(1) if found else None


def run_in_chunks(run: Callable[[np.ndarray], list], inputs: np.ndarray, size: int,
                  pad: bool = False) -> list[np.ndarray]:
    """``run`` (one chunk of images -> the value of each tensor) over ``inputs`` in chunks of at most ``size``, each
    value flattened to (images, D) in float64 (a value may fold the batch into rows); with ``pad`` the last chunk is
    zero-padded to ``size`` (a fixed-batch program) and the padding's rows are dropped."""
    values: list[list[np.ndarray]] = []
    for i in range(0, len(inputs), size):
        chunk = inputs[i:i + size]
        n = len(chunk)
        if pad and n < size:
            chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
        outs = [np.asarray(o, np.float64).reshape(len(chunk), -1)[:n] for o in run(np.ascontiguousarray(chunk))]
        values = values or [[] for _ in outs]
        for kept, out in zip(values, outs):
            kept.append(out)
    return [np.concatenate(v) for v in values]


class LocateError(RuntimeError):
    """The artifact's graph cannot be probed (its backend has no prober, no unit could be found in it, or a prefix
    of it cannot be built as the shipped one was)."""


@dataclass
class Node:
    """One operation of a graph, backend-neutral: tensors by name, and the parameters it reads by module path."""

    name: str
    inputs: list[str]
    outputs: list[str]
    params: list[str] = field(default_factory=list)  # parameter names, e.g. "stages.3.inner.qkv.weight"
    shape_only: bool = False  # reads only its input's shape (ONNX Shape, OpenVINO ShapeOf): carries no values


@dataclass
class Graph:
    """A shipped graph as ``Node`` s in topological order, with its input and output tensor names.

    A weight often reaches its operation through constant nodes (a DequantizeLinear, a Convert, a transpose the
    converter kept); those nodes cannot be reached from the input, so their parameters are handed on to the first
    node the input does reach."""

    nodes: list[Node]
    input: str
    output: str

    def __post_init__(self) -> None:
        live = self.reachable_without("")
        carried: dict[str, list[str]] = {}
        for i, node in enumerate(self.nodes):
            inherited = [p for t in node.inputs for p in carried.get(t, [])]
            if i in live:
                node.params = list(dict.fromkeys([*node.params, *inherited]))
            else:
                for t in node.outputs:
                    carried[t] = [*node.params, *inherited]

    def reachable_without(self, blocked: str) -> set[int]:
        """Indices of the nodes the input's values reach when tensor ``blocked`` carries nothing (shapes computed
        from the input, for a dynamic batch, are not its values)."""
        live, reached = {self.input} - {blocked}, set()
        for i, node in enumerate(self.nodes):
            if not node.shape_only and any(t in live for t in node.inputs):
                reached.add(i)
                live.update(t for t in node.outputs if t != blocked)
        return reached

    def owned(self, unit: str) -> set[int]:
        """Indices of the nodes that read a weight of ``unit`` (or of a module inside it)."""
        prefix = unit + "."
        return {i for i, n in enumerate(self.nodes) if any(p.startswith(prefix) for p in n.params)}

    def cuts(self, after: int, unit: str, limit: int = 8) -> list[str]:
        """The tensors that can hold the value entering ``unit``: from node ``after`` on (the last one that reads a
        weight of the units before), each tensor that every path from the input to ``unit``'s weights passes
        through, in order, at most ``limit``. Weights alone cannot tell which: a normalisation whose affine was
        folded into the next linear reads none, so the boundary may lie before or after it; the caller picks by
        value. Empty when no node reads a weight of ``unit`` (folded into a neighbour)."""
        owned = self.owned(unit)
        if not owned or min(owned) <= after:
            return []
        found = []
        for i in range(max(after, 0), min(owned)):
            found += [t for t in self.nodes[i].outputs if not owned & self.reachable_without(t)]
        return found[-limit:]


class Probe:
    """How locate reaches inside one backend's artifact: its graph, and a prefix of it run to one tensor. Each
    backend that supports ``--locate`` provides one (``Backend.probe``), built from the artifact folder, its
    manifest and the deployed model it was exported from; it must never write the shipped files."""

    def graph(self) -> Graph:
        raise NotImplementedError

    def run(self, tensors: list[str], inputs: np.ndarray) -> list[np.ndarray]:
        """The values of ``tensors`` for ``inputs``, each flattened to (N, D), from one prefix of the shipped graph
        that ends at them."""
        raise NotImplementedError
