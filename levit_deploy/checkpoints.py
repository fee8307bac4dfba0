"""Read checkpoints of any family and layout into their reference model, safely.

Reading never executes pickled code. Only regular files are read (a FIFO or device is refused before it is
opened). Safetensors files load with safetensors; torch files (tensor files and training checkpoints that
also pickle a yacs config, an optimizer, an argparse namespace) with an unpickler that only calls what
``torch.load(weights_only=True)`` allows and turns every other class or function the file names into an inert
placeholder holding its data, so a malicious ``__reduce__`` gets a placeholder instead of ``os.system``. What it
builds is bounded: a bytearray or collection far larger than the file, or a tuple nested too deep to hash,
becomes a :class:`NotBuilt` description (see MAX_BUILT_BYTES), descriptions are bounded in depth and width, and a
weight that is sparse, meta, quantized, complex or not finite is refused by name. The family and layout are then
recognised from key names, the variant from tensor shapes (see :mod:`levit_deploy.families`); every
failure raises :class:`CheckpointError` naming the file, what was found and what was expected.
Pretrained weights are downloaded once into a cache and verified by sha256.
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import pickle
import stat
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .artifacts import ManifestError, is_artifact, read_manifest, verify_artifact
from .env import cache_dir, sha256_file
from .families import CheckpointMismatch, Family, NotRecognised, all_variants, detect, family_of, resolve_variant

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth", "pytorch_model.pth")
STATE_DICT_ENTRIES = ("model", "state_dict", "model_state_dict")  # where trainers keep the weights


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says what was found and what was expected."""


class WeightsUnavailable(CheckpointError):
    """Pretrained weights could not be obtained (offline, or the download failed verification)."""


@dataclass
class LoadInfo:
    """What the loader found; kept on the model as ``model.load_info``."""

    source: str
    family: str
    layout: str
    variant: str = ""
    num_classes: int = 0
    file_format: str = ""
    entry: str | None = None  # the top-level entry the weights came from ('model', 'ema_model', ...)
    entries: dict[str, str] = field(default_factory=dict)  # every top-level entry of the file, described
    details: dict = field(default_factory=dict)  # the family's own facts (LeViT: mode, fused, distilled)
    sha256: str | None = None
    seed: int | None = None  # for random init: reproduces the same weights
    ignored_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Reading files without running them

#: the largest bytes, bytearray or collection a pickle may build outside the tensors' own storage: one ``bytearray(n)``
#: costs a handful of bytes in the file and n bytes of memory, so a larger one becomes a :class:`NotBuilt` description
MAX_BUILT_BYTES = 16 << 20
#: the deepest tuple nesting a pickle may build: hashing a tuple recurses in C without a guard, so a dict key
#: nested 100,000 tuples deep would crash the interpreter; a deeper tuple becomes a :class:`NotBuilt` description
MAX_TUPLE_NESTING = 1000
MAX_DESCRIBED_ENTRIES = 32  # top-level entries of a training checkpoint described one by one; the rest are counted
_CLIP = 40  # characters of a value shown in a description


class NotBuilt(str):
    """What a value the file asked for becomes when building it would cost far more than the file: its description.
    What is built from it (a call taking it, a tuple around a too-deep tuple) is not built either: it stays this."""


class _TooDeep(NotBuilt):
    """A tuple nested deeper than MAX_TUPLE_NESTING (a tuple holding one is replaced by it too)."""


class InertObject(dict):
    """What a class or function named by a pickle becomes: data, never code.

    Calling it (pickle's REDUCE) records the arguments; ``__setstate__`` records the state; dict items
    (a yacs CfgNode is a dict) and list items (``append``/``extend``) are kept. ``origin`` says what the file named.
    """

    origin = "?"
    args: tuple = ()
    kwargs: dict = {}
    state = None

    def __init__(self, *args, **kwargs):  # noqa: D107 - REDUCE/NEWOBJ arguments, kept as data
        super().__init__()
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def append(self, item):  # a list subclass the file pickled: its items, kept as data
        self.__dict__.setdefault("listitems", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("listitems", []).extend(items)

    def __repr__(self) -> str:
        return f"<{self.origin} read as data>"


def _size_of(value, ints_are_sizes: bool) -> tuple[int, str]:
    """(size, unit) of what a constructor would build from ``value``, without building it."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size(), "bytes"
    if isinstance(value, bool) or (isinstance(value, int) and not ints_are_sizes):
        return 0, "bytes"
    if isinstance(value, int):
        return value, "bytes"
    try:
        return len(value), ("bytes" if isinstance(value, (bytes, bytearray, str)) else "items")
    except TypeError:
        return 0, "bytes"


def _bounded(build, name: str, limit: int, ints_are_sizes: bool = False):
    """``build`` for arguments that describe at most ``limit`` bytes (or items); a larger one is not built."""
    def bounded(*args, **kwargs):
        size, unit = _size_of(args[0], ints_are_sizes) if args else (0, "bytes")
        if size > limit:
            return NotBuilt(f"<{name} of {size:,} {unit}, not built>")
        return build(*args, **kwargs)

    bounded.__name__ = bounded.__qualname__ = name
    return bounded


#: allowed callables that build something much larger than their pickled arguments: (name shown, limit,
#: an int argument is a size). Repeated encodes (hex, utf-32, unicode_escape) grow at most ~10x a step, so an
#: encode's input is bounded at 1/16 of the limit and a chain of them stops at the second step
_AMPLIFIERS = {
    "builtins.bytearray": ("bytearray", MAX_BUILT_BYTES, True),
    "builtins.bytes": ("bytes", MAX_BUILT_BYTES, True),
    "_codecs.encode": ("encoded bytes", MAX_BUILT_BYTES // 16, False),
    "builtins.set": ("set", MAX_BUILT_BYTES, False),
    "builtins.frozenset": ("frozenset", MAX_BUILT_BYTES, False),
    "collections.Counter": ("Counter", MAX_BUILT_BYTES, False),
    "torch.Size": ("torch.Size", MAX_BUILT_BYTES, False),
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": ("tensor copy", MAX_BUILT_BYTES, False),
}


def _allowed_globals() -> dict[str, object]:
    """What a pickle may name and call: ``weights_only``'s allowlist, the user's safe globals and argparse.Namespace,
    with the constructors that amplify their arguments bounded (see ``_AMPLIFIERS``)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())
    for g in torch.serialization.get_safe_globals():
        obj, name = g if isinstance(g, tuple) else (g, f"{g.__module__}.{g.__qualname__}")
        allowed[name] = obj
    allowed["argparse.Namespace"] = argparse.Namespace
    for name, (shown, limit, ints_are_sizes) in _AMPLIFIERS.items():
        if name in allowed:
            allowed[name] = _bounded(allowed[name], shown, limit, ints_are_sizes)
    return allowed


class _BoundedUnpickler(pickle._Unpickler):
    """Pickle's own Python unpickler, restricted: globals come only from ``_allowed`` (anything else becomes an
    :class:`InertObject` class), REDUCE/NEWOBJ/INST/OBJ call only those, BUILD and the container opcodes change only
    objects the pickle built itself, tuples nest at most MAX_TUPLE_NESTING deep. The Python implementation, not
    the C one, because the C one sizes its memo from the indices in the file: a 6-byte LONG_BINPUT makes it
    allocate and clear 32 GiB."""

    _allowed: dict[str, object] = {}
    _allowed_ids: frozenset[int] = frozenset()
    _placeholders: list[str]
    _classes: dict[str, type]
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._tuple_depth: dict[int, tuple[tuple, int]] = {}  # id -> (the tuple, kept alive; its nesting)

    def find_class(self, module: str, name: str):
        if self.proto < 3 and self.fix_imports:  # what pickle itself does for protocol 2 (torch.save's)
            import _compat_pickle
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if full not in self._classes:
            self._placeholders.append(_clip(full, 120))
            safe = "".join(c if c.isalnum() or c == "_" else "_" for c in name[:60]) or "InertObject"
            self._classes[full] = type(safe, (InertObject,), {"origin": _clip(full, 120)})
        return self._classes[full]

    # -- what may be called, and what may be changed
    def _may_call(self, func) -> bool:
        return id(func) in self._allowed_ids or (isinstance(func, type) and issubclass(func, InertObject))

    def _refuse_call(self, func):
        if not self._may_call(func):
            raise pickle.UnpicklingError(f"the pickle calls {_short(func)}, which is not an allowed global")

    def _refuse_change(self, target, what: str):
        if isinstance(target, type) or callable(target) or id(target) in self._allowed_ids:
            raise pickle.UnpicklingError(f"the pickle's {what} changes {_short(target)}, which it did not build")

    def _call(self, func, args, kwargs=None):
        self._refuse_call(func)
        if isinstance(args, NotBuilt):
            return args
        if not isinstance(args, tuple) or not isinstance(kwargs or {}, dict):
            raise pickle.UnpicklingError("the pickle calls a function with arguments that are not a tuple")
        not_built = next((a for a in args if isinstance(a, NotBuilt)), None)
        if not_built is not None and not (isinstance(func, type) and issubclass(func, InertObject)):
            return not_built  # what would be built from a value that was not built is not built either
        return func(*args, **(kwargs or {}))

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, {}))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def _new(self, cls, args, kwargs):
        if not isinstance(cls, type):
            raise pickle.UnpicklingError(f"the pickle makes a new object of {_short(cls)}, which is not a class")
        if isinstance(args, NotBuilt):
            return args
        if issubclass(cls, InertObject):
            return self._call(cls, args, kwargs)  # records the arguments
        self._refuse_call(cls)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise pickle.UnpicklingError("the pickle makes an object with arguments that are not a tuple")
        not_built = next((a for a in args if isinstance(a, NotBuilt)), None)
        return not_built if not_built is not None else cls.__new__(cls, *args, **kwargs)

    def _instantiate(self, klass, args):  # INST and OBJ
        self._refuse_call(klass)
        super()._instantiate(klass, args)

    def load_build(self):
        self._refuse_change(self.stack[-2], "BUILD")
        super().load_build()

    def load_append(self):
        self._refuse_change(self.stack[-2], "APPEND")
        super().load_append()

    def _marked_target(self):
        return self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None

    def load_appends(self):
        self._refuse_change(self._marked_target(), "APPENDS")
        super().load_appends()

    def load_setitem(self):
        self._refuse_change(self.stack[-3], "SETITEM")
        super().load_setitem()

    def load_setitems(self):
        self._refuse_change(self._marked_target(), "SETITEMS")
        super().load_setitems()

    def load_additems(self):
        self._refuse_change(self._marked_target(), "ADDITEMS")
        super().load_additems()

    def _track_tuple(self):
        t = self.stack[-1]
        too_deep = next((x for x in t if isinstance(x, _TooDeep)), None)
        if too_deep is not None:
            self.stack[-1] = too_deep
            return
        depth = 1 + max((self._tuple_depth.get(id(x), (None, 0))[1] for x in t if type(x) is tuple), default=0)
        if depth > MAX_TUPLE_NESTING:
            self.stack[-1] = _TooDeep(f"<tuple nested over {MAX_TUPLE_NESTING} levels deep, not built>")
        else:
            self._tuple_depth[id(t)] = (t, depth)

    def load_tuple(self):
        super().load_tuple()
        self._track_tuple()

    def load_tuple1(self):
        super().load_tuple1()
        self._track_tuple()

    def load_tuple2(self):
        super().load_tuple2()
        self._track_tuple()

    def load_tuple3(self):
        super().load_tuple3()
        self._track_tuple()


for _op, _method in [(pickle.REDUCE, "load_reduce"), (pickle.NEWOBJ, "load_newobj"),
                     (pickle.NEWOBJ_EX, "load_newobj_ex"), (pickle.BUILD, "load_build"),
                     (pickle.APPEND, "load_append"), (pickle.APPENDS, "load_appends"),
                     (pickle.SETITEM, "load_setitem"), (pickle.SETITEMS, "load_setitems"),
                     (pickle.ADDITEMS, "load_additems"), (pickle.TUPLE, "load_tuple"), (pickle.TUPLE1, "load_tuple1"),
                     (pickle.TUPLE2, "load_tuple2"), (pickle.TUPLE3, "load_tuple3")]:
    _BoundedUnpickler.dispatch[_op[0]] = getattr(_BoundedUnpickler, _method)


def _restricted_pickle_module(placeholders: list[str]) -> SimpleNamespace:
    """A pickle module for torch.load that calls only what ``weights_only`` allows (see :class:`_BoundedUnpickler`);
    every other global the file names is appended to ``placeholders`` and read as an inert placeholder."""
    allowed = _allowed_globals()

    class Unpickler(_BoundedUnpickler):
        _allowed, _allowed_ids = allowed, frozenset(map(id, allowed.values()))
        _placeholders, _classes = placeholders, {}

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return SimpleNamespace(Unpickler=Unpickler, load=load, __name__="levit_deploy_restricted_pickle")


_KINDS = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def _refuse_unless_regular(path: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: is a folder; pass the checkpoint file or use load() on the folder")
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS if test(mode)), "not a file")
        raise CheckpointError(f"{path}: is {kind}, not a regular file; expected a checkpoint file "
                              f"(.pth/.bin/.safetensors)")


def _open_regular(path: Path):
    """``path`` opened for reading, after checking it is a regular file: a FIFO or device is refused before it
    is opened (opening a FIFO blocks until a writer comes; /dev/zero never ends)."""
    try:
        _refuse_unless_regular(path, os.stat(path).st_mode)
        # non-blocking, then checked again on the descriptor: a FIFO swapped in after the stat cannot hang us
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    f = os.fdopen(fd, "rb")
    try:
        _refuse_unless_regular(path, os.fstat(fd).st_mode)
    except CheckpointError:
        f.close()
        raise
    return f


def _sniff(head: bytes, size: int, path: Path) -> str:
    """File format from its first bytes, not its name: 'zip' (torch.save), 'pickle', 'safetensors'."""
    if not head:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); expected a .pth/.bin/.safetensors checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # safetensors: a little-endian u64 header length, then the JSON header; tested before pickle because
    # that length's first byte can be 0x80, pickle's protocol marker
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(
        f"{path}: not a checkpoint (first bytes {head[:8]!r}); expected a torch.save zip or pickle "
        f"(.pth/.bin) or a safetensors file")


def _refuse_zip_bombs(path: Path, data: bytes) -> None:
    """torch.save stores its records uncompressed, but torch.load inflates compressed ones: a record declared
    larger than the whole file is refused before anything is inflated."""
    import zipfile

    try:
        records = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint ({type(e).__name__}: {e})") from None
    for record in records:
        if record.file_size > len(data):
            raise CheckpointError(
                f"{path}: the record {_clip(record.filename, 80)} would inflate to {record.file_size:,} bytes from a "
                f"{len(data):,}-byte file; torch.save never compresses, so this is refused unread")


def _torch_load(path: Path, data: bytes, fmt: str) -> tuple[object, list[str]]:
    """(object, names read as inert data), read with the restricted unpickler: nothing in the file runs."""
    if fmt == "zip":
        _refuse_zip_bombs(path, data)
    placeholders: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warnings (deprecated quantized types...) are not one line
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                             pickle_module=_restricted_pickle_module(placeholders))
    except MemoryError:
        raise CheckpointError(f"{path}: ran out of memory reading it ({len(data):,} bytes); expected a "
                              f"checkpoint that fits in memory") from None
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message (RecursionError included)
        named = f"; it names {_names(placeholders)}, none of which was run" if placeholders else ""
        text = str(e).strip()
        raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint ({type(e).__name__}: "
                              f"{_clip(text.splitlines()[0], 200) if text else 'no detail'}){named}") from None
    return obj, placeholders


def _clip(text: str, width: int = _CLIP) -> str:
    """``text`` on one line and at most ``width`` characters (a file's strings can hold anything, of any length)."""
    head = text[: width + 1]
    if not head.isprintable():
        head = head.encode("unicode_escape", "backslashreplace").decode("ascii")
    return head if len(text) <= width and len(head) <= width else head[: width - 1] + "…"


def _names(names, limit: int = 8) -> str:
    unique = sorted(set(names))
    return ", ".join(unique[:limit]) + (f" and {len(unique) - limit} more" if len(unique) > limit else "")


def _key(key) -> str:
    return _clip(key) if isinstance(key, str) and not isinstance(key, NotBuilt) else _short(key, 0)


def _keys(mapping, limit: int = 8) -> str:
    keys = [_key(k) for k in itertools.islice(mapping, limit)]
    return ", ".join(keys) + (f"… ({len(mapping)} in all)" if len(mapping) > limit else "")


def _tensor_text(t: torch.Tensor) -> str:
    return f"tensor {tuple(t.shape)}" if t.dim() <= 8 else f"tensor of {t.dim()} dimensions"


def _describe(value) -> str:
    """One bounded line about a top-level entry: never a repr of the whole value, whatever its size or depth."""
    try:
        if isinstance(value, NotBuilt):
            return str(value)
        if isinstance(value, InertObject):
            items = ", ".join(f"{_key(k)}={_short(v)}" for k, v in itertools.islice(value.items(), 6))
            text = f"{value.origin} (read as data{': ' + items if items else ''})"
        elif isinstance(value, dict):
            tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
            if tensors and tensors == len(value):
                return f"state dict ({tensors} tensors)"
            text = f"dict ({len(value)} entries: {_keys(value, 5)})"
        elif isinstance(value, torch.Tensor):
            return _tensor_text(value)
        else:
            text = _short(value)
        return _clip(text, 400)
    except Exception as e:  # noqa: BLE001 - describing is best effort; it never fails the load
        return f"<{_clip(type(value).__name__)}, not described: {type(e).__name__}>"


def _short(value, depth: int = 2) -> str:
    """A short sketch of ``value``, at most ``depth`` containers deep and four items wide (cycles end there)."""
    if isinstance(value, NotBuilt):
        return str(value)
    if isinstance(value, torch.Tensor):
        return _tensor_text(value)
    if value is None or isinstance(value, (bool, float, complex, torch.dtype, torch.device, torch.layout)):
        return _clip(repr(value))
    if isinstance(value, int):  # a LONG4 can hold a million digits, more than str() converts
        return repr(value) if value.bit_length() <= 128 else f"<int of {value.bit_length():,} bits>"
    if isinstance(value, str):
        return _clip(repr(value[: _CLIP + 1]))
    if isinstance(value, (bytes, bytearray)):
        if len(value) <= _CLIP:
            return _clip(repr(value))
        return f"<{type(value).__name__} of {len(value):,} bytes>"
    if isinstance(value, InertObject) and not len(value):
        return f"<{value.origin}>"
    if isinstance(value, type) and issubclass(value, InertObject):
        return f"<{value.origin}>"
    if isinstance(value, type) or callable(value):  # a global the file named: what it is, not its repr
        module = getattr(value, "__module__", None) or "?"
        name = f"{module}.{getattr(value, '__qualname__', None) or type(value).__name__}"
        return f"<{_clip(name, 80)}>"
    if isinstance(value, argparse.Namespace):
        items = ", ".join(f"{_key(k)}={_short(v, depth - 1)}" for k, v in itertools.islice(vars(value).items(), 4))
        return f"Namespace({items}{'…' if len(vars(value)) > 4 else ''})"
    if isinstance(value, dict):
        origin = value.origin if isinstance(value, InertObject) else ""
        if depth <= 0 and value:
            return f"{origin}{{…{len(value)} entries}}"
        items = ", ".join(f"{_key(k)}: {_short(v, depth - 1)}" for k, v in itertools.islice(value.items(), 4))
        return origin + "{" + items + ("…}" if len(value) > 4 else "}")
    if isinstance(value, (list, tuple, set, frozenset)):
        left, right = "()" if isinstance(value, tuple) else "{}" if isinstance(value, (set, frozenset)) else "[]"
        if not value:
            return left + right
        if depth <= 0:
            return f"{left}…{len(value)} items{right}"
        items = ", ".join(_short(v, depth - 1) for v in itertools.islice(value, 4))
        return left + items + ("…" if len(value) > 4 else "") + right
    return f"<{_clip(type(value).__name__)}>"


@dataclass
class RawCheckpoint:
    """A checkpoint file as read: its state dict, which entry held it, and what else the file holds."""

    tensors: dict[str, torch.Tensor]
    file_format: str
    entry: str | None
    entries: dict[str, str]
    notes: list[str]


def _tensor_problem(t: torch.Tensor) -> str | None:
    """Why a tensor cannot be a weight (what was found, what was expected), or None."""
    if t.is_meta:
        return ("is a meta tensor (a shape without values, as saved from a model built on the meta device); "
                "expected weights with values")
    if t.layout != torch.strided:
        return (f"is a sparse tensor ({str(t.layout).replace('torch.', '')}); expected dense weights "
                f"(save tensor.to_dense())")
    if getattr(t, "is_nested", False):
        return "is a nested tensor; expected dense weights"
    if t.is_quantized:
        return (f"is a quantized tensor ({str(t.dtype).replace('torch.', '')}); expected floating-point weights "
                f"(save the float model: levit-deploy quantizes at export, --precision int8)")
    if t.is_complex():
        return f"is complex ({str(t.dtype).replace('torch.', '')}); expected real floating-point weights"
    if t.is_floating_point():
        wide = t if t.element_size() > 1 else t.float()  # float8 types take few operations
        # any NaN or infinity makes the sum non-finite; a non-finite sum of finite values (an fp16 overflow) is rare:
        # only then is every value looked at (the sum reads a large model's weights several times faster)
        if not bool(torch.isfinite(wide.sum())) and not bool((finite := torch.isfinite(wide)).all()):
            nan = int(torch.isnan(wide).sum())
            inf = t.numel() - int(finite.sum()) - nan
            found = " and ".join(f"{n:,} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
            return (f"holds {found} value{'s' if nan + inf > 1 else ''} (of {t.numel():,}); expected finite "
                    f"weights (a diverged or damaged training run?)")
    return None


def _check_tensors(path: Path, tensors: dict) -> None:
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: the state dict has a key {_short(key, 0)} ({_clip(type(key).__name__)}); "
                                  f"expected parameter names (str)")
        problem = _tensor_problem(t)
        if problem:
            raise CheckpointError(f"{path}: {_clip(key, 120)} {problem}")


def read_checkpoint(path: str | Path, entry: str | None = None) -> RawCheckpoint:
    """The state dict in a checkpoint file (``entry``, or the first of 'model', 'state_dict',
    'model_state_dict', or the file itself), with every other top-level entry described, not used.

    Only a regular file is read (a FIFO, device or folder is one error, at once); every tensor of the state dict
    must be dense, real, unquantized, with values (not meta), and finite if floating-point."""
    path = Path(path)
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            fmt = _sniff(f.read(16), size, path)
            f.seek(0)
            data = f.read() if fmt != "safetensors" else b""
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    placeholders: list[str] = []
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            obj: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_clip(str(e), 200)})") from None
    else:
        obj, placeholders = _torch_load(path, data, fmt)
        del data
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), "
                              f"found {_clip(type(obj).__name__)}" + (f" {obj}" if isinstance(obj, NotBuilt) else ""))
    is_state_dict = any(isinstance(v, torch.Tensor) for v in obj.values())
    entries = {}
    if not is_state_dict:
        for k, v in itertools.islice(obj.items(), MAX_DESCRIBED_ENTRIES):
            entries[_key(k)] = _describe(v)
        if len(obj) > MAX_DESCRIBED_ENTRIES:
            entries["…"] = f"{len(obj) - MAX_DESCRIBED_ENTRIES} more entries, not described"
    if entry is not None:
        if entry not in obj:
            raise CheckpointError(f"{path}: no entry {entry!r}; the file holds {_keys(obj)}")
        if obj[entry] is None:
            raise CheckpointError(f"{path}: the entry {entry!r} is None (a model trained without it: "
                                  f"{'no EMA' if 'ema' in entry else 'empty'}); use the default entry instead")
        chosen = entry
    else:
        chosen = next((k for k in STATE_DICT_ENTRIES if isinstance(obj.get(k), dict)), None)
    sd = obj[chosen] if chosen is not None else obj
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: entry {chosen!r} is {_clip(type(sd).__name__)}, not a state dict")
    unsafe = [v.origin for v in sd.values() if isinstance(v, InertObject)]
    if unsafe:
        raise CheckpointError(
            f"{path}: refused to unpickle {_names(unsafe, 5)}: the weights hold objects other than tensors, "
            f"which could run code when loaded; they were read as inert data and nothing ran. Re-save the "
            f"weights with torch.save(model.state_dict()) or as safetensors.")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors (top-level keys: {_keys(obj)})")
    _check_tensors(path, tensors)
    notes = []
    for prefix in ("module.module.", "module."):  # an EMA of a DistributedDataParallel model, or DDP
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            notes.append(f"stripped the '{prefix}' prefix (saved from a wrapped model)")
            break
    if placeholders:
        notes.append(f"read as data, not run: {_names(placeholders)}")
    return RawCheckpoint(tensors, fmt, chosen, entries, notes)


def find_weights_file(folder: Path) -> Path:
    """The weights file of a Hugging Face or timm folder. A candidate that is there but not a regular file (a FIFO,
    a folder) is returned when no regular one is, so that reading it says what it is instead of 'no weights file'."""
    present = [folder / name for name in WEIGHT_FILES if os.path.lexists(folder / name)]
    regular = [p for p in present if p.is_file()]
    if regular or present:
        return (regular or present)[0]
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointError(f"{folder}: no weights file; expected one of {', '.join(WEIGHT_FILES)}, "
                          f"found {found or 'an empty folder'}")


def build_from_state_dict(sd: dict[str, torch.Tensor], source: str, file_format: str = "",
                          expect_variant: str | None = None, num_classes: int | None = None) -> nn.Module:
    """Recognise family, layout and variant, check them, and load ``sd`` into a fresh eval-mode model."""
    try:
        family, det = detect(sd)
        config = det.config
        if expect_variant is not None and config.name != expect_variant:
            raise CheckpointError(f"{source}: you asked for {expect_variant} but the checkpoint is a "
                                  f"{config.name} ({det.layout} layout): its tensor shapes fit {config.name} only")
        if num_classes is not None and num_classes != config.num_classes:
            raise CheckpointError(f"{source}: the checkpoint's head has {config.num_classes} classes, you asked "
                                  f"for {num_classes}; re-train or fine-tune the head first")
        model = family.build(sd, det)
    except (NotRecognised, CheckpointMismatch) as e:
        raise CheckpointError(f"{source}: {e}") from None
    model.load_info = LoadInfo(source=source, family=family.name, layout=det.layout, variant=config.name,
                               num_classes=config.num_classes, file_format=file_format, details=det.details,
                               ignored_keys=det.ignored_keys, notes=list(det.notes))
    return model


# ---------------------------------------------------------------------------------------------
# Pretrained weights


def _hash_prefix(url: str) -> str:
    return url.rsplit("-", 1)[-1].split(".")[0]


def download_pretrained(family: Family, variant: str, progress: bool = True) -> Path:
    """Path of the verified official checkpoint for a variant, downloading it on first use."""
    url = family.pretrained_urls.get(variant)
    if url is None:
        raise WeightsUnavailable(f"no downloadable official weights for {variant} (the {family.title} releases "
                                 f"are not on a public URL); pass --weights PATH with a checkpoint, or --init random")
    target = cache_dir() / "weights" / url.rsplit("/", 1)[-1]
    prefix = _hash_prefix(url)
    if target.is_file() and sha256_file(target).startswith(prefix):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                if progress and total and sys.stderr.isatty():
                    print(f"\rdownloading {target.name}: {done * 100 // total}%", end="", file=sys.stderr)
        if progress and sys.stderr.isatty():
            print(file=sys.stderr)
        digest = sha256_file(tmp)
        if not digest.startswith(prefix):
            raise WeightsUnavailable(f"{url}: downloaded file has sha256 {digest[:16]}…, expected a prefix "
                                     f"{prefix}; refusing to use it")
        os.replace(tmp, target)
        return target
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise WeightsUnavailable(
            f"cannot download {variant} weights from {url} ({reason}). Pass --weights PATH with a local "
            f"checkpoint, or --init random for untrained weights") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights, normalisation statistics and affine terms for a model of any family."""
    return family_of(model).randomize_(model, seed)


def load(name_or_path: str | os.PathLike, weights: str | os.PathLike | None = None,
         num_classes: int | None = None, init: str = "pretrained", seed: int = 0, entry: str | None = None
         ) -> nn.Module:
    """An eval-mode reference model whose forward returns logits; ``model.load_info`` says what was found.

    name_or_path: a variant name of any family (``levit_128s``…), a checkpoint file, or a folder (Hugging
    Face or timm hub layout: config.json + model.safetensors or pytorch_model.bin).
    weights: a checkpoint for a named variant (checked to be that variant).
    init: for a variant name without weights, "pretrained" downloads the official release, "random"
    gives seeded random weights (see :meth:`Family.randomize_`).
    entry: the top-level entry of a training checkpoint to load (default 'model'; 'ema_model' for EMA).
    """
    text = os.fspath(name_or_path)
    found = resolve_variant(text) if not Path(text).exists() else None
    if found is None:
        path = Path(text)
        if not path.exists():
            raise CheckpointError(f"{text}: no such file or folder, and not a variant name "
                                  f"(known: {', '.join(all_variants())})")
        if weights is not None:
            raise CheckpointError(f"{text}: a checkpoint path already holds weights; --weights is only "
                                  f"for variant names")
        return _load_path(path, None, num_classes, entry)
    family, variant = found
    if weights is not None:
        return _load_path(Path(weights), variant, num_classes, entry)
    if init == "random":
        config = family.config(variant, num_classes)
        model = family.randomize_(family.create(config), seed).eval()
        model.load_info = LoadInfo(source=f"random init (seed {seed})", family=family.name, layout="none",
                                   variant=variant, seed=seed, num_classes=config.num_classes)
        return model
    if init != "pretrained":
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    return _load_path(download_pretrained(family, variant), variant, num_classes, entry)


def _load_path(path: Path, variant: str | None, num_classes: int | None, entry: str | None = None) -> nn.Module:
    if path.is_dir():  # a Hugging Face or timm hub folder: the weights file decides, not config.json
        path = find_weights_file(path)
    raw = read_checkpoint(path, entry)
    model = build_from_state_dict(raw.tensors, str(path), raw.file_format, variant, num_classes)
    info = model.load_info
    info.sha256, info.entry, info.entries = sha256_file(path), raw.entry, raw.entries
    info.notes = raw.notes + info.notes
    return model


def load_source(folder: str | os.PathLike) -> nn.Module:
    """The reference model an artifact was exported from, rebuilt from its manifest (the artifact is checked first:
    a hostile or damaged one is refused before anything is loaded)."""
    manifest, folder = read_manifest(folder)
    verify_artifact(manifest, folder)
    src = manifest.get("source", {})
    variant = manifest["model"]["variant"]
    if src.get("layout") == "none" and src.get("seed") is not None:
        return load(variant, init="random", seed=src["seed"])
    path = src.get("source")
    if not path or not Path(path).exists():
        raise ManifestError(f"{folder}: the source checkpoint {path!r} recorded in the manifest is not on this "
                            f"machine; pass it as MODEL and the artifact with --artifact")
    return load(path)


@dataclass
class Target:
    """What a command was pointed at: an artifact folder (``artifact``, its manifest read and checked) or a
    model (a variant name, checkpoint file or folder). ``model()`` is the reference model either way: the
    artifact's source, or the model itself; loaded on first use and kept."""

    name: str
    artifact: Path | None
    manifest: dict | None
    _load: object = field(repr=False, default=None)
    _model: nn.Module | None = field(repr=False, default=None)

    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self._load()
        return self._model

    def source_key(self) -> str:
        """What identifies the reference model: its checkpoint's resolved path, or the variant and seed of random
        weights (two artifacts of one checkpoint share one reference)."""
        if self.manifest is not None:
            source, variant = self.manifest.get("source", {}), self.manifest["model"]["variant"]
        else:
            source, variant = self.model().load_info.to_dict(), self.model().config.name
        if source.get("layout") == "none":
            return f"{variant}, random weights seed {source.get('seed')}"
        path = source.get("source") or variant
        return str(Path(path).resolve()) if Path(path).exists() else path


def resolve(target: str | os.PathLike, weights: str | os.PathLike | None = None, init: str = "pretrained",
            entry: str | None = None) -> Target:
    """Decide once whether ``target`` is an artifact folder or a model; an artifact's manifest is read and every
    file checked now, before any model is loaded."""
    if is_artifact(target):
        manifest, folder = read_manifest(target)
        verify_artifact(manifest, folder)
        return Target(os.fspath(target), folder, manifest, lambda: load_source(folder))
    return Target(os.fspath(target), None, None, lambda: load(target, weights=weights, init=init, entry=entry))
