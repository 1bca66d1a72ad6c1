"""Atomic file output: write beside the target under a temporary name, then rename.

A crash (or a full disk) mid-write leaves the previous file intact and no partial file behind.
Temporary names start with ``.tmp-`` and live in the target's directory, so the final rename never
crosses a file system.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hkft.errors import HkftError

TEMP_PREFIX = ".tmp-"


NAME_MAX = 255  # bytes in one file or folder name, on every common Linux and macOS file system
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Errors of the file system the user pointed hkft at, not of hkft: a one-line error, never a traceback.
ENVIRONMENT_ERRNOS = (*DISK_FULL, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)
# Rust libraries (tokenizers' save) raise a plain Exception that carries the OS error only in its text.
_RUST_OS_ERROR = re.compile(r"^(?P<text>.*?) \(os error (?P<errno>\d+)\)$")


class DiskFullError(HkftError):
    exit_code = 4


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, or the one a Rust extension reported as ``... (os error 28)``."""
    if isinstance(err, OSError):
        return err
    match = _RUST_OS_ERROR.match(str(err).strip()) if type(err) is Exception else None
    return OSError(int(match["errno"]), match["text"]) if match else None


def is_disk_full(err: BaseException) -> bool:
    os_error = os_error_in(err)
    return os_error is not None and os_error.errno in DISK_FULL


def environment_error(err: BaseException, path: Path | str | None = None) -> HkftError | None:
    """A one-line error for a full disk, a read-only folder, a name too long ...; None for anything else."""
    os_error = os_error_in(err)
    if os_error is None or os_error.errno not in ENVIRONMENT_ERRNOS:
        return None
    return _explain(Path(path or os_error.filename or "a file"), os_error)


def _explain(path: Path, err: OSError) -> HkftError:
    if err.errno in DISK_FULL:
        return DiskFullError(f"no space left on the device while writing {path}", "free some disk space; nothing was overwritten")
    if err.errno == errno.ENAMETOOLONG:
        return HkftError(f"{path}: a file or folder name in this path is longer than the file system allows "
                         f"({NAME_MAX} bytes)", "shorten it")
    return HkftError(f"cannot write {path} ({err.strerror or err})", "check that the directory exists and is writable")


def check_can_create_dir(path: Path, setting: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written: a name over NAME_MAX bytes,
    one below a regular file, on a read-only file system or without write permission. ``setting`` is
    where the user chose it (``--output-dir``), for the hint."""
    path = Path(path)
    too_long = next((part for part in path.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if too_long:
        raise HkftError(f"{setting} {path}: a folder name of {len(os.fsencode(too_long))} bytes, over the file "
                        f"system's limit of {NAME_MAX}", f"choose a shorter {setting}")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise HkftError(f"{setting} {path}: {existing} is a file, so no folder can be created in it",
                        f"choose another {setting}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HkftError(f"{setting} {path}: {existing} is not writable (a read-only file system or no permission)",
                        f"choose another {setting}, or make {existing} writable")


def _temp_beside(path: Path) -> Path:
    """A fresh name in the same directory (created by the caller, so the umask applies, unlike mkstemp's 0600)."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    temp = _temp_beside(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temp.open("xb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise _explain(path, err) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    """One JSON object per line, written whole with a single write and flushed, so readers never see half a line."""
    path = Path(path)
    line = json.dumps(obj, ensure_ascii=False, default=str) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as stream:
            stream.write(line)
            stream.flush()
    except OSError as err:
        raise _explain(path, err) from None


@contextmanager
def atomic_dir(final: Path, keep: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a staging directory that replaces ``final`` only once everything in it is written.
    The entries of the old ``final`` named in ``keep`` (and not written anew) move into the new one."""
    final = Path(final)
    staging = _temp_beside(final)
    try:
        staging.mkdir(parents=True)
        yield staging
        default_file_modes(staging)
        with _signals_deferred():
            _swap_in(staging, final, keep)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        os_error = os_error_in(err)
        if os_error is None:
            raise
        raise _explain(final, os_error) from None


def default_file_modes(folder: Path) -> None:
    """Give every file the mode a new file gets here (0644 under the usual umask). safetensors 0.8
    writes weights as 0600, which the host user cannot read when a container wrote them as root."""
    probe = folder / ".hkft-mode-probe"
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def _swap_in(staging: Path, final: Path, keep: Sequence[str] = ()) -> None:
    """Two renames when ``final`` exists; if the second fails the old ``final`` is put back."""
    if not final.exists():
        os.replace(staging, final)
        return
    kept = [name for name in keep if (final / name).exists() and not (staging / name).exists()]
    for name in kept:
        os.replace(final / name, staging / name)
    retired = _temp_beside(final)
    os.replace(final, retired)
    try:
        os.replace(staging, final)
    except OSError:
        os.replace(retired, final)
        for name in kept:
            os.replace(staging / name, final / name)
        raise
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM between the renames of a swap would leave neither the old folder nor the
    new one in place: the signal is held for the microseconds they take (POSIX main thread)."""
    blockable = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if not blockable:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
