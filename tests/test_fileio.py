"""Atomic writes, writable-folder checks, safe names and input checks."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from napari_pathology.fileio import (
    OutputError,
    atomic_path,
    atomic_write,
    ensure_writable_dir,
    keep_aside,
    output_error,
    read_json_file,
    require_finite,
    require_regular_file,
    safe_name,
)


def test_atomic_write_replaces_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "a.csv"
    atomic_write(target, "one\n")
    assert target.read_text() == "one\n"

    def broken(fh):
        fh.write("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken, text=True)
    assert target.read_text() == "one\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]  # no temporary left


def test_atomic_write_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "x.bin", b"123")
        with atomic_path(tmp_path / "y.pt") as tmp:
            tmp.write_bytes(b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "y.pt").stat().st_mode) == 0o644


def test_atomic_path_replaces_folders(tmp_path):
    target = tmp_path / "store.zarr"
    target.mkdir()
    (target / "old").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_readonly_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match=r"cannot write to .*ro: permission denied"):
            ensure_writable_dir(folder)
    finally:
        folder.chmod(0o700)


def test_output_error_names_full_disk(tmp_path):
    error = output_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert str(error) == f"cannot write to {tmp_path}: the disk is full"


def test_ensure_writable_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="it is a file"):
        ensure_writable_dir(tmp_path / "f")
    assert ensure_writable_dir(tmp_path / "new" / "deep").is_dir()


def test_keep_aside_never_overwrites(tmp_path):
    path = tmp_path / "slide.tif.nuclei.csv"
    path.write_text("labels")
    kept = keep_aside(path)
    assert not path.exists() and kept.read_text() == "labels"
    assert kept.name.startswith("slide.tif.nuclei.refused-") and kept.suffix == ".csv"
    path.write_text("second")
    assert keep_aside(path) != kept


@pytest.mark.parametrize("text", ["..", ".", "", "/", "a/../b", "..\\x"])
def test_safe_name_is_one_component(text):
    name = safe_name(text)
    assert name not in (".", "..") and "/" not in name and "\\" not in name and name


def test_require_regular_file_refuses_fifo(tmp_path):
    fifo = tmp_path / "slide.svs"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        require_regular_file(fifo, "slide")
    with pytest.raises(ValueError, match="is a folder"):
        require_regular_file(tmp_path, "slide")
    with pytest.raises(FileNotFoundError):
        require_regular_file(tmp_path / "missing.svs", "slide")


@pytest.mark.parametrize("value", ["nan", float("inf"), "abc", None])
def test_require_finite_refuses(value):
    with pytest.raises(ValueError, match="radius"):
        require_finite(value, "radius")


def test_require_finite_range():
    assert require_finite("2.5", "x", minimum=0) == 2.5
    with pytest.raises(ValueError, match=r"x must be in \(0, inf\)"):
        require_finite(0, "x", minimum=0, inclusive=False)


def test_read_json_file_refuses_hostile_documents(tmp_path):
    deep = tmp_path / "deep.geojson"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json_file(deep, "annotations")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_json_file(latin)
    nan = tmp_path / "nan.json"
    nan.write_text('{"x": NaN}')
    with pytest.raises(ValueError, match="NaN"):
        read_json_file(nan)
    broken = tmp_path / "broken.json"
    broken.write_text('{"x": ')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        read_json_file(broken)
    good = tmp_path / "good.json"
    good.write_text('{"x": [1, 2]}')
    assert read_json_file(good) == {"x": [1, 2]}
