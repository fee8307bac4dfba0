"""What a backend is: one descriptor (exporter, runtime, options, what to install) and one Runtime shape.

Runtimes follow Polygraphy's runners: construction only records the configuration (cheap, no
session), ``activate()`` opens the session, ``infer`` checks its input against the runtime's declared
input metadata before calling the backend's ``_infer``, and ``close()`` releases everything.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any, Callable, Mapping

import numpy as np

from ..env import require
from ..probe import run_in_chunks


@dataclass
class StagedArtifact:
    """What a backend wrote into the staging folder: the contract of every ``write``."""

    file: str  # the main file or package folder, relative to the artifact folder
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runtime_options: dict = field(default_factory=dict)  # recorded in the manifest, used on open
    parity_pending: str | None = None  # why numeric parity cannot run here (e.g. CoreML off macOS)
    extra_files: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [self.file, *self.extra_files]


class ExportError(RuntimeError):
    """The export could not produce an artifact (bad options, converter failure)."""


class RuntimeUnavailable(RuntimeError):
    """The runtime is installed but cannot run here (no GPU, not macOS, engine built elsewhere...)."""


@dataclass(frozen=True)
class InputSpec:
    """What a runtime accepts: float32 (B, 3, size, size), where B is ``batch`` or any batch if None."""

    size: int = 224
    batch: int | None = None

    @classmethod
    def from_manifest(cls, manifest: dict) -> "InputSpec":
        batch, _, size, _ = manifest["input"]["shape"]
        return cls(size=int(size), batch=batch if isinstance(batch, int) else None)

    def check(self, x):
        """``x`` as the runtime takes it, or ValueError saying what was expected."""
        shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
        expected = f"(B, 3, {self.size}, {self.size})" if self.batch is None else f"({self.batch}, 3, {self.size}, {self.size})"
        if len(shape) != 4 or shape[1:] != (3, self.size, self.size):
            raise ValueError(f"expected a float32 batch of shape {expected}, got {shape}")
        if self.batch is not None and shape[0] != self.batch:
            raise ValueError(f"this artifact was exported for a fixed batch of {self.batch}, got a batch of "
                             f"{shape[0]}; pad the batch or re-export with --batch dynamic")
        if isinstance(x, np.ndarray) or not hasattr(x, "device"):
            return np.ascontiguousarray(x, dtype=np.float32)
        return x  # a device tensor (benchmarks feed CUDA tensors): the runtime moves and casts it


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run an artifact or module, whatever the backend. ``precision``: what the artifact was exported in;
    ``compute``: the precision asked to compute in (None: as exported); ``manifest``: the artifact's manifest,
    already checked against its files (None for modules and bare files)."""

    device: str = "cpu"
    threads: int | None = 1
    precision: str = "fp32"
    compute: str | None = None
    input_spec: InputSpec = InputSpec()
    manifest: dict | None = field(default=None, compare=False, hash=False)

    @classmethod
    def split(cls, options: Mapping[str, Any]) -> tuple["RuntimeConfig", dict]:
        """(the config, the backend's own options) from one mapping of keyword options."""
        names = {f.name for f in fields(cls)}
        # None means "the default" for every field but threads, where it means "the runtime's own choice"
        given = {k: v for k, v in options.items() if k in names and (v is not None or k == "threads")}
        return cls(**given), {k: v for k, v in options.items() if k not in names}


def in_chunks(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, size: int, pad: bool) -> np.ndarray:
    """``run`` over ``x`` in chunks of at most ``size`` images, float32 (B, classes) out; with ``pad`` the last chunk
    is zero-padded to ``size`` (a program or artifact with a fixed batch) and the padding's outputs are dropped."""
    return run_in_chunks(lambda chunk: [run(chunk)], x, size, pad)[0].astype(np.float32)


class Runtime(ABC):
    """Runs an artifact or module: float32 (B, 3, H, W) in, (B, classes) outputs out.

    ``precision`` is what the artifact was exported in; ``compute`` the precision asked to compute in
    (None: as exported). After activation ``precision`` is what actually ran, and parity judges by it.
    """

    name: str = "runtime"
    #: maps reference logits into this runtime's output space (None: it returns logits)
    output_transform: Callable[[np.ndarray], np.ndarray] | None = None
    #: infer() also takes a torch tensor already on the device (benchmarks time without host copies)
    accepts_device_tensors: bool = False

    def __init__(self, source, config: RuntimeConfig = RuntimeConfig()):
        self.source = source
        self.path = str(source) if not hasattr(source, "forward") else None
        self.device = config.device
        self.threads = config.threads
        self.precision = config.precision
        self.compute = config.compute or config.precision
        self.input_spec = config.input_spec
        self.manifest = config.manifest
        self.active = False

    def activate(self) -> "Runtime":
        """Open the session (once); every other call activates implicitly."""
        if not self.active:
            self._open()
            self.active = True
        return self

    def infer(self, x):
        self.activate()
        return self._infer(self.input_spec.check(x))

    def info(self) -> dict:
        self.activate()
        return {"runtime": self.name, "path": self.path, "device": self.device, "threads": self.threads,
                "precision": self.precision, **self._info()}

    def close(self) -> None:
        """Release sessions and device memory; a later call opens them again."""
        if self.active:
            self._close()
            self.active = False

    def __enter__(self) -> "Runtime":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _infer(self, x): ...

    def _info(self) -> dict:
        return {}

    def _close(self) -> None:
        pass


@dataclass(frozen=True)
class Backend:
    """Everything the rest of the package knows about one backend."""

    name: str  # export target and artifact format, e.g. "onnx"
    runtime: str  # the runtime that runs its artifacts, e.g. "ort"
    description: str
    runtime_class: type[Runtime]
    module: str | None = None  # importable package whose presence means "installed" (None: core)
    extra: str | None = None  # pip extra that installs it
    packages: tuple[str, ...] = ()  # distributions whose versions the manifest records
    suffixes: tuple[str, ...] = ()  # artifact file suffixes, to open a bare file without a manifest
    companions: tuple[str, ...] = ()  # suffixes of files the runtime opens beside the main one (OpenVINO's .bin)
    precisions: tuple[str, ...] = ()  # export precisions; empty: a runtime without an exporter
    compute_precisions: tuple[str, ...] = ("fp32",)  # what the runtime can compute an fp32 artifact in
    options: type | None = None  # dataclass of the target's own export options
    write: Callable[..., Any] | None = None  # (deploy model, staging folder, ExportOptions) -> StagedArtifact
    #: (unfused model, path stem) -> file: the plain export other tools give, bench's baseline
    write_plain: Callable[..., Any] | None = None
    needs: str | None = None  # "gpu" or "macos": where the runtime can run at all
    #: (artifact folder, manifest, deployed model) -> probe.Probe: the shipped graph for --locate (None: not locatable)
    probe: Callable[..., Any] | None = None

    def installed(self) -> bool:
        return self.module is None or importlib.util.find_spec(self.module) is not None

    def usable(self) -> bool:
        """Installed, and on hardware it can run on."""
        if not self.installed():
            return False
        if self.needs == "gpu":
            import torch
            return torch.cuda.is_available()
        if self.needs == "macos":
            import platform
            return platform.system() == "Darwin"
        return True

    def require(self, purpose: str) -> ModuleType:
        return require(self.module, purpose, self.extra)

    def option_help(self) -> list[str]:
        """'name (type, default d): help' for each option of this target."""
        if self.options is None:
            return []
        hints = typing.get_type_hints(self.options)
        return [f"{f.name} ({_type_name(hints[f.name])}, default {f.default!r}): {f.metadata.get('help', '')}"
                for f in dataclasses.fields(self.options)]

    def parse_options(self, given: Mapping[str, Any] | None) -> Any:
        """The target's typed options from ``given`` (strings from the CLI, or values); unknown names are
        refused, not dropped."""
        given = dict(given or {})
        if self.options is None:
            if given:
                raise ExportError(f"the {self.name} target takes no options; got {', '.join(sorted(given))}")
            return None
        hints = typing.get_type_hints(self.options)
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ExportError(f"{', '.join(unknown)}: not an option of the {self.name} target; it takes "
                              f"{', '.join(sorted(known))}")
        try:
            return self.options(**{k: _convert(v, hints[k]) for k, v in given.items()})
        except ValueError as e:
            raise ExportError(f"{self.name} option: {e}") from None


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return _type_name(args[0]) if args else getattr(tp, "__name__", str(tp))


def _convert(value, tp):
    """A CLI string (or a value) as the option's declared type: bool, int, float or str (or Optional)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    if not isinstance(value, str):
        return value
    if base is bool:
        lowered = value.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{value!r} is not a boolean (true/false)")
        return lowered in ("true", "1", "yes")
    if base in (int, float):
        try:
            return base(value)
        except ValueError:
            raise ValueError(f"{value!r} is not {'an integer' if base is int else 'a number'}") from None
    return value
