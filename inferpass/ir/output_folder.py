"""Where a saved folder may go, and writing it atomically: all or nothing, never over what is not ours.

``check_output`` answers before any work whether a folder can be written there;
``atomic_directory`` writes into a temporary sibling (named after this process, so a
later save can tell a killed run's leftovers from a live one's), fsyncs it and renames it
into place. Every OS failure becomes an ``OutputError`` that names the path, what the
errno means and, for a full disk, the space needed. Folders and files follow the umask.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from inferpass.errors import OutputError

MANIFEST = "manifest.json"
FORMAT_PREFIX = "inferpass-program/"
_OS_ERROR = re.compile(r"os error (\d+)")
_WHY = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EBUSY: "device or resource busy (a mount point, or a folder in use)",
}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _is_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def is_inferpass_folder(path: Path) -> bool:
    """True if ``path`` holds a manifest written by ``save_program`` (any format version)."""
    try:
        return str(json.loads((path / MANIFEST).read_text()).get("format", "")).startswith(FORMAT_PREFIX)
    except (OSError, ValueError, AttributeError):
        return False


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_output(out: str | Path, *, overwrite: bool, sources: Sequence[str | Path] = (),
                 expected_bytes: int = 0) -> None:
    """Raise ``OutputError`` unless a folder can be written at ``out``.

    Refused: ``out`` is, contains or lies inside one of ``sources`` (the inputs) or is or
    contains the current directory; it exists and ``overwrite`` is false; it exists and is
    neither empty nor an inferpass output folder (``overwrite`` never replaces anything
    else); its nearest existing parent is not a writable folder; that file system has
    less than ``expected_bytes`` free.
    """
    out = Path(out).absolute()
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_inside(cwd, real):
        raise OutputError(f"output folder {out} is the current directory or contains it; "
                          f"write to a new folder instead (e.g. {cwd / 'model.inferpass'})")
    for source in sources:
        source = Path(source).resolve()
        if _is_inside(real, source) or _is_inside(source, real):
            raise OutputError(f"output folder {out} would overwrite the input {source} (it is, contains or lies "
                              "inside it); choose a folder outside the input")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"output path {out} exists and is not a folder; choose another path")
        if not overwrite:
            raise OutputError(f"output folder {out} already exists (use --force / overwrite=True to replace it)")
        if any(out.iterdir()) and not is_inferpass_folder(out):
            raise OutputError(f"output folder {out} is not an inferpass output (no inferpass manifest.json) and is "
                              "not empty; refusing to replace it. Only folders written by inferpass are replaced: "
                              "choose another folder or remove this one yourself")
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "permission denied"
        raise OutputError(f"cannot write {out}: {parent} is not writable ({why})")
    free = shutil.disk_usage(parent).free
    if expected_bytes > free:
        raise OutputError(f"cannot write {out}: it needs about {_mib(expected_bytes)} and only {_mib(free)} is free "
                          f"on the file system of {parent}; free some space or choose another location")


def output_error(exc: BaseException, target: Path, expected_bytes: int = 0) -> OutputError:
    """An ``OutputError`` for a failed write of ``target`` (an ``OSError`` or a writer's error naming an os error)."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (match := _OS_ERROR.search(str(exc))):
        code = int(match.group(1))
    why = _WHY.get(code) or (os.strerror(code) if code else str(exc))
    message = f"cannot write {target}: {why}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(_existing_ancestor(target.parent)).free
        message += f" (it needs about {_mib(expected_bytes)}, {_mib(free)} free)" if expected_bytes else \
            f" ({_mib(free)} free)"
    return OutputError(message + "; nothing was written")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` folders beside ``target`` left by processes no longer running."""
    removed = []
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name[len(f".{target.name}.{kind}-"):].split("-")[0]
            if path.is_dir() and not path.is_symlink() and not (pid.isdigit() and _pid_alive(int(pid))):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish_tree(root: Path) -> None:
    """Give every file the umask's permissions (some writers create 0600 files) and fsync files and folders."""
    mode = 0o666 & ~_umask()
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False, expected_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target`` that replaces ``target`` only if the block succeeds.

    Checks ``target`` with ``check_output`` first, removes temporaries of earlier killed
    saves, and on any failure removes the temporary folder and raises ``OutputError``
    (for OS errors, and writer errors that name one) or the block's own error.
    """
    target = Path(target).absolute()
    check_output(target, overwrite=overwrite, expected_bytes=expected_bytes)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        tmp = _temp_name(target, "tmp")
        tmp.mkdir()
    except OSError as exc:
        raise output_error(exc, target, expected_bytes) from exc
    try:
        yield tmp
        _finish_tree(tmp)
        if target.exists():
            old = _temp_name(target, "old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old, target)
                raise
            _fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # first, so the error reports the space really free
        if not isinstance(exc, OutputError) and (isinstance(exc, OSError) or _OS_ERROR.search(str(exc))):
            raise output_error(exc, target, expected_bytes) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
