"""Fast writing stays correct: the multi-threaded gzip stream is an ordinary gzip file, background writes report
their failures, and the 4D sequence reads back the same from any memory layout."""

import errno
import gzip
import io
import threading
import time
import zlib

import nrrd
import numpy as np
import pytest

from drgs_core.geometry import VolumeGrid
from drgs_core.io import read_sequence_nrrd, write_sequence_nrrd
from drgs_core.io import gzip_parallel
from drgs_core.io.atomic import BackgroundWrites, WriteVerificationError


@pytest.mark.parametrize("size", [0, 1, 1000, 3 * 4096 + 17])
@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_gzip_is_one_valid_stream(monkeypatch, size, threads):
    monkeypatch.setattr(gzip_parallel, "BLOCK", 4096)  # many blocks on small data
    data = np.random.default_rng(size).integers(0, 4, size, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    assert gzip_parallel.write_gzip(buf, data, threads=threads) == size
    blob = buf.getvalue()
    assert gzip.decompress(blob) == data  # checks the CRC and length trailer
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one member: nothing follows the end of the stream
    assert d.decompress(blob) == data and d.eof and d.unused_data == b""


def test_a_corrupt_parallel_gzip_stream_is_detected(monkeypatch):
    monkeypatch.setattr(gzip_parallel, "BLOCK", 4096)
    data = np.arange(20000, dtype=np.float32).tobytes()
    buf = io.BytesIO()
    gzip_parallel.write_gzip(buf, data)
    blob = bytearray(buf.getvalue())
    blob[-8] ^= 1  # the CRC
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(bytes(blob))


def test_background_writes_raise_the_first_failure_after_all_finished():
    done = []

    def slow(name):
        time.sleep(0.2)
        done.append(name)

    def full(name):
        raise OSError(errno.ENOSPC, "No space left on device", name)

    with pytest.raises(OSError) as exc:
        with BackgroundWrites(workers=3) as writes:
            writes.submit(slow, "a")
            writes.submit(full, "b")
            writes.submit(slow, "c")
    assert exc.value.errno == errno.ENOSPC and sorted(done) == ["a", "c"]


def test_leaving_on_an_error_waits_for_running_writes_and_cancels_the_rest():
    started, finished = [], []
    gate = threading.Event()

    def job(k):
        started.append(k)
        gate.wait(5)
        finished.append(k)

    with pytest.raises(KeyError):
        with BackgroundWrites(workers=1) as writes:
            for k in range(3):
                writes.submit(job, k)
            threading.Timer(0.2, gate.set).start()
            raise KeyError("the main thread failed")
    assert finished == started == [0]  # the running write finished before the block was left; others never ran


def test_a_verification_failure_in_the_background_is_raised_by_wait():
    writes = BackgroundWrites()
    writes.submit(lambda: (_ for _ in ()).throw(WriteVerificationError("x.nii.gz: cut off")))
    with pytest.raises(WriteVerificationError, match="cut off"):
        writes.wait()
    writes.wait()  # nothing left
    writes.__exit__(None, None, None)


@pytest.mark.parametrize("order", ["C", "F"])
def test_sequence_reads_back_identically_from_either_layout(tmp_path, order):
    grid = VolumeGrid((7, 5, 3), (0.5, 0.75, 1.25))
    rng = np.random.default_rng(2)
    vols = rng.random((4, 7, 5, 3)).astype(np.float32) * (rng.random((4, 7, 5, 3)) > 0.7)
    path = write_sequence_nrrd(tmp_path / "v.seq.nrrd", np.asarray(vols, order=order), grid, [0, 0.25, 0.5, 0.75])
    data, header = nrrd.read(str(path))
    assert header["encoding"] == "gzip" and np.array_equal(data, vols)
    back, info, times = read_sequence_nrrd(path)
    assert np.array_equal(back, vols) and info.grid == grid and np.allclose(times, [0, 0.25, 0.5, 0.75])
    import SimpleITK as sitk  # ITK's NRRD reader too (3D Slicer's)

    img = sitk.ReadImage(str(path))
    assert img.GetSize() == (7, 5, 3) and img.GetNumberOfComponentsPerPixel() == 4
    assert np.array_equal(sitk.GetArrayFromImage(img), vols.transpose(3, 2, 1, 0))


def test_a_cut_off_sequence_is_not_moved_into_place(tmp_path, monkeypatch):
    grid = VolumeGrid((6, 6, 6), (1.0, 1.0, 1.0))
    path = tmp_path / "v.seq.nrrd"
    path.write_bytes(b"old")
    real = gzip_parallel.write_gzip

    def cut(fh, data, **kw):
        real(fh, data, **kw)
        fh.truncate(fh.tell() - 3)  # as a full disk would leave it

    monkeypatch.setattr("drgs_core.io.volumes.write_gzip", cut)
    with pytest.raises(WriteVerificationError):
        write_sequence_nrrd(path, np.ones((2, 6, 6, 6), np.float32), grid, [0, 0.5])
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["v.seq.nrrd"]


def test_stack_nii_gz_holds_exactly_itks_nifti(tmp_path):
    """The parallel-gzip path stores the very bytes SimpleITK writes for a .nii (header included)."""
    import SimpleITK as sitk

    from drgs_core.io import write_stack

    stack = np.random.default_rng(3).random((5, 9, 11)).astype(np.float32)
    path = write_stack(tmp_path / "r.nii.gz", stack, (0.8, 0.6))
    img = sitk.GetImageFromArray(stack)
    img.SetSpacing((0.8, 0.6, 1.0))
    img.SetOrigin((-(11 - 1) / 2 * 0.8, -(9 - 1) / 2 * 0.6, 0.0))
    sitk.WriteImage(img, str(tmp_path / "ref.nii"), False)
    assert gzip.decompress(path.read_bytes()) == (tmp_path / "ref.nii").read_bytes()
    back = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(back), stack)
    assert np.allclose(back.GetSpacing(), (0.8, 0.6, 1.0)) and np.allclose(back.GetOrigin(), img.GetOrigin())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.nii.gz", "ref.nii"]  # no temporary .nii left


def test_volume_nii_gz_holds_exactly_nibabels_nifti(tmp_path):
    import nibabel as nib

    from drgs_core.io import read_volume, write_volume
    from drgs_core.io.volumes import nifti_affine

    grid = VolumeGrid((6, 5, 4), (0.5, 0.75, 1.25))
    vol = np.random.default_rng(4).random(grid.resolution).astype(np.float32)
    path = write_volume(tmp_path / "v.nii.gz", vol, grid)
    write_volume(tmp_path / "v.nii", vol, grid)
    assert gzip.decompress(path.read_bytes()) == (tmp_path / "v.nii").read_bytes()
    img = nib.load(str(path))
    assert np.array_equal(np.asanyarray(img.dataobj), vol) and np.allclose(img.affine, nifti_affine(grid))
    back, info = read_volume(path)
    assert np.array_equal(back, vol) and info.grid == grid
