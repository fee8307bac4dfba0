"""Load LeViT checkpoints of any real layout into the reference model, safely.

Reading never executes pickled code (``torch.load(weights_only=True)`` or safetensors). The layout
is detected from key names, the variant, class count and mode (linear or 1x1-conv) from tensor
shapes; every failure raises :class:`CheckpointError` naming the file, what was found and what was
expected. Pretrained weights are downloaded once into a cache and verified by sha256.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import layouts
from .env import cache_dir, sha256_file
from .models import VARIANTS, Levit, LevitConfig, get_config, resolve_variant_name
from .models.levit import attention_bias_idxs

BN_EPS = 1e-5

# Official release files (facebookresearch/LeViT README); the suffix is the sha256 prefix.
PRETRAINED_URLS = {
    "levit_128s": "https://dl.fbaipublicfiles.com/LeViT/LeViT-128S-96703c44.pth",
    "levit_128": "https://dl.fbaipublicfiles.com/LeViT/LeViT-128-b88c2750.pth",
    "levit_192": "https://dl.fbaipublicfiles.com/LeViT/LeViT-192-92712e41.pth",
    "levit_256": "https://dl.fbaipublicfiles.com/LeViT/LeViT-256-13b5763e.pth",
    "levit_384": "https://dl.fbaipublicfiles.com/LeViT/LeViT-384-9bdaf2e2.pth",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says what was found and what was expected."""


class WeightsUnavailable(CheckpointError):
    """Pretrained weights could not be obtained (offline, or the download failed verification)."""


@dataclass
class LoadInfo:
    """What the loader found; kept on the model as ``model.load_info``."""

    source: str
    layout: str
    mode: str = "linear"  # or "conv" (levit_conv_* / levit_c 1x1-conv weights)
    fused: bool = False
    variant: str = ""
    num_classes: int = 0
    distilled: bool = True
    file_format: str = ""
    sha256: str | None = None
    seed: int | None = None  # for random init: reproduces the same weights
    ignored_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Reading files


def _sniff(path: Path) -> str:
    """File format from its first bytes, not its name: 'zip' (torch.save), 'pickle', 'safetensors'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); expected a .pth/.bin/.safetensors checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"{path}: not a checkpoint (first bytes {head[:8]!r}); expected a torch.save zip or pickle "
        f"(.pth/.bin) or a safetensors file")


def _torch_load(path: Path) -> object:
    # argparse.Namespace is harmless data: training checkpoints store their args in one.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
            first = next((line for line in text.splitlines() if "GLOBAL" in line or "global" in line), "")
            raise CheckpointError(
                f"{path}: refused to unpickle: the file holds objects other than tensors and plain "
                f"containers, which could run code when loaded. {first.strip()} "
                f"Re-save the weights with torch.save(model.state_dict()) or as safetensors.") from None
        raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint ({type(e).__name__}: "
                              f"{text.splitlines()[0] if text else 'no detail'})") from None


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Flat tensor dict and file format of a checkpoint file; unwraps {'model': ...} containers."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass the checkpoint file or use load() on the folder")
    try:
        fmt = _sniff(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            obj: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    else:
        obj = _torch_load(path)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), "
                              f"found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors (top-level keys: {list(obj)[:8]})")
    if all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, fmt


def find_weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointError(f"{folder}: no weights file; expected one of {', '.join(WEIGHT_FILES)}, "
                          f"found {found or 'an empty folder'}")


# ---------------------------------------------------------------------------------------------
# Detection


def detect_layout(sd: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(layout, key prefix). The prefix is '' except for Hugging Face's optional 'levit.'."""
    for layout in ("official", "official_fused", "timm"):
        if layouts.SIGNATURES[layout] in sd:
            return layout, ""
    sig = layouts.SIGNATURES["hf"]
    for key in sd:
        if key.endswith(sig):
            return "hf", key[: -len(sig)]
    sample = ", ".join(list(sd)[:4])
    expected = "; ".join(f"{name}: {key}" for name, key in layouts.SIGNATURES.items())
    raise CheckpointError(f"unknown layout: no LeViT stem key found (first keys: {sample}). "
                          f"Expected one of {expected}")


def _hf_key(unit_prefix: str, hf_prefix: str) -> str:
    """Hugging Face keys: 'levit.' is the model prefix, which LevitModel checkpoints do not have."""
    return hf_prefix + unit_prefix[len("levit."):] if unit_prefix.startswith("levit.") else unit_prefix


def _layout_key(unit: layouts.Unit, suffix: str, layout: str, hf_prefix: str) -> str:
    prefix = unit.prefix(layout)
    if layout == "hf":
        prefix = _hf_key(prefix, hf_prefix)
    return f"{prefix}.{suffix}"


def expected_shapes(config: LevitConfig, layout: str, hf_prefix: str = "") -> dict[str, tuple]:
    """Layout key -> shape for a config (linear mode), used to detect variants and explain mismatches."""
    with torch.device("meta"):
        model = Levit(config)
    canonical = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes: dict[str, tuple] = {}
    for unit in layouts.units(config):
        for csuf, lsuf in layouts.unit_suffixes(unit.kind, layout).items():
            key = _layout_key(unit, lsuf, layout, hf_prefix)
            if layout == "official_fused" and unit.kind in ("conv_bn", "linear_bn"):
                wkey = f"{unit.canonical}.{'conv' if unit.kind == 'conv_bn' else 'linear'}.weight"
                shapes[key] = canonical[wkey] if csuf == "weight" else (canonical[wkey][0],)
            else:
                shapes[key] = canonical[f"{unit.canonical}.{csuf}"]
    return shapes


def _head_shape(sd: dict[str, torch.Tensor], layout: str) -> tuple[int, bool]:
    names = {"official": ("head.l.weight", "head_dist.l.weight"),
             "official_fused": ("head.weight", "head_dist.weight"),
             "timm": ("head.linear.weight", "head_dist.linear.weight"),
             "hf": ("classifier.linear.weight", "classifier_distill.linear.weight")}[layout]
    if names[0] not in sd:
        raise CheckpointError(f"{layout} layout without a classification head (no {names[0]!r}); "
                              f"a backbone-only checkpoint cannot be deployed as a classifier")
    return int(sd[names[0]].shape[0]), names[1] in sd


def flatten_conv_mode(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, mode): levit_conv_* checkpoints store block linears as [out, in, 1, 1]; flatten them.

    The stem convolutions are 3x3, so the 1x1 shape alone identifies conv-mode block weights.
    """
    if not any(v.dim() == 4 and v.shape[2:] == (1, 1) for v in sd.values()):
        return sd, "linear"
    return {k: (v.flatten(1) if v.dim() == 4 and v.shape[2:] == (1, 1) else v) for k, v in sd.items()}, "conv"


def _mismatches(sd: dict, expected: dict[str, tuple]) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in sd]
    wrong = [f"{k}: found {tuple(sd[k].shape)}, expected {expected[k]}"
             for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    unexpected = [k for k in sd if k not in expected and not _ignorable(k)]
    return missing, wrong, unexpected


def _ignorable(key: str) -> bool:
    return key.endswith(("attention_bias_idxs", layouts.BN_COUNTER))


def detect(sd: dict[str, torch.Tensor]) -> tuple[str, str, LevitConfig]:
    """(layout, hf_prefix, config) of a linear-mode state dict; raises CheckpointError if nothing fits."""
    layout, hf_prefix = detect_layout(sd)
    num_classes, distilled = _head_shape(sd, layout)
    scored = []
    for name in VARIANTS:
        config = get_config(name, num_classes, distilled)
        missing, wrong, unexpected = _mismatches(sd, expected_shapes(config, layout, hf_prefix))
        if not (missing or wrong or unexpected):
            return layout, hf_prefix, config
        scored.append((len(missing) + len(wrong) + len(unexpected), name, missing, wrong, unexpected))
    _, name, missing, wrong, unexpected = min(scored)
    problems = ([f"shape {w}" for w in wrong[:3]] + [f"missing {k}" for k in missing[:3]]
                + [f"unexpected {k}" for k in unexpected[:3]])
    raise CheckpointError(
        f"{layout} layout ({num_classes} classes) but the tensors match no LeViT variant; "
        f"closest is {name} ({len(missing)} missing, {len(wrong)} wrong shape, {len(unexpected)} unexpected "
        f"keys). First mismatches: {'; '.join(problems[:5])}")


# ---------------------------------------------------------------------------------------------
# Conversion into the canonical model


def _identity_bn(bias: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """BatchNorm that only adds ``bias``: how a fused official checkpoint maps onto the reference."""
    n = bias.shape[0]
    return {f"{prefix}.bn.weight": torch.ones(n), f"{prefix}.bn.bias": bias.clone(),
            f"{prefix}.bn.running_mean": torch.zeros(n),
            f"{prefix}.bn.running_var": torch.full((n,), 1.0 - BN_EPS)}


def to_canonical(sd: dict[str, torch.Tensor], layout: str, config: LevitConfig, hf_prefix: str = "",
                 ) -> dict[str, torch.Tensor]:
    """Rename (and, for fused checkpoints, un-fold) a layout's tensors into our module names."""
    out: dict[str, torch.Tensor] = {}
    for unit in layouts.units(config):
        for csuf, lsuf in layouts.unit_suffixes(unit.kind, layout).items():
            tensor = sd[_layout_key(unit, lsuf, layout, hf_prefix)].float()
            if layout == "official_fused" and unit.kind in ("conv_bn", "linear_bn"):
                inner = "conv" if unit.kind == "conv_bn" else "linear"
                if csuf == "weight":
                    out[f"{unit.canonical}.{inner}.weight"] = tensor
                else:
                    out.update(_identity_bn(tensor, unit.canonical))
            else:
                out[f"{unit.canonical}.{csuf}"] = tensor
        if layout == "official_fused" and unit.kind == "head":  # BN already folded into the linear
            out.update(_identity_bn(torch.zeros(out[f"{unit.canonical}.linear.weight"].shape[1]), unit.canonical))
        if unit.kind != "bias_table":
            out[f"{unit.canonical}.bn.{layouts.BN_COUNTER}"] = torch.tensor(0, dtype=torch.long)
    return out


def from_canonical(canonical: dict[str, torch.Tensor], layout: str, config: LevitConfig,
                   mode: str = "linear") -> dict[str, torch.Tensor]:
    """Our state dict written in another layout (unfused layouts only), as that layout's own code saves it."""
    if layout not in ("official", "timm", "hf"):
        raise ValueError(f"cannot write layout {layout!r}; choose official, timm or hf")
    out: dict[str, torch.Tensor] = {}
    for unit in layouts.units(config):
        for csuf, lsuf in layouts.unit_suffixes(unit.kind, layout).items():
            tensor = canonical[f"{unit.canonical}.{csuf}"]
            if mode == "conv" and unit.kind == "linear_bn" and csuf == "linear.weight":
                tensor = tensor[:, :, None, None]
            out[_layout_key(unit, lsuf, layout, "levit.")] = tensor.clone()
        bn = layouts.bn_prefix(unit.kind, layout)
        if bn is not None:
            out[_layout_key(unit, f"{bn}.{layouts.BN_COUNTER}", layout, "levit.")] = torch.tensor(0)
        if layout == "official" and unit.kind == "bias_table":
            stride = 2 if ".downsample." in unit.canonical else 1
            s = int(unit.canonical.split(".")[1])
            res = config.resolutions[s - 1] if stride == 2 else config.resolutions[s]
            out[f"{unit.official}.attention_bias_idxs"] = attention_bias_idxs(res, stride)
    return out


def _check_bias_idxs(sd: dict[str, torch.Tensor], model: Levit, layout: str, hf_prefix: str) -> None:
    """Stored index tables must equal ours: a mismatch means another input resolution."""
    mods = dict(model.named_modules())
    for unit in layouts.units(model.config):
        if unit.kind != "bias_table":
            continue
        key = _layout_key(unit, "attention_bias_idxs", layout, hf_prefix)
        if key in sd and not torch.equal(sd[key].long(), mods[unit.canonical].attention_bias_idxs):
            raise CheckpointError(f"{key}: the stored attention-bias index table differs from the one for "
                                  f"{model.config.img_size}x{model.config.img_size} input; this checkpoint "
                                  f"was built for another resolution, which levit-deploy does not support")


def build_from_state_dict(sd: dict[str, torch.Tensor], source: str, file_format: str = "",
                          expect_variant: str | None = None, num_classes: int | None = None) -> Levit:
    """Detect, check and load a state dict into a fresh eval-mode reference model."""
    sd, mode = flatten_conv_mode(sd)
    try:
        layout, hf_prefix, config = detect(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if expect_variant is not None and config.name != expect_variant:
        raise CheckpointError(f"{source}: you asked for {expect_variant} but the checkpoint is a "
                              f"{config.name} ({layout} layout): its tensor shapes fit {config.name} only")
    if num_classes is not None and num_classes != config.num_classes:
        raise CheckpointError(f"{source}: the checkpoint's head has {config.num_classes} classes, you asked "
                              f"for {num_classes}; re-train or fine-tune the head first")
    model = Levit(config)
    _check_bias_idxs(sd, model, layout, hf_prefix)
    canonical = to_canonical(sd, layout, config, hf_prefix)
    model.load_state_dict(canonical, strict=True)
    model.eval()
    ignored = sorted(k for k in sd if k.endswith("attention_bias_idxs"))
    info = LoadInfo(source=source, layout=layout, mode=mode, fused=layout == "official_fused",
                    variant=config.name, num_classes=config.num_classes, distilled=config.distilled,
                    file_format=file_format, ignored_keys=ignored)
    if ignored:
        info.notes.append(f"{len(ignored)} attention_bias_idxs tables checked and recomputed, not loaded")
    if layout == "official_fused":
        info.notes.append("already-fused checkpoint: BatchNorm set to identity-plus-bias")
    model.load_info = info
    return model


# ---------------------------------------------------------------------------------------------
# Pretrained weights


def _hash_prefix(url: str) -> str:
    return url.rsplit("-", 1)[-1].split(".")[0]


def download_pretrained(variant: str, progress: bool = True) -> Path:
    """Path of the verified official checkpoint for a variant, downloading it on first use."""
    url = PRETRAINED_URLS[variant]
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
            f"checkpoint (official .pth, timm or Hugging Face), or --init random for untrained weights") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights, BatchNorm statistics and attention biases, in place.

    Default init leaves BN at identity and biases at zero, which hides fusion and layout bugs, so
    ``--init random`` and the tests use this instead. It goes by module type and parameter name,
    so it randomises any LeViT implementation alike.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor) -> torch.Tensor:
        return torch.rand(t.shape, generator=gen)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(rand(module.weight) + 0.25)
                module.bias.copy_(randn(module.bias) * 0.1)
                module.running_mean.copy_(randn(module.running_mean) * 0.1)
                module.running_var.copy_(rand(module.running_var) * 1.5 + 0.5)
                continue
            for name, p in module.named_parameters(recurse=False):
                if name == "attention_biases":
                    p.copy_(randn(p) * 2.0)
                elif name == "bias":
                    p.copy_(randn(p) * 0.1)
                else:
                    p.copy_(randn(p) * p[0].numel() ** -0.5)
    return model


def load(name_or_path: str | os.PathLike, weights: str | os.PathLike | None = None,
         num_classes: int | None = None, init: str = "pretrained", seed: int = 0) -> Levit:
    """An eval-mode reference LeViT whose forward returns logits; ``model.load_info`` says what was found.

    name_or_path: a variant name (``levit_128s``…), a checkpoint file, or a folder (Hugging Face or timm
    hub layout: config.json + model.safetensors or pytorch_model.bin).
    weights: a checkpoint for a named variant (checked to be that variant).
    init: for a variant name without weights, "pretrained" downloads the official release,
    "random" gives seeded random weights (see :func:`randomize_`).
    """
    text = os.fspath(name_or_path)
    variant = resolve_variant_name(text) if not Path(text).exists() else None
    if variant is None:
        path = Path(text)
        if not path.exists():
            raise CheckpointError(f"{text}: no such file or folder, and not a variant name "
                                  f"(known: {', '.join(VARIANTS)})")
        if weights is not None:
            raise CheckpointError(f"{text}: a checkpoint path already holds weights; --weights is only "
                                  f"for variant names")
        return _load_path(path, None, num_classes)
    if weights is not None:
        return _load_path(Path(weights), variant, num_classes)
    if init == "random":
        model = randomize_(Levit(get_config(variant, num_classes)), seed).eval()
        model.load_info = LoadInfo(source=f"random init (seed {seed})", layout="none", variant=variant, seed=seed,
                                   num_classes=model.config.num_classes, distilled=model.config.distilled)
        return model
    if init != "pretrained":
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    return _load_path(download_pretrained(variant), variant, num_classes)


def _load_path(path: Path, variant: str | None, num_classes: int | None) -> Levit:
    if path.is_dir():  # a Hugging Face or timm hub folder: the weights file decides, not config.json
        path = find_weights_file(path)
    sd, fmt = read_state_dict(path)
    model = build_from_state_dict(sd, str(path), fmt, variant, num_classes)
    model.load_info.sha256 = sha256_file(path)
    return model
