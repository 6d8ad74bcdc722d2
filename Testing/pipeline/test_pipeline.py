"""End-to-end on a small phantom: 4DRGS vs FDK vs the static field, resume, outputs and their geometry."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from drgs_core.errors import DRGSInputError
from drgs_core.io import read_case, read_stack, read_volume
from drgs_core.model.serialize import load_model
from drgs_core.pipeline import ReconstructConfig, render_frames, run_reconstruction


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "drgs_core.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ph") / "case"
    r = _cli("phantom", str(d), "--preset", "demo", "--seed", "3")
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def runs(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = _cli("fdk", str(phantom_dir), "--views", "30", "--out", str(out / "fdk"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = {"fdk": json.loads((out / "fdk" / "metrics.json").read_text())}
    for name, static in (("static", True), ("4d", False)):
        cfg = ReconstructConfig(out=str(out / name), case=str(phantom_dir), views=30, device="cpu", preset="demo",
                                static_field=static, seed=0, times_4d=3)
        res[name] = run_reconstruction(cfg)
    res["out"] = out
    return res


def test_4drgs_beats_fdk_and_static_field(runs):
    fdk, st, ours = runs["fdk"]["truth"], runs["static"]["metrics"], runs["4d"]["metrics"]
    print("FDK", fdk, "\nstatic", st["truth"], st["heldout_psnr"], "\n4D", ours["truth"], ours["heldout_psnr"])
    assert ours["truth"]["cd_mm"] < fdk["cd_mm"]
    assert ours["truth"]["best_dice"] > fdk["best_dice"]
    assert ours["heldout_psnr"] > st["heldout_psnr"]


def test_outputs_reload_with_correct_geometry(runs, phantom_dir):
    run = runs["out"] / "4d"
    case = read_case(phantom_dir)
    for name in ("volume.nii.gz", "segmentation.nii.gz"):
        img = sitk.ReadImage(str(run / name))
        assert np.allclose(img.GetOrigin(), case.grid.first_voxel_centre, atol=1e-4)
        assert np.allclose(img.GetSpacing(), case.grid.spacing, atol=1e-6)
        assert np.allclose(np.array(img.GetDirection()).reshape(3, 3), np.eye(3))
    vol, info = read_volume(run / "volume.nii.gz")
    assert info.grid == case.grid
    # The reloaded model re-renders exactly what was written.
    model = load_model(run)
    again = render_frames(model, case.geometry, [5], case.times[[5]], torch.device("cpu"))[0]
    renders = read_stack(run / "renders.nii.gz")
    assert renders.shape == case.dsa.shape
    assert np.allclose(again, renders[5], rtol=1e-4, atol=1e-6)
    # The vessels of the reconstruction sit where the truth has them (world coordinates).
    truth, _ = read_volume(phantom_dir / "truth" / "volume.nii.gz")
    peak = np.unravel_index(np.argmax(vol), vol.shape)
    assert truth[peak] > 0
    for name in ("mesh.stl", "mesh.vtk", "volume_4d.seq.nrrd", "cine.nii.gz", "gaussians.ply", "metrics.json",
                 "config.json"):
        assert (run / name).stat().st_size > 0, name
    assert "SPACE=LPS" in (run / "mesh.vtk").read_bytes()[:256].decode("latin-1")


def test_checkpoint_resumes_to_the_same_state(phantom_dir, tmp_path):
    base = dict(case=str(phantom_dir), views=10, device="cpu", preset="tiny", iterations=60, seed=1,
                progress_every=10, checkpoint_every=1000, times_4d=2)
    full = run_reconstruction(ReconstructConfig(out=str(tmp_path / "a"), **base))
    assert full["status"] == "done"

    seen = {}

    def on_event(e):
        if e["event"] == "progress" and e.get("stage") == "train":
            seen["it"] = e["iteration"]

    part = run_reconstruction(ReconstructConfig(out=str(tmp_path / "b"), **base), on_event=on_event,
                              should_stop=lambda: seen.get("it", 0) >= 30)
    assert part["status"] == "cancelled"
    done = run_reconstruction(ReconstructConfig(out=str(tmp_path / "b"), resume=True, **base))
    assert done["status"] == "done"
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


def test_bad_inputs_raise_actionable_errors(phantom_dir, tmp_path):
    with pytest.raises(DRGSInputError, match="views"):
        run_reconstruction(ReconstructConfig(out=str(tmp_path / "x"), case=str(phantom_dir), views=10_000,
                                             device="cpu", preset="tiny"))
    with pytest.raises(DRGSInputError, match="unknown configuration keys"):
        ReconstructConfig.from_dict({"out": "x", "case": "y", "viewz": 3})
    r = _cli("reconstruct", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--device", "cpu")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_stops_the_cli_with_a_resumable_checkpoint(phantom_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "drgs_core.cli", "reconstruct", str(phantom_dir), "--out",
                             str(out), "--device", "cpu", "--preset", "tiny", "--iterations", "100000",
                             "--views", "10", "--checkpoint-every", "5", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:  # training has started
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    assert "checkpoint kept" in stdout
    state = torch.load(out / "checkpoint.pt", weights_only=False)["state"]
    assert 0 < state["iteration"] < 100000


def test_resume_with_other_settings_is_refused_and_keeps_the_checkpoint(phantom_dir, tmp_path):
    base = dict(out=str(tmp_path / "r"), case=str(phantom_dir), device="cpu", preset="tiny", iterations=20,
                times_4d=2)
    run_reconstruction(ReconstructConfig(views=10, **base), should_stop=lambda: False)
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    with pytest.raises(DRGSInputError, match="different run"):
        run_reconstruction(ReconstructConfig(views=12, resume=True, **base))
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before
