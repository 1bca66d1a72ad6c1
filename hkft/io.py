"""Atomic file output: write beside the target under a temporary name, then rename.

A crash (or a full disk) mid-write leaves the previous file intact and no partial file behind.
Temporary names start with ``.tmp-`` and live in the target's directory, so the final rename never
crosses a file system.
"""

from __future__ import annotations

import errno
import json
import os
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


class DiskFullError(HkftError):
    exit_code = 4


def _explain(path: Path, err: OSError) -> HkftError:
    if err.errno == errno.ENOSPC:
        return DiskFullError(f"no space left on the device while writing {path}", "free some disk space; nothing was overwritten")
    return HkftError(f"cannot write {path} ({err.strerror or err})", "check that the directory exists and is writable")


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
        _default_file_modes(staging)
        with _signals_deferred():
            _swap_in(staging, final, keep)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise _explain(final, err) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _default_file_modes(folder: Path) -> None:
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
