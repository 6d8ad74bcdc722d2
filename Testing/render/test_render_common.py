"""The shared render maths (`render.common`) against literal formulas, and the backend dispatch."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from _render_testlib import covariances, make_geometry, random_quaternions, t64
from drgs_core import render
from drgs_core.errors import DRGSInputError
from drgs_core.render import common


def _scene(P=40, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.uniform(-80, 80, size=(P, 3))
    scales = rng.uniform(0.3, 20.0, size=(P, 3))
    quats = random_quaternions(rng, P)
    return means, scales, quats


def test_quaternion_rotation_matches_scipy():
    _, _, q = _scene()
    R = common.quaternion_to_rotation(t64(q)).numpy()
    ref = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()
    assert np.allclose(R, ref, atol=1e-12)


def test_covariance_and_precision():
    _, s, q = _scene()
    S = common.covariance_3d(t64(s), t64(q)).numpy()
    assert np.allclose(S, covariances(s, q), rtol=1e-10, atol=1e-10)
    Q = common.precision_3d(t64(s), t64(q)).numpy()
    assert np.allclose(np.einsum("pij,pjk->pik", Q, S), np.eye(3), atol=1e-8)
    d = common.axis_variances(t64(s), t64(q)).numpy()
    assert np.allclose(d, np.diagonal(S, axis1=1, axis2=2), rtol=1e-10)


def test_screen_covariance_and_eta_equal_the_literal_rules():
    """Sigma'_2 = M M^T, the Cauchy-Binet determinant and the closed-form eta equal METHOD §5 literally."""
    geo = make_geometry()
    m, s, q = _scene()
    R, T, fx, fy, _, _ = common.camera_parameters(geo.camera(0, dtype=torch.float64), t64(m))
    c = t64(m) @ R.T + T
    S3 = common.covariance_3d(t64(s), t64(q))
    Sp = common.ray_space_covariance(c, S3, R, fx, fy)  # literal J R Sigma R^T J^T
    M = common.screen_factor(c, t64(s), t64(q), R, fx, fy)
    s00, s01, s11, det2 = common.screen_covariance(M)
    assert torch.allclose(s00, Sp[:, 0, 0], rtol=1e-10)
    assert torch.allclose(s01, Sp[:, 0, 1], rtol=1e-9, atol=1e-9 * s00.max().item())
    assert torch.allclose(s11, Sp[:, 1, 1], rtol=1e-10)
    assert torch.allclose(det2, torch.linalg.det(Sp[:, :2, :2]), rtol=1e-8)
    eta = common.integration_factor(c, t64(s), det2, fx, fy)
    eta_literal = torch.sqrt(2 * np.pi * torch.linalg.det(Sp) / torch.linalg.det(Sp[:, :2, :2]))
    assert torch.allclose(eta, eta_literal, rtol=1e-7)


def test_footprint_range_is_the_literal_rule():
    rng = np.random.default_rng(3)
    centre = torch.tensor(rng.uniform(-20, 60, size=(500, 2)))
    half = torch.tensor(rng.uniform(0.0, 30, size=(500, 2)))
    half[:5] = 0.0
    centre[5:10] = torch.round(centre[5:10])  # exact pixel hits
    half[10:20] = torch.round(half[10:20])
    first, count = common.footprint_range(centre, half, (40, 30))
    for d, size in enumerate((40, 30)):
        k = torch.arange(size, dtype=torch.float64)
        inside = (k[None, :] - centre[:, d:d + 1]).abs() <= half[:, d:d + 1]
        assert torch.equal(count[:, d], inside.sum(1))
        hit = count[:, d] > 0
        assert torch.equal(first[hit, d], inside[hit].float().argmax(1))


def test_backend_selection_and_errors(monkeypatch):
    from drgs_core import cuda

    assert render.active_backend("cpu") == "torch"
    geo = make_geometry(8, 8)
    args = t64([[0.0, 0.0, 0.0]], [[5.0, 5.0, 5.0]], [[1.0, 0.0, 0.0, 0.0]], [0.1])
    cam = geo.camera(0, dtype=torch.float64)
    with pytest.raises(DRGSInputError):
        render.rasterize(*args, cam, backend="bogus")
    for name in ("cuda", "cuda-ext", "triton"):
        if not cuda.is_available("cuda-ext" if name == "cuda" else name):
            with pytest.raises(DRGSInputError):
                render.rasterize(*args, cam, backend=name)
    with pytest.raises(DRGSInputError):
        render.rasterize(args[0], args[1][:, :2], args[2], args[3], cam)

    class FakeCuda:
        calls = []

        @staticmethod
        def rasterize(*a):
            FakeCuda.calls.append("rasterize")

    # pretend the compiled extension loads: auto on CUDA devices picks it, CPU tensors still go to torch
    monkeypatch.setattr(cuda, "is_available", lambda name: name in ("cuda-ext", "torch"))
    monkeypatch.setattr(cuda, "backend_module", lambda name: FakeCuda)
    assert render.active_backend("cuda:0") == "cuda-ext"
    assert render.active_backend("cpu") == "torch"
    assert render._resolve("auto", torch.device("cuda", 0)) == ("cuda-ext", FakeCuda)
    with pytest.raises(DRGSInputError):  # CPU tensors cannot go to a GPU backend
        render.rasterize(*args, cam, backend="cuda")
    out = render.rasterize(*args, cam)  # auto on CPU tensors -> torch
    assert isinstance(out, render.RasterResult) and FakeCuda.calls == []
