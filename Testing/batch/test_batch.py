"""`drgs4d batch` on Ray (local, CPU only) with real tiny reconstructions.

One Ray instance for the module (num_cpus=2).  The main batch is a CSV manifest of three jobs over the tiny phantom
of Testing/conftest.py: a good one, one broken case (angles in degrees: an input error)
and one whose Ray worker process is SIGKILLed mid-training: Ray retries it and the retry resumes from the job's
checkpoint.  The results table is checked against each job's own metrics.json; a rerun must skip the finished
jobs without touching their files; a stop request (Ctrl-C) must leave checkpoints and cancel queued jobs.
"""

import csv
import json
import os
import signal

import pytest

from drgs_core.batch import jobs as batch_jobs
from drgs_core.batch import read_jobs

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
from drgs_core.batch.runner import run_batch  # noqa: E402

DEFAULTS = {"preset": "tiny", "device": "cpu", "views": 8, "n_gaussians": 300, "times_4d": 2, "iterations": 30}


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _manifest(tiny_case, degrees_case, folder):
    degrees_case(folder / "broken_case")
    os.symlink(tiny_case, folder / "case")
    path = folder / "manifest.csv"
    path.write_text("name,case,views,iterations,checkpoint_every\n"
                    "a,case,8,,\n"
                    "broken,broken_case,8,,\n"
                    "killme,case,8,60,4\n")
    return path


# ---- reading inputs (no Ray) ---------------------------------------------------------------------------------------

def test_manifest_rows_become_jobs_with_resolved_paths_and_row_problems(tiny_case, tmp_path):
    man = tmp_path / "m.json"
    man.write_text(json.dumps({"defaults": {"preset": "tiny", "views": 8},
                               "jobs": [{"case": "c1"}, {"case": "c1", "views": 6}, {"case": "c2", "bogus": 1},
                                        {"case": "c3", "out": "x"}]}))
    jobs = read_jobs(man, tmp_path / "out")
    assert [j.config["views"] for j in jobs] == [8, 6, 8, 8]
    assert jobs[0].config["case"] == str(tmp_path / "c1")                        # relative to the manifest
    assert jobs[0].name == "c1" and jobs[1].name.startswith("c1-") and jobs[0].key != jobs[1].key
    assert jobs[0].out == str(tmp_path / "out" / "c1")
    assert jobs[0].problem is None and jobs[1].problem is None
    assert "bogus" in jobs[2].problem and "unknown configuration keys" in jobs[2].problem
    assert "out" in jobs[3].problem


def test_folder_of_cases_and_csv_cells(tiny_case, tmp_path):
    root = tmp_path / "cases"
    root.mkdir()
    for name in ("p2", "p1"):
        os.symlink(tiny_case, root / name)
    (root / "notes").mkdir()  # not a case folder: ignored
    jobs = read_jobs(root, tmp_path / "out", {"views": 5})
    assert [(j.name, j.config["case"], j.config["views"]) for j in jobs] == [
        ("p1", str(root / "p1"), 5), ("p2", str(root / "p2"), 5)]
    assert [batch_jobs.parse_cell(t) for t in ("", "12", "0.5", "TRUE", "no", "auto")] == [
        None, 12, 0.5, True, False, "auto"]
    with pytest.raises(batch_jobs.DRGSInputError, match="no case folders"):
        read_jobs(root / "notes", tmp_path / "out")


def test_a_dicom_root_gives_one_job_per_mask_fill_pair(tiny_case, tmp_path):
    """Two studies written as rotational XA: each becomes a job pointing at its own files and runs."""
    import numpy as np

    from drgs_core.io import read_case
    from drgs_core.io.dicom import import_dicom
    from drgs_core.io.dicom_write import case_to_dicom

    case = read_case(tiny_case)
    root = tmp_path / "dicom"
    case_to_dicom(case, root / "study_a", style="ge")
    case_to_dicom(case, root / "study_b", style="siemens", mask_reversed=True)
    jobs = read_jobs(root, tmp_path / "out", {"preset": "tiny"})
    assert len(jobs) == 2 and len({j.name for j in jobs}) == 2
    assert sorted(os.path.basename(j.config["dicom"]) for j in jobs) == ["study_a", "study_b"]
    for job in jobs:
        assert job.problem is None and job.config["fill_uid"] != job.config["mask_uid"]
        imported = import_dicom(job.config["dicom"], fill=job.config["fill_uid"], mask=job.config["mask_uid"]).case
        assert np.allclose(imported.geometry.primary_angles, case.geometry.primary_angles, atol=1e-6)


# ---- Ray runs ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def first_batch(ray_local, tiny_case, degrees_case, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    jobs = read_jobs(_manifest(tiny_case, degrees_case, folder), folder / "out", DEFAULTS)
    killed = {}

    def kill_mid_training(state):
        info = state["live"].get("killme", {})
        if not killed and info.get("stage") == "train" and (folder / "out" / "killme" / "checkpoint.pt").exists():
            killed["pid"] = info["pid"]
            os.kill(info["pid"], signal.SIGKILL)  # the worker process dies: Ray must retry the task

    records = run_batch(jobs, folder / "out", on_update=kill_mid_training, poll_s=0.1)
    return folder, jobs, {r["name"]: r for r in records}, killed


def test_results_table_matches_each_jobs_metrics(first_batch):
    folder, jobs, records, _ = first_batch
    assert {n: r["status"] for n, r in records.items()} == {
        "a": "done", "broken": "error", "killme": "done"}
    with open(folder / "out" / "results.csv", newline="") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    table = {r["name"]: r for r in json.loads((folder / "out" / "results.json").read_text())}
    assert list(rows) == list(table) == ["a", "broken", "killme"]
    for name in ("a", "killme"):
        metrics = json.loads((folder / "out" / name / "metrics.json").read_text())
        assert table[name]["n_gaussians"] == metrics["n_gaussians"] > 0
        assert table[name]["heldout_psnr"] == pytest.approx(metrics["heldout_psnr"])
        assert table[name]["cd_mm"] == pytest.approx(metrics["truth"]["cd_mm"])
        assert float(rows[name]["cd_mm"]) == pytest.approx(metrics["truth"]["cd_mm"])
        assert float(rows[name]["time_s"]) > 0 and rows[name]["status"] == "done"
        assert (folder / "out" / name / "volume.nii.gz").is_file()
    assert json.loads(rows["a"]["options"])["views"] == 8 and table["killme"]["options"]["iterations"] == 60
    assert rows["broken"]["status"] == "error" and "degrees" in rows["broken"]["error"]
    assert table["broken"]["n_gaussians"] is None


def test_killed_worker_is_retried_and_resumes_from_its_checkpoint(first_batch):
    _, _, records, killed = first_batch
    assert killed, "the kill hook never saw the job training"
    rec = records["killme"]
    assert rec["attempts"] == 2 and rec["resumed"] is True
    # the retry started from a periodic checkpoint (every 4 iterations) of the killed attempt, not from 0
    assert (rec["first_train_iteration"] - 1) % 4 == 0 and 4 <= rec["first_train_iteration"] - 1 < 60
    assert rec["metrics"]["iterations"] == 60
    assert records["a"]["attempts"] == 1 and records["a"]["resumed"] is False


def test_rerun_skips_finished_jobs(first_batch):
    folder, jobs, _, _ = first_batch
    stamps = {n: os.stat(folder / "out" / n / "volume.nii.gz").st_mtime_ns for n in ("a", "killme")}
    started = set()
    records = run_batch(jobs, folder / "out", on_update=lambda s: started.update(s["live"]), poll_s=0.1)
    by_name = {r["name"]: r for r in records}
    assert started == {"broken"}                      # only the failed job was tried again
    assert all(by_name[n]["reused"] and by_name[n]["status"] == "done" for n in stamps)
    assert by_name["broken"]["status"] == "error"
    assert stamps == {n: os.stat(folder / "out" / n / "volume.nii.gz").st_mtime_ns for n in stamps}


def _stop_once_training(jobs, out, at_iteration):
    """run_batch with a stop request (as on Ctrl-C) once a job trains past `at_iteration`."""
    state = {"stop": False}

    def watch(update):
        state["stop"] = state["stop"] or any(
            i.get("stage") == "train" and (i.get("iteration") or 0) >= at_iteration for i in update["live"].values())

    return run_batch(jobs, out, should_stop=lambda: state["stop"], on_update=watch, poll_s=0.1, cpus_per_job=2,
                     stop_grace_s=60)


def test_stop_request_checkpoints_running_jobs_and_a_rerun_resumes(ray_local, tiny_case, tmp_path):
    rows = [{"name": f"s{i}", "case": str(tiny_case), "iterations": 2000, "checkpoint_every": 5, "seed": i}
            for i in range(2)]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    jobs = read_jobs(tmp_path / "m.json", tmp_path / "out", DEFAULTS)
    records = _stop_once_training(jobs, tmp_path / "out", 6)
    statuses = {r["name"]: (r["status"], r.get("error")) for r in records}
    assert {s for s, _ in statuses.values()} == {"cancelled"}, statuses
    with_checkpoint = [r for r in records if r.get("checkpoint")]
    assert len(with_checkpoint) == 1  # two CPUs, two per job: one ran, the other was cancelled in the queue
    ran = with_checkpoint[0]
    saved = torch.load(ran["checkpoint"], map_location="cpu", weights_only=False)["state"]["iteration"]
    assert saved >= 5
    # the same batch again: the stopped job continues from its checkpoint instead of starting over
    rerun = [j for j in jobs if j.name == ran["name"]]
    again = {r["name"]: r for r in _stop_once_training(rerun, tmp_path / "out", saved + 2)}
    assert again[ran["name"]]["resumed"] is True
    assert again[ran["name"]]["first_train_iteration"] == saved + 1
