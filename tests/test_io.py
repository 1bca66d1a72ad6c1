"""Atomic writes: the old file survives any failure, no temporary file is left, a full disk is one clear line."""

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from hkft.errors import HkftError
from hkft.run.files import (
    DiskFullError,
    append_jsonl,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
)


def leftovers(directory: Path) -> list[Path]:
    return sorted(directory.glob(".tmp-*"))


def fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def test_atomic_write_text_creates_and_replaces(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second ✓\n")
    assert path.read_text(encoding="utf-8") == "second ✓\n"
    assert leftovers(path.parent) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    """Temporary files must not leak mkstemp's 0600 mode into the final file."""
    atomic_write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


def test_a_staged_folder_gives_its_files_the_usual_permissions(tmp_path):
    """safetensors writes weights as 0600: an adapter written by a container's root would be unreadable."""
    import torch
    from safetensors.torch import save_file

    with atomic_dir(tmp_path / "adapter") as staging:
        save_file({"a": torch.zeros(2)}, staging / "adapter_model.safetensors")
        (staging / "nested").mkdir()
        (staging / "nested" / "config.json").write_text("{}")
    (tmp_path / "plain.txt").write_text("x")
    usual = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    for name in ("adapter_model.safetensors", "nested/config.json"):
        assert stat.S_IMODE((tmp_path / "adapter" / name).stat().st_mode) == usual, name
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_model.safetensors", "nested"]


def test_atomic_write_json_keeps_key_order_and_indents(tmp_path):
    data = {"zeta": 1, "alpha": [1.5, "é"], "mid": {"b": None, "a": True}}
    atomic_write_json(tmp_path / "d.json", data)
    text = (tmp_path / "d.json").read_text(encoding="utf-8")
    assert json.loads(text) == data
    assert list(json.loads(text)) == ["zeta", "alpha", "mid"]
    assert text == json.dumps(data, indent=2, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("target", ["hkft.run.files.os.replace", "hkft.run.files.os.fsync"])
def test_failure_mid_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, target):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"old": 1})
    monkeypatch.setattr(target, fail_with(errno.EIO))
    with pytest.raises(HkftError) as caught:
        atomic_write_json(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert leftovers(tmp_path) == []
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_interrupt_mid_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    monkeypatch.setattr("hkft.run.files.os.fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_disk_full_is_one_line_and_nothing_overwritten(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    atomic_write_text(path, "old")
    monkeypatch.setattr("hkft.run.files.os.fsync", fail_with(errno.ENOSPC))
    with pytest.raises(DiskFullError) as caught:
        atomic_write_text(path, "new" * 1000)
    message = str(caught.value)
    assert "no space left on the device while writing" in message and str(path) in message
    assert "\n" not in message and caught.value.exit_code == 4
    assert path.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_append_jsonl_writes_one_object_per_line(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    records = [{"step": 1, "loss": 0.5}, {"step": 2, "text": "a\nb ✓"}, {"step": 3, "eval_accuracy": 1.0}]
    for record in records:
        append_jsonl(path, record)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux /dev/full")
def test_append_jsonl_on_a_full_device_is_a_disk_full_error():
    """/dev/full answers every write with ENOSPC: the kernel's own disk-full, no monkeypatching."""
    with pytest.raises(DiskFullError, match="no space left on the device while writing /dev/full"):
        append_jsonl(Path("/dev/full"), {"step": 1})


def test_atomic_dir_appears_only_complete(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".tmp-")
        (staging / "weights.bin").write_bytes(b"abc")
        assert not final.exists()
    assert (final / "weights.bin").read_bytes() == b"abc"
    assert leftovers(tmp_path) == []


def test_atomic_dir_replaces_an_existing_directory_whole(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "stale.bin").write_text("old")
    with atomic_dir(final) as staging:
        (staging / "fresh.bin").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["fresh.bin"]
    assert leftovers(tmp_path) == []


def test_atomic_dir_error_in_body_keeps_the_old_directory(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "model.bin").write_text("old")
    with pytest.raises(RuntimeError, match="save failed"):
        with atomic_dir(final) as staging:
            (staging / "model.bin").write_text("half")
            raise RuntimeError("save failed")
    assert (final / "model.bin").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_dir_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "model.bin").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp-adapter") and Path(dst) == final and (Path(src) / "model.bin").read_text() == "new":
            raise OSError(errno.EXDEV, "cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr("hkft.run.files.os.replace", replace)
    with pytest.raises(HkftError, match="cannot write"):
        with atomic_dir(final) as staging:
            (staging / "model.bin").write_text("new")
    assert (final / "model.bin").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_dir_disk_full_in_body_is_a_disk_full_error(tmp_path):
    final = tmp_path / "merged"
    with pytest.raises(DiskFullError, match="merged"):
        with atomic_dir(final):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not final.exists()
    assert leftovers(tmp_path) == []
