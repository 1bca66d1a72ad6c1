"""Atomic file output: write beside the target under a temporary name, then rename.

A crash (or a full disk) mid-write leaves the previous file intact and no partial file behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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
    return HkftError(f"cannot write {path} ({err.strerror or err})")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except OSError as err:
        Path(temp).unlink(missing_ok=True)
        raise _explain(path, err) from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One JSON object per line; a line is written whole with a single write call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a staging directory that replaces ``final`` only once everything in it is written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + final.name + "-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            retired = final.with_name(f"{TEMP_PREFIX}old-{final.name}-{os.getpid()}")
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise _explain(final, err) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
