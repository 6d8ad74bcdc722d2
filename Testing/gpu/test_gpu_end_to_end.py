"""End to end: a small phantom trained on the GPU (the automatically chosen GPU backend) reaches the metrics of the CPU reference run.

Marked `slow` as well as `gpu`: it runs the whole pipeline twice (CPU, then CUDA) on the `demo` phantom.
The two runs differ only by floating-point rounding and device random streams (densification samples), so
their metrics agree within run-to-run noise, not bit for bit.
"""

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ITERATIONS = 300


def test_gpu_run_matches_cpu_run(any_gpu_backend, tmp_path):
    from drgs_core.phantom import make_phantom, write_phantom
    from drgs_core.pipeline import ReconstructConfig, run_reconstruction
    case = tmp_path / "case"
    write_phantom(make_phantom("demo"), case)
    results = {}
    for dev in ("cpu", "cuda"):
        cfg = ReconstructConfig(out=str(tmp_path / dev), case=str(case), views=30, device=dev, preset="demo",
                                iterations=ITERATIONS, seed=0, times_4d=2, checkpoint_every=10**6)
        results[dev] = run_reconstruction(cfg)["metrics"]
    cpu, gpu = results["cpu"], results["cuda"]
    assert gpu["backend"] == any_gpu_backend
    summary = {d: {"cd": r["truth"]["cd_mm"], "hd95": r["truth"]["hd95_mm"], "dice": r["truth"]["best_dice"],
                   "psnr": r["heldout_psnr"], "ssim": r["heldout_ssim"], "it/s": r["it_per_s"],
                   "n": r["n_gaussians"]} for d, r in results.items()}
    print("\nCPU vs GPU:", summary)
    assert abs(gpu["heldout_psnr"] - cpu["heldout_psnr"]) <= 1.0
    assert abs(gpu["heldout_ssim"] - cpu["heldout_ssim"]) <= 0.03
    assert abs(gpu["truth"]["best_dice"] - cpu["truth"]["best_dice"]) <= 0.05
    assert gpu["truth"]["cd_mm"] <= 1.25 * cpu["truth"]["cd_mm"] + 0.25
    assert gpu["truth"]["hd95_mm"] <= 1.25 * cpu["truth"]["hd95_mm"] + 0.5
    assert gpu["it_per_s"] > cpu["it_per_s"]
