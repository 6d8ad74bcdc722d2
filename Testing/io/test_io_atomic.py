"""Atomic writes: a failure mid-write leaves the old file intact and no temporary file behind."""

import os

import numpy as np
import pytest

from drgs_core.io import atomic_path, read_volume, write_case, write_volume
from drgs_core.io import volumes as volumes_module


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_success_replaces(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith("out.txt") and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new"
    assert _listing(tmp_path) == ["out.txt"]


def test_failure_mid_write_keeps_old_file(tmp_path):
    target = tmp_path / "vol.nii.gz"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old content"
    assert _listing(tmp_path) == ["vol.nii.gz"]


def test_failure_without_old_file_and_missing_output(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "sub" / "a.nrrd") as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert _listing(tmp_path / "sub") == []
    with pytest.raises(FileNotFoundError, match="no file"):
        with atomic_path(tmp_path / "b.txt"):
            pass  # the writer forgot to write
    assert _listing(tmp_path) == ["sub"]


def test_writer_crash_inside_library(grid, tmp_path, monkeypatch):
    """A real writer (nibabel) that dies after writing part of the file."""
    path = write_volume(tmp_path / "v.nii.gz", np.ones(grid.resolution), grid)
    before = path.read_bytes()

    def broken(tmp, arr, grid, label):
        with open(tmp, "wb") as fh:
            fh.write(b"\x1f\x8b partial")
        raise OSError("simulated crash")

    monkeypatch.setattr(volumes_module, "_write_nifti", broken)
    with pytest.raises(OSError, match="simulated crash"):
        write_volume(path, np.zeros(grid.resolution), grid)
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["v.nii.gz"]
    np.testing.assert_array_equal(read_volume(path)[0], 1.0)


def test_detached_nrrd_failure_leaves_nothing(grid, tmp_path, monkeypatch):
    import nrrd

    def broken(*args, **kwargs):
        raise OSError("simulated crash")

    write_volume(tmp_path / "v.nhdr", np.ones(grid.resolution), grid)
    before = {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)}
    monkeypatch.setattr(nrrd, "write", broken)
    with pytest.raises(OSError):
        write_volume(tmp_path / "v.nhdr", np.zeros(grid.resolution), grid)
    assert {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)} == before


def test_write_case_leaves_no_temp_files(small_case, tmp_path):
    write_case(small_case, tmp_path)
    write_case(small_case, tmp_path)  # overwrite
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
