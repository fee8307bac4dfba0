"""An artifact folder on disk: staging, atomic publishing, the manifest, containment and verification.

An artifact is a folder holding the exported file(s) and ``manifest.json``. The manifest says exactly
what the artifact is: its files and their sha256, the checkpoint it came from, versions, export
options, the fusion steps, the preprocessing to feed it, its parity report and the machine it was
checked on. An export builds a complete new folder beside the target and swaps it in with one rename
only after the parity gate passes, so readers see the old artifact or the new one, never a mix, and a
failed or killed export leaves the previous artifact as it was. A lock on the folder refuses a second
concurrent export into it. Readers trust nothing in a manifest: every name it lists must be a plain
path inside the folder, every file the runtime opens must be hashed, and every hash must match.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from .env import file_mode, sha256_file
from .manifest import FORMAT_VERSION, MANIFEST_NAME, ManifestError, validate

__all__ = ["Artifact", "ManifestError", "MANIFEST_NAME", "FORMAT_VERSION", "is_artifact",
           "hash_tree", "export_lock", "staging", "publish", "read_manifest", "verify_artifact", "contained"]

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
FAILED_REPORT = "parity-failed-{target}.json"  # what a refused export leaves beside (or in place of) an artifact
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass
class Artifact:
    folder: Path
    path: Path
    manifest: dict

    @property
    def parity(self) -> dict:
        return self.manifest["parity"]


def is_artifact(path: str | Path) -> bool:
    """True for a folder written by ``export`` (it holds a manifest.json)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def hash_tree(root: Path, rel: str) -> dict[str, str]:
    """sha256 of a file, or of every file inside a package folder (CoreML .mlpackage)."""
    target = root / rel
    if target.is_file():
        return {rel: sha256_file(target)}
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(target.rglob("*")) if p.is_file()}


@contextmanager
def export_lock(out_dir: Path, wait: bool = False) -> Iterator[Path]:
    """Hold the export lock of ``out_dir`` (created if missing): a second export into it is refused in one line
    (``wait``: waits instead, as the export cache does). Stale staging folders of killed exports are removed.

    The lock is on the folder itself, and a publish swaps the folder, so the lock is retaken until it is held on
    the folder that is there now. The folder is removed again if this export created it and left it empty."""
    out_dir = Path(os.path.abspath(out_dir))
    created = not out_dir.exists()
    while True:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
        except NotADirectoryError:
            raise ManifestError(f"{out_dir}: exists and is not a folder; choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise ManifestError(f"{out_dir}: another export is writing into this folder; wait for it or choose "
                                f"another --out") from None
        if _same_inode(fd, out_dir):
            break
        os.close(fd)  # the folder was swapped while we waited: lock the one that is there now
    try:
        _remove_stale(out_dir)
        yield out_dir
    finally:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        os.close(fd)


def _same_inode(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _remove_stale(out_dir: Path) -> None:
    """Staging folders of this ``out_dir`` left by exports that were killed (we hold its lock: none is live)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


def check_out_dir(out_dir: Path) -> None:
    """Refuse to publish over a folder that holds anything but an earlier artifact (and refusal reports):
    publishing replaces the whole folder."""
    if not out_dir.is_dir():
        return
    keep = {MANIFEST_NAME}
    try:
        manifest, _ = read_manifest(out_dir)
        keep |= set(manifest["artifact"]["files"])
    except ManifestError:
        pass
    foreign = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*")
                     if not p.is_dir() and p.relative_to(out_dir).as_posix() not in keep
                     and not (p.parent == out_dir and p.match(FAILED_REPORT.format(target="*"))))
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ManifestError(f"{out_dir}: holds files that are not part of an artifact ({listed}); an export replaces "
                            f"the whole folder, so export into a new or empty folder or an earlier artifact's own")


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden staging folder beside ``out_dir`` (same file system, so it can be swapped in); removed afterwards
    (after a publish it holds the previous artifact)."""
    folder = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.staging-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(files: list[str], folder: Path, out_dir: Path, manifest: dict) -> None:
    """Make the staging ``folder`` the artifact (``files`` only, one mode, the manifest) and swap it in for
    ``out_dir`` in one rename; the previous content ends up in ``folder`` and goes with it."""
    mode = file_mode()
    names = {PurePosixPath(n).parts[0] for n in files}
    for entry in folder.iterdir():
        if entry.name not in names:  # converter scratch (an intermediate ONNX, ...)
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for path in folder.rglob("*"):
        os.chmod(path, mode | 0o111 if path.is_dir() else mode)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.chmod(folder / MANIFEST_NAME, mode)
    os.chmod(folder, mode | 0o111)
    _fsync_tree(folder)
    _exchange(folder, out_dir)


def _fsync_tree(folder: Path) -> None:
    """Flush the new artifact's files before it becomes visible, so a crash cannot publish empty files."""
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(new: Path, target: Path) -> None:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); elsewhere, the old folder is moved aside
    and the new one renamed into place, the old one restored if that fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and target.exists():
        if renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) == 0:
            return
        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(ctypes.get_errno(), f"cannot publish the artifact into {target}",
                          str(target))
    aside = new.with_name(new.name + "-previous")
    if target.exists():
        os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        if aside.exists():
            os.replace(aside, target)
        raise
    if aside.exists():
        os.replace(aside, new)  # the caller removes ``new``: the previous content goes with it


def read_manifest(path: str | Path) -> tuple[dict, Path]:
    """(manifest, folder) for an artifact folder, a manifest file, or a file inside an artifact folder; the
    manifest is checked against the schema (:mod:`levit_deploy.manifest`)."""
    path = Path(path)
    mpath = path / MANIFEST_NAME if path.is_dir() else path if path.name == MANIFEST_NAME \
        else path.parent / MANIFEST_NAME
    if not mpath.is_file():
        raise ManifestError(f"{path}: no {MANIFEST_NAME} found at {mpath}")
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{mpath}: {mpath.stat().st_size:,} bytes; a manifest is at most "
                                f"{MAX_MANIFEST_BYTES:,}")
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ManifestError(f"{mpath}: unreadable manifest ({type(e).__name__}: {str(e)[:200]})") from None
    return validate(manifest, mpath), mpath.parent


def contained(folder: Path, name: str) -> Path:
    """``folder / name`` if ``name`` is a plain relative path that stays inside ``folder`` once every symlink is
    resolved; ManifestError otherwise."""
    where = folder / MANIFEST_NAME
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or name.startswith("/") or "\\" in name or "\x00" in name or any(p in ("..", ".") for p in parts):
        raise ManifestError(f"{where}: {name!r} is not a plain relative path inside the artifact folder")
    path = folder / name
    real, root = path.resolve(), folder.resolve()
    if not real.is_relative_to(root):
        raise ManifestError(f"{where}: {name!r} leads outside the artifact folder (to {real})")
    return path


def verify_artifact(manifest: dict, folder: Path, companions: tuple[str, ...] = ()) -> Path:
    """Path of the artifact's main file after checking that every listed file lies inside ``folder``, is a
    regular file and matches its sha256, and that every file the runtime opens is listed: the main file (every
    file of a package folder) and its ``companions`` (suffixes of files opened beside it, e.g. OpenVINO's .bin)."""
    files = manifest["artifact"]["files"]
    for name, expected in files.items():
        f = contained(folder, name)
        try:
            is_file = stat.S_ISREG(os.stat(f).st_mode)
        except FileNotFoundError:
            raise ManifestError(f"{f}: listed in the manifest but missing") from None
        if not is_file:
            raise ManifestError(f"{f}: listed in the manifest but not a regular file")
        actual = sha256_file(f)
        if actual != expected:
            raise ManifestError(f"{f}: sha256 {actual[:16]}… does not match the manifest's {expected[:16]}…; "
                                f"the artifact was modified or replaced after export. Re-export it.")
    main = contained(folder, manifest["artifact"]["file"])
    opened = [main.relative_to(folder).as_posix()] if not main.is_dir() else \
        [p.relative_to(folder).as_posix() for p in main.rglob("*") if not p.is_dir()]
    opened += [main.with_suffix(s).relative_to(folder).as_posix() for s in companions]
    unlisted = [name for name in opened if name not in files]
    if not opened or unlisted:
        what = unlisted[0] if unlisted else manifest["artifact"]["file"]
        raise ManifestError(f"{folder / MANIFEST_NAME}: the runtime opens {what!r}, which the manifest does not "
                            f"hash; the artifact cannot be verified. Re-export it.")
    return main
