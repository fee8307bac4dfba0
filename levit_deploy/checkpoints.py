"""Read checkpoints of any family and layout into their reference model, safely.

Reading never executes pickled code. Plain tensor files load with ``torch.load(weights_only=True)`` or
safetensors; a training checkpoint that also pickles other objects (a yacs config, an optimizer, an
argparse namespace) is read with an unpickler that only calls what ``weights_only`` allows and turns
every other class or function the file names into an inert placeholder holding its data, so a
malicious ``__reduce__`` gets a placeholder instead of ``os.system``. The family and layout are then
recognised from key names, the variant from tensor shapes (see :mod:`levit_deploy.families`); every
failure raises :class:`CheckpointError` naming the file, what was found and what was expected.
Pretrained weights are downloaded once into a cache and verified by sha256.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
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

from .env import cache_dir, sha256_file
from .families import CheckpointMismatch, Family, NotRecognised, all_variants, detect, resolve_variant

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


class InertObject(dict):
    """What a class or function named by a pickle becomes: data, never code.

    Calling it (pickle's REDUCE) records the arguments; ``__setstate__`` records the state; dict items
    (a yacs CfgNode is a dict) are kept. ``origin`` says what the file named.
    """

    origin = "?"

    def __init__(self, *args, **kwargs):  # noqa: D107 - REDUCE/NEWOBJ arguments, kept as data
        super().__init__()
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.origin} read as data>"


def _restricted_pickle_module(placeholders: list[str]) -> SimpleNamespace:
    """A pickle module for torch.load whose Unpickler calls only what ``weights_only`` allows."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())
    allowed.update({f"{g.__module__}.{g.__qualname__}": g for g in torch.serialization.get_safe_globals()
                    if not isinstance(g, tuple)})
    classes: dict[str, type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            full = f"{module}.{name}"
            if full in allowed:
                return allowed[full]
            if full not in classes:
                placeholders.append(full)
                classes[full] = type(name, (InertObject,), {"origin": full})
            return classes[full]

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return SimpleNamespace(Unpickler=Unpickler, load=load, __name__="levit_deploy_restricted_pickle")


def _sniff(path: Path) -> str:
    """File format from its first bytes, not its name: 'zip' (torch.save), 'pickle', 'safetensors'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); expected a .pth/.bin/.safetensors checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # safetensors: a little-endian u64 header length, then the JSON header; tested before pickle because
    # that length's first byte can be 0x80, pickle's protocol marker
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(
        f"{path}: not a checkpoint (first bytes {head[:8]!r}); expected a torch.save zip or pickle "
        f"(.pth/.bin) or a safetensors file")


def _torch_load(path: Path) -> tuple[object, list[str]]:
    """(object, names read as inert data). Plain tensor files take the weights_only path; a file that
    pickles other objects is read again with the restricted unpickler."""
    data = path.read_bytes()
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), []
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        text = str(e)
        if not ("Weights only load failed" in text or "Unsupported global" in text):
            raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint ({type(e).__name__}: "
                                  f"{text.splitlines()[0] if text else 'no detail'})") from None
    placeholders: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                             pickle_module=_restricted_pickle_module(placeholders))
    except Exception as e:  # noqa: BLE001
        named = f"; it names {', '.join(placeholders)}, none of which was run" if placeholders else ""
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}){named}") from None
    return obj, placeholders


def _describe(value) -> str:
    if isinstance(value, InertObject):
        items = ", ".join(f"{k}={_short(v)}" for k, v in list(value.items())[:6])
        return f"{value.origin} (read as data{': ' + items if items else ''})"
    if isinstance(value, dict):
        tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        if tensors and tensors == len(value):
            return f"state dict ({tensors} tensors)"
        return f"dict ({len(value)} entries: {', '.join(map(str, list(value)[:5]))})"
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    return _short(value)


def _short(value) -> str:
    if isinstance(value, InertObject) and not len(value):
        return f"<{value.origin}>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in list(value.items())[:4]) + ("…}" if len(value) > 4 else "}")
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


@dataclass
class RawCheckpoint:
    """A checkpoint file as read: its state dict, which entry held it, and what else the file holds."""

    tensors: dict[str, torch.Tensor]
    file_format: str
    entry: str | None
    entries: dict[str, str]
    notes: list[str]


def read_checkpoint(path: str | Path, entry: str | None = None) -> RawCheckpoint:
    """The state dict in a checkpoint file (``entry``, or the first of 'model', 'state_dict',
    'model_state_dict', or the file itself), with every other top-level entry described, not used."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass the checkpoint file or use load() on the folder")
    try:
        fmt = _sniff(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    placeholders: list[str] = []
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            obj: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    else:
        obj, placeholders = _torch_load(path)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), "
                              f"found {type(obj).__name__}")
    is_state_dict = any(isinstance(v, torch.Tensor) for v in obj.values())
    entries = {} if is_state_dict else {str(k): _describe(v) for k, v in obj.items()}
    if entry is not None:
        if entry not in obj:
            raise CheckpointError(f"{path}: no entry {entry!r}; the file holds {', '.join(map(str, obj))}")
        if obj[entry] is None:
            raise CheckpointError(f"{path}: the entry {entry!r} is None (a model trained without it: "
                                  f"{'no EMA' if 'ema' in entry else 'empty'}); use the default entry instead")
        chosen = entry
    else:
        chosen = next((k for k in STATE_DICT_ENTRIES if isinstance(obj.get(k), dict)), None)
    sd = obj[chosen] if chosen is not None else obj
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: entry {chosen!r} is {type(sd).__name__}, not a state dict")
    unsafe = sorted({v.origin for v in sd.values() if isinstance(v, InertObject)})
    if unsafe:
        raise CheckpointError(
            f"{path}: refused to unpickle {', '.join(unsafe)}: the weights hold objects other than tensors, "
            f"which could run code when loaded; they were read as inert data and nothing ran. Re-save the "
            f"weights with torch.save(model.state_dict()) or as safetensors.")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors (top-level keys: {list(obj)[:8]})")
    notes = []
    for prefix in ("module.module.", "module."):  # an EMA of a DistributedDataParallel model, or DDP
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            notes.append(f"stripped the '{prefix}' prefix (saved from a wrapped model)")
            break
    if placeholders:
        notes.append(f"read as data, not run: {', '.join(sorted(set(placeholders)))}")
    return RawCheckpoint(tensors, fmt, chosen, entries, notes)


def find_weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
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
    from .families import family_of

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
