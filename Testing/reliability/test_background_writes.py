"""The result files are written on background threads: a write that fails there fails the run like a full disk
on the main thread, and the folder keeps the previous results."""

import errno

import pytest

from drgs_core import pipeline
from drgs_core.errors import DRGSInputError
from drgs_core.pipeline import ReconstructConfig, run_reconstruction

from .conftest import copy_run, request, result_files


def test_a_failed_background_write_fails_the_run_and_keeps_the_previous_results(tiny_case, finished_run,
                                                                                tmp_path, monkeypatch):
    out = copy_run(finished_run, tmp_path / "run")
    before = result_files(out)
    real = pipeline.write_stack
    calls = []

    def write_stack(path, *args, **kwargs):
        calls.append(path.name)
        if path.name == "cine.nii.gz":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "write_stack", write_stack)
    with pytest.raises(DRGSInputError, match="disk is full") as exc:
        run_reconstruction(ReconstructConfig(**request(tiny_case, out, seed=1, iterations=10)))
    assert "previous results" in str(exc.value)
    assert sorted(calls) == ["cine.nii.gz", "renders.nii.gz"]  # it did run on the writer threads
    assert result_files(out) == before
    assert not list(out.rglob(".tmp-*")) and not list(out.glob(".staging-*"))
