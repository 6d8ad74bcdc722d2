"""Triton X-ray rasteriser (backend "triton"): same maths as csrc/raster.cu and `render.torch_ref`.

Split of the work (why: DESIGN.md, "Triton backend"):

* Projection (culling, projected centre, Sigma'_2, conic, eta, pixel box) runs as plain torch operations on
  [P]-sized float64 tensors, for *all* Gaussians (culled ones are masked, never removed), so its shapes never
  depend on the data: no host synchronisation, safe inside a captured CUDA graph.  Its backward pass is torch
  autograd, i.e. the same chain rule as `project_backward` in csrc/gauss_math.h, in float64.
* Splatting is one Triton program per Gaussian that walks the Gaussian's clipped pixel box in flat blocks of
  `BLOCK` pixels.  Forward: adds w exp(-q/2) into the image with atomic adds (additive X-ray model, no depth
  order).  Backward: gathers dLoss/dpixel over the same box and reduces the six pixel sums of gauss_math.h
  (PixelSums) to the gradients of (u, v, A, r, D, w) of that Gaussian: no atomics, no pair list, so there is
  no capacity that could overflow (`RasterResult.n_pairs` is None, `pair_capacity` is ignored).

Quadratic form (stable, as in the CUDA kernels): q = A (dx + r dy)^2 + D dy^2, dx = x - u, dy = y - v, with
the conic [[A, B], [B, C]] = Sigma'_2^-1, r = B / A, D = C - B r.  Pixel (x, y) belongs to the box of a
Gaussian iff |x - u| <= 3 sqrt(Sigma'_2[0,0]) and |y - v| <= 3 sqrt(Sigma'_2[1,1]) (box in float64).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..render.common import NEAR_FRACTION, RasterResult

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_RADIUS_MAX = 1e9
BLOCK = 128       # pixels per step of one Gaussian's box walk
N_PRM = 6         # per-Gaussian splat parameters: u, v, A, r, D, w


@triton.jit
def _splat_forward_kernel(prm_ptr, box_ptr, image_ptr, W, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    x0 = tl.load(box_ptr + 4 * i)
    y0 = tl.load(box_ptr + 4 * i + 1)
    bw = tl.load(box_ptr + 4 * i + 2) - x0 + 1
    area = bw * (tl.load(box_ptr + 4 * i + 3) - y0 + 1)   # 0 for an invisible Gaussian
    u = tl.load(prm_ptr + 6 * i)
    v = tl.load(prm_ptr + 6 * i + 1)
    A = tl.load(prm_ptr + 6 * i + 2)
    r = tl.load(prm_ptr + 6 * i + 3)
    D = tl.load(prm_ptr + 6 * i + 4)
    w = tl.load(prm_ptr + 6 * i + 5)
    lanes = tl.arange(0, BLOCK)
    for start in range(0, area, BLOCK):
        k = start + lanes
        inside = k < area
        px = x0 + k % bw
        py = y0 + k // bw
        dx = px.to(tl.float32) - u
        dy = py.to(tl.float32) - v
        t = dx + r * dy
        e = tl.exp(-0.5 * (A * t * t + D * dy * dy))
        tl.atomic_add(image_ptr + py.to(tl.int64) * W + px, w * e, mask=inside)


@triton.jit
def _splat_backward_kernel(prm_ptr, box_ptr, grad_ptr, out_ptr, W, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    x0 = tl.load(box_ptr + 4 * i)
    y0 = tl.load(box_ptr + 4 * i + 1)
    bw = tl.load(box_ptr + 4 * i + 2) - x0 + 1
    area = bw * (tl.load(box_ptr + 4 * i + 3) - y0 + 1)
    u = tl.load(prm_ptr + 6 * i)
    v = tl.load(prm_ptr + 6 * i + 1)
    A = tl.load(prm_ptr + 6 * i + 2)
    r = tl.load(prm_ptr + 6 * i + 3)
    D = tl.load(prm_ptr + 6 * i + 4)
    w = tl.load(prm_ptr + 6 * i + 5)
    lanes = tl.arange(0, BLOCK)
    # the six PixelSums of gauss_math.h, lane-wise; s = -1/2 g w e = dLoss/dq at a pixel
    s_w = tl.zeros([BLOCK], dtype=tl.float32)     # sum g e
    s_tt = tl.zeros([BLOCK], dtype=tl.float32)    # sum s t^2
    s_ty = tl.zeros([BLOCK], dtype=tl.float32)    # sum s t dy
    s_yy = tl.zeros([BLOCK], dtype=tl.float32)    # sum s dy^2
    s_t = tl.zeros([BLOCK], dtype=tl.float32)     # sum s t
    s_y = tl.zeros([BLOCK], dtype=tl.float32)     # sum s dy
    for start in range(0, area, BLOCK):
        k = start + lanes
        inside = k < area
        px = x0 + k % bw
        py = y0 + k // bw
        g = tl.load(grad_ptr + py.to(tl.int64) * W + px, mask=inside, other=0.0)
        dx = px.to(tl.float32) - u
        dy = py.to(tl.float32) - v
        t = dx + r * dy
        ge = g * tl.exp(-0.5 * (A * t * t + D * dy * dy))
        s = -0.5 * ge * w
        s_w += ge
        s_tt += s * t * t
        s_ty += s * t * dy
        s_yy += s * dy * dy
        s_t += s * t
        s_y += s * dy
    St = tl.sum(s_t, axis=0)
    Sdy = tl.sum(s_y, axis=0)
    # gradients of (u, v, A, r, D, w): dq/du = -2 A t, dq/dv = -2 A r t - 2 D dy, dq/dA = t^2,
    # dq/dr = 2 A t dy, dq/dD = dy^2, d image/dw = e
    tl.store(out_ptr + 6 * i, -2.0 * A * St)
    tl.store(out_ptr + 6 * i + 1, -2.0 * A * r * St - 2.0 * D * Sdy)
    tl.store(out_ptr + 6 * i + 2, tl.sum(s_tt, axis=0))
    tl.store(out_ptr + 6 * i + 3, 2.0 * A * tl.sum(s_ty, axis=0))
    tl.store(out_ptr + 6 * i + 4, tl.sum(s_yy, axis=0))
    tl.store(out_ptr + 6 * i + 5, tl.sum(s_w, axis=0))


class _Splat(torch.autograd.Function):
    """image [H, W] float32 = sum_i w_i exp(-q_i/2) over the pixel boxes; prm [P, 6] float32, box [P, 4] int32."""

    @staticmethod
    def forward(ctx, prm, box, H: int, W: int):
        image = torch.zeros(H * W, dtype=torch.float32, device=prm.device)
        P = prm.shape[0]
        if P > 0:
            _splat_forward_kernel[(P,)](prm, box, image, W, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(prm, box)
        ctx.W = W
        return image.view(H, W)

    @staticmethod
    def backward(ctx, grad_image):
        prm, box = ctx.saved_tensors
        grad = torch.empty_like(prm)
        P = prm.shape[0]
        if P > 0:
            g = grad_image.contiguous().float()
            _splat_backward_kernel[(P,)](prm, box, g, grad, ctx.W, BLOCK=BLOCK, num_warps=4)
        return grad, None, None, None


def _rotation(q):
    """Rotation matrices [3, 3, P] of quaternions q [4, P] (w, x, y, z), normalised with |q| clamped >= 1e-12."""
    q = q / q.norm(dim=0).clamp(min=1e-12)
    w, x, y, z = q.unbind(0)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], 0),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], 0),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], 0)], 0)


def project(means, scales, rotations, rho, params, W: int, H: int, means2d=None):
    """Per-Gaussian splat parameters, sync-free (see the module docstring).

    params: the packed camera [16] float64 (R row-major, T mm, fx, fy, cx, cy pixels).  Returns
    (prm [P, 6] float32 differentiable (u, v, A, r, D, w), box [P, 4] int32 (x0, y0, x1, y1), empty
    (0, 0, -1, -1) when invisible, radii [P] int32, visible [P] bool, centres [P, 2] float32).
    """
    f64 = torch.float64
    R = params[:9].view(3, 3)
    T = params[9:12]
    fx, fy, cx, cy = params[12], params[13], params[14], params[15]
    mu = means.to(f64).T
    s = scales.to(f64).T
    c_all = R @ mu + T[:, None]                                                   # camera space [3, P] mm
    with torch.no_grad():
        front = torch.isfinite(c_all).all(0) & (c_all[2] >= NEAR_FRACTION * T[2])
    c = torch.where(front[None, :], c_all, T[:, None].expand_as(c_all))          # culled: harmless stand-in
    x, y, z = c.unbind(0)
    iz = 1.0 / z
    u = cx + fx * x * iz
    v = cy + fy * y * iz
    if means2d is not None:
        u = u + means2d[:, 0].to(f64)
        v = v + means2d[:, 1].to(f64)
    # M = J2 Rc Rq diag(s) (2 x 3), Sigma'_2 = M M^T
    L = _rotation(rotations.to(f64).T) * s[None, :, :]                           # Rq diag(s) [3, 3, P]
    a0 = (fx * iz) * (R[0][:, None] - (x * iz)[None, :] * R[2][:, None])          # rows of J2 Rc [3, P]
    a1 = (fy * iz) * (R[1][:, None] - (y * iz)[None, :] * R[2][:, None])
    m0 = (a0[:, None, :] * L).sum(0)
    m1 = (a1[:, None, :] * L).sum(0)
    s00, s01, s11 = (m0 * m0).sum(0), (m0 * m1).sum(0), (m1 * m1).sum(0)
    k01 = m0[0] * m1[1] - m0[1] * m1[0]
    k02 = m0[0] * m1[2] - m0[2] * m1[0]
    k12 = m0[1] * m1[2] - m0[2] * m1[1]
    det = k01 * k01 + k02 * k02 + k12 * k12                                       # Cauchy-Binet, >= 0
    with torch.no_grad():
        valid = front & (det > 0) & torch.isfinite(det) & torch.isfinite(u) & torch.isfinite(v)
    one = torch.ones_like(det)
    det_s = torch.where(valid, det, one)
    s11_s = torch.where(valid, s11, one)
    eta = _SQRT_2PI * fx * fy * c.norm(dim=0) * iz ** 3 * s.prod(0).abs() / det_s.sqrt()
    A = s11_s / det_s
    B = -s01 / det_s
    r = B / A
    D = s00 / det_s - B * r
    prm = torch.stack([u, v, A, r, D, rho.to(f64) * eta], 1).float()
    with torch.no_grad():
        hx, hy = 3.0 * s00.sqrt(), 3.0 * s11.sqrt()
        ud, vd = u.detach(), v.detach()
        bx0 = (ud - hx).ceil().clamp(min=0.0, max=W)
        bx1 = (ud + hx).floor().clamp(min=-1.0, max=W - 1)
        by0 = (vd - hy).ceil().clamp(min=0.0, max=H)
        by1 = (vd + hy).floor().clamp(min=-1.0, max=H - 1)
        visible = valid & (bx0 <= bx1) & (by0 <= by1)
        # invisible: the empty box (0, 0, -1, -1); scalars only (a tensor built from a Python list would be a
        # host-to-device copy, which CUDA-graph capture forbids)
        box = torch.stack([torch.where(visible, bx0, 0.0), torch.where(visible, by0, 0.0),
                           torch.where(visible, bx1, -1.0), torch.where(visible, by1, -1.0)], 1).to(torch.int32)
        radius = torch.maximum(hx, hy).ceil().clamp(max=_RADIUS_MAX)
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)
        centres = torch.where(front[:, None], torch.stack([ud, vd], 1), torch.zeros(1, 2, dtype=f64,
                                                                                    device=ud.device)).float()
    return prm, box.contiguous(), radii, visible, centres


def rasterize(means, scales, rotations, rho, params, W: int, H: int, means2d=None) -> RasterResult:
    """X-ray image [H, W] float32 of the Gaussians for the packed camera `params` (see `project`)."""
    prm, box, radii, visible, centres = project(means, scales, rotations, rho, params, W, H, means2d)
    image = _Splat.apply(prm.contiguous(), box, H, W)
    return RasterResult(image, radii, visible, centres, None)
