"""The initial field fit (METHOD §5) converges; the init stage runs on one CPU thread."""

import numpy as np
import torch

from drgs_core.geometry import VolumeGrid
from drgs_core.model.gaussians import GaussianModel
from drgs_core.pipeline import _one_cpu_thread


def _model_and_target(n=2000, seed=0):
    """Gaussians along three analytic tubes (as an FDK of vessels gives them) with attenuation that varies
    smoothly along each tube (1/mm)."""
    grid = VolumeGrid((48, 48, 48), (2.0, 2.0, 2.0))
    torch.manual_seed(seed)
    model = GaussianModel(grid, log2_table_size=14, n_levels=8)
    rng = np.random.default_rng(seed)
    s = rng.random(n)
    tube = rng.integers(0, 3, n)
    axis = np.stack([s * 80 - 40, 10 * np.sin(3 * s) + 8 * (tube - 1), 6 * np.cos(2 * s) - 10 * (tube - 1)], 1)
    pts = axis + rng.normal(0, 1.0, (n, 3))
    model.means = torch.nn.Parameter(torch.as_tensor(pts, dtype=torch.float32))
    target = torch.as_tensor(0.02 + 0.015 * np.sin(6 * s + tube) * (1 + tube) / 3, dtype=torch.float32)
    return model, target


def test_the_default_fit_converges_at_the_fitted_and_other_times():
    model, target = _model_and_target()
    rel = model.set_initial_attenuation(target, seed=0)
    assert rel < 0.1, rel
    with torch.no_grad():  # the target does not depend on time: other times must be close too
        for t in (0.0, 0.37, 1.0):
            err = (model.rho(t) - target).pow(2).mean().sqrt() / target.pow(2).mean().sqrt()
            assert float(err) < 0.3, (t, float(err))


def test_more_steps_fit_better():
    """The fit converges: the error falls with the number of steps (same seed, same start)."""
    errors = []
    for steps in (10, 40, 100):
        model, target = _model_and_target()
        errors.append(model.set_initial_attenuation(target, fit_steps=steps, seed=0))
    assert errors[0] > errors[1] > errors[2], errors


def test_one_cpu_thread_is_restored_and_leaves_the_gpu_alone():
    before = torch.get_num_threads()
    with _one_cpu_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    try:
        with _one_cpu_thread(torch.device("cpu")):
            raise ValueError
    except ValueError:
        pass
    assert torch.get_num_threads() == before
    with _one_cpu_thread(torch.device("cuda")):
        assert torch.get_num_threads() == before
