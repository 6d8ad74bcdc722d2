"""Triton X-ray rasteriser (backend "triton"): the numerical rules of `render.common`, evaluated as
csrc/gauss_math.h does (per-Gaussian projection and its chain rule in float64, pixels in float32).

Two kernels, each compiled for both directions (why: DESIGN.md, "Triton backend"):

* `_project_kernel`, one Gaussian per lane: forward, the projection (cull, centre, Sigma'_2 = M M^T, conic,
  eta, clipped pixel box) -> splat parameters, box, radii / visibility / centres; backward, the same projection
  again and the chain rule of gauss_math.h's `project_backward` from the six pixel sums to the gradients of
  means, scales, rotations, rho and means2d.
* `_splat_kernel`, one program per Gaussian walking its pixel box: forward, adds w exp(-q/2) into the image
  with atomic adds (additive X-ray model, no depth order); backward, gathers dLoss/dpixel into the six pixel
  sums (PixelSums of gauss_math.h): no atomics, no pair list.

A training step is four launches.  Nothing here depends on the data on the host: buffer sizes come from P,
H and W only, culled or off-image Gaussians are masked (an empty box), never removed.  So the step has no
host synchronisation and can be captured in a CUDA graph; there is no capacity that could overflow
(`RasterResult.n_pairs` is None).  (A first version did the projection in torch ops: ~200 tiny kernels per
step, and the backward of `prod` calls `.item()`, which CUDA-graph capture refuses.)

Quadratic form (stable): q = A (dx + r dy)^2 + D dy^2, dx = x - u, dy = y - v, with the conic
[[A, B], [B, C]] = Sigma'_2^-1, r = B / A, D = C - B r.  Pixel (x, y) belongs to the box of a Gaussian iff
|x - u| <= 3 sqrt(Sigma'_2[0,0]) and |y - v| <= 3 sqrt(Sigma'_2[1,1]) (box in float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..render.common import RasterResult
from ._triton import on_device

BLOCK = 128          # pixels per step of one Gaussian's box walk
PROJECT_BLOCK = 128  # Gaussians per program of the projection (one per lane)


@triton.jit
def finite(x):
    return x - x == 0.0


@triton.jit
def quat_rotation(qw, qx, qy, qz):
    """The rotation matrix (row-major R00 .. R22) of a unit quaternion (w, x, y, z)."""
    return (1.0 - 2.0 * (qy * qy + qz * qz), 2.0 * (qx * qy - qw * qz), 2.0 * (qx * qz + qw * qy),
            2.0 * (qx * qy + qw * qz), 1.0 - 2.0 * (qx * qx + qz * qz), 2.0 * (qy * qz - qw * qx),
            2.0 * (qx * qz - qw * qy), 2.0 * (qy * qz + qw * qx), 1.0 - 2.0 * (qx * qx + qy * qy))


@triton.jit
def _row_times_v(w0, w1, w2, R00, R01, R02, R10, R11, R12, R20, R21, R22, s0, s1, s2):
    """A row of M = W2 V, V = Rq diag(s): (w0, w1, w2) V."""
    return ((w0 * R00 + w1 * R10 + w2 * R20) * s0, (w0 * R01 + w1 * R11 + w2 * R21) * s1,
            (w0 * R02 + w1 * R12 + w2 * R22) * s2)


@triton.jit(do_not_specialize=["P", "W", "H"])
def _project_kernel(means_ptr, scales_ptr, rot_ptr, rho_ptr, m2_ptr, cam_ptr, prm_ptr, box_ptr,
                    radii_ptr, visible_ptr, centres_ptr, sums_ptr,
                    gmeans_ptr, gscales_ptr, grot_ptr, grho_ptr, gm2_ptr, P, W, H,
                    HAS_M2: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK Gaussians per program, one per lane.  Forward (BACKWARD=False): writes the splat parameters
    prm [P, 6] (u, v, A, r, D, w) float32, box [P, 4] (x0, y0, box width, box area; area 0 = invisible) int32
    and radii / visible / centres.  Backward: reads the pixel sums [P, 6] of `_splat_kernel` and writes the
    gradients g* (zero for invisible Gaussians)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < P
    f64 = tl.float64
    mu0 = tl.load(means_ptr + 3 * i, mask=m, other=0.0).to(f64)
    mu1 = tl.load(means_ptr + 3 * i + 1, mask=m, other=0.0).to(f64)
    mu2 = tl.load(means_ptr + 3 * i + 2, mask=m, other=0.0).to(f64)
    s0 = tl.load(scales_ptr + 3 * i, mask=m, other=1.0).to(f64)
    s1 = tl.load(scales_ptr + 3 * i + 1, mask=m, other=1.0).to(f64)
    s2 = tl.load(scales_ptr + 3 * i + 2, mask=m, other=1.0).to(f64)
    q0 = tl.load(rot_ptr + 4 * i, mask=m, other=1.0).to(f64)
    q1 = tl.load(rot_ptr + 4 * i + 1, mask=m, other=0.0).to(f64)
    q2 = tl.load(rot_ptr + 4 * i + 2, mask=m, other=0.0).to(f64)
    q3 = tl.load(rot_ptr + 4 * i + 3, mask=m, other=0.0).to(f64)
    rho = tl.load(rho_ptr + i, mask=m, other=0.0).to(f64)
    # packed camera: R row-major (world -> camera), T (mm), fx, fy, cx, cy (pixels)
    C00 = tl.load(cam_ptr + 0)
    C01 = tl.load(cam_ptr + 1)
    C02 = tl.load(cam_ptr + 2)
    C10 = tl.load(cam_ptr + 3)
    C11 = tl.load(cam_ptr + 4)
    C12 = tl.load(cam_ptr + 5)
    C20 = tl.load(cam_ptr + 6)
    C21 = tl.load(cam_ptr + 7)
    C22 = tl.load(cam_ptr + 8)
    T0 = tl.load(cam_ptr + 9)
    T1 = tl.load(cam_ptr + 10)
    T2 = tl.load(cam_ptr + 11)
    fx = tl.load(cam_ptr + 12)
    fy = tl.load(cam_ptr + 13)
    cx = tl.load(cam_ptr + 14)
    cy = tl.load(cam_ptr + 15)

    # ---- projection (gauss_math.h `project`); culled Gaussians continue on harmless stand-in values
    xa = C00 * mu0 + C01 * mu1 + C02 * mu2 + T0
    ya = C10 * mu0 + C11 * mu1 + C12 * mu2 + T1
    za = C20 * mu0 + C21 * mu1 + C22 * mu2 + T2
    front = finite(xa) & finite(ya) & finite(za) & (za >= 0.2 * T2)
    x = tl.where(front, xa, T0)
    y = tl.where(front, ya, T1)
    z = tl.where(front, za, T2)
    iz = 1.0 / z
    iz2 = iz * iz
    u = cx + fx * x * iz
    v = cy + fy * y * iz
    if HAS_M2:
        u += tl.load(m2_ptr + 2 * i, mask=m, other=0.0).to(f64)
        v += tl.load(m2_ptr + 2 * i + 1, mask=m, other=0.0).to(f64)
    L = tl.sqrt(x * x + y * y + z * z)
    qnorm = tl.sqrt(q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3)
    qnorm = tl.where(qnorm > 1e-12, qnorm, 1e-12)
    qw = q0 / qnorm
    qx = q1 / qnorm
    qy = q2 / qnorm
    qz = q3 / qnorm
    R00, R01, R02, R10, R11, R12, R20, R21, R22 = quat_rotation(qw, qx, qy, qz)
    # W2 = J2 Rc (rows of the screen Jacobian times the camera rotation)
    J00 = fx * iz
    J02 = -fx * x * iz2
    J11 = fy * iz
    J12 = -fy * y * iz2
    W00 = J00 * C00 + J02 * C20
    W01 = J00 * C01 + J02 * C21
    W02 = J00 * C02 + J02 * C22
    W10 = J11 * C10 + J12 * C20
    W11 = J11 * C11 + J12 * C21
    W12 = J11 * C12 + J12 * C22
    M00, M01, M02 = _row_times_v(W00, W01, W02, R00, R01, R02, R10, R11, R12, R20, R21, R22, s0, s1, s2)
    M10, M11, M12 = _row_times_v(W10, W11, W12, R00, R01, R02, R10, R11, R12, R20, R21, R22, s0, s1, s2)
    a = M00 * M00 + M01 * M01 + M02 * M02
    b = M00 * M10 + M01 * M11 + M02 * M12
    cc = M10 * M10 + M11 * M11 + M12 * M12
    k01 = M00 * M11 - M01 * M10
    k02 = M00 * M12 - M02 * M10
    k12 = M01 * M12 - M02 * M11
    det2 = k01 * k01 + k02 * k02 + k12 * k12                      # Cauchy-Binet, >= 0
    valid = front & (det2 > 0.0) & finite(det2) & finite(u) & finite(v)
    det_s = tl.where(valid, det2, 1.0)
    a_s = tl.where(valid, a, 1.0)
    cc_s = tl.where(valid, cc, 1.0)
    b_s = tl.where(valid, b, 0.0)
    sprod = s0 * s1 * s2
    # eta = K |s0 s1 s2| with K = sqrt(2 pi) fx fy |c| / c_z^3 / sqrt(det Sigma'_2)
    K = 2.5066282746310002 * fx * fy * L * iz2 * iz / tl.sqrt(det_s)
    eta = K * tl.abs(sprod)
    A = cc_s / det_s
    B = -b_s / det_s
    C = a_s / det_s
    r = B / A
    D = C - B * r
    # ---- clipped pixel box (gauss_math.h `pixel_box`)
    hx = 3.0 * tl.sqrt(a_s)
    hy = 3.0 * tl.sqrt(cc_s)
    lox = tl.ceil(u - hx)
    hix = tl.floor(u + hx)
    loy = tl.ceil(v - hy)
    hiy = tl.floor(v + hy)
    Wm1 = (W - 1).to(f64)
    Hm1 = (H - 1).to(f64)
    fx0 = tl.where(lox > 0.0, lox, 0.0)
    fx1 = tl.where(hix < Wm1, hix, Wm1)
    fy0 = tl.where(loy > 0.0, loy, 0.0)
    fy1 = tl.where(hiy < Hm1, hiy, Hm1)
    visible = valid & (fx0 <= fx1) & (fy0 <= fy1)
    x0 = tl.where(visible, fx0, 0.0).to(tl.int32)
    y0 = tl.where(visible, fy0, 0.0).to(tl.int32)
    bw = tl.where(visible, fx1 - fx0 + 1.0, 0.0).to(tl.int32)
    area = bw * tl.where(visible, fy1 - fy0 + 1.0, 0.0).to(tl.int32)     # 0 for an invisible Gaussian

    if not BACKWARD:
        radius = tl.ceil(tl.where(hx > hy, hx, hy))
        radius = tl.where(radius < 1e9, radius, 1e9)
        tl.store(radii_ptr + i, tl.where(visible, radius, 0.0).to(tl.int32), mask=m)
        tl.store(visible_ptr + i, visible.to(tl.int8), mask=m)
        tl.store(centres_ptr + 2 * i, tl.where(front, u, 0.0).to(tl.float32), mask=m)
        tl.store(centres_ptr + 2 * i + 1, tl.where(front, v, 0.0).to(tl.float32), mask=m)
        tl.store(prm_ptr + 6 * i, u.to(tl.float32), mask=m)
        tl.store(prm_ptr + 6 * i + 1, v.to(tl.float32), mask=m)
        tl.store(prm_ptr + 6 * i + 2, A.to(tl.float32), mask=m)
        tl.store(prm_ptr + 6 * i + 3, r.to(tl.float32), mask=m)
        tl.store(prm_ptr + 6 * i + 4, D.to(tl.float32), mask=m)
        tl.store(prm_ptr + 6 * i + 5, (rho * eta).to(tl.float32), mask=m)
        tl.store(box_ptr + 4 * i, x0, mask=m)
        tl.store(box_ptr + 4 * i + 1, y0, mask=m)
        tl.store(box_ptr + 4 * i + 2, bw, mask=m)
        tl.store(box_ptr + 4 * i + 3, area, mask=m)
    else:
        Sw = tl.load(sums_ptr + 6 * i, mask=m, other=0.0).to(f64)
        St2 = tl.load(sums_ptr + 6 * i + 1, mask=m, other=0.0).to(f64)
        Stdy = tl.load(sums_ptr + 6 * i + 2, mask=m, other=0.0).to(f64)
        Sdy2 = tl.load(sums_ptr + 6 * i + 3, mask=m, other=0.0).to(f64)
        St = tl.load(sums_ptr + 6 * i + 4, mask=m, other=0.0).to(f64)
        Sdy = tl.load(sums_ptr + 6 * i + 5, mask=m, other=0.0).to(f64)

        # ---- chain rule (gauss_math.h `project_backward`)
        # pixel-level parameters (A, r, D, u, v, w)
        gr = 2.0 * A * Stdy
        gu = -2.0 * A * St
        gv = -2.0 * A * r * St - 2.0 * D * Sdy
        # (A, r, D) -> conic (A, B, C)
        iA = 1.0 / A
        gA = St2 - gr * B * iA * iA + Sdy2 * B * B * iA * iA
        gB = gr * iA - 2.0 * Sdy2 * B * iA
        gC = Sdy2
        # conic -> Sigma'_2 (K = S^-1: dL/dS = -K G K, G = [[gA, gB/2], [gB/2, gC]])
        G01 = 0.5 * gB
        KG00 = A * gA + B * G01
        KG01 = A * G01 + B * gC
        KG10 = B * gA + C * G01
        KG11 = B * G01 + C * gC
        g_a = -(KG00 * A + KG01 * B)
        g_b = -2.0 * (KG00 * B + KG01 * C)
        g_cc = -(KG10 * B + KG11 * C)
        # w = rho eta, eta = K |s0 s1 s2|, K ~ |c| c_z^-3 det2^-1/2
        g_rho = Sw * eta
        g_eta = Sw * rho
        ge = g_eta * eta                                   # dLoss/dlog(eta)
        g_det2 = -0.5 * ge / det_s
        g_a += g_det2 * cc_s
        g_cc += g_det2 * a_s
        g_b += -2.0 * g_det2 * b_s
        gL = ge / L
        gc0 = gL * x / L
        gc1 = gL * y / L
        gc2 = gL * z / L - 3.0 * ge * iz
        gk = g_eta * K * tl.where(sprod > 0.0, 1.0, tl.where(sprod < 0.0, -1.0, 0.0))  # d|s0 s1 s2|/ds_k
        gs0 = gk * s1 * s2
        gs1 = gk * s0 * s2
        gs2 = gk * s0 * s1
        # Sigma'_2 = M M^T -> dL/dM = 2 Gs M, Gs = [[g_a, g_b/2], [g_b/2, g_cc]]
        hb = 0.5 * g_b
        gM00 = 2.0 * (g_a * M00 + hb * M10)
        gM01 = 2.0 * (g_a * M01 + hb * M11)
        gM02 = 2.0 * (g_a * M02 + hb * M12)
        gM10 = 2.0 * (hb * M00 + g_cc * M10)
        gM11 = 2.0 * (hb * M01 + g_cc * M11)
        gM12 = 2.0 * (hb * M02 + g_cc * M12)
        # M = W2 V: dL/dW2 = gM V^T (V[j][k] = R[j][k] s_k)
        gW00 = gM00 * R00 * s0 + gM01 * R01 * s1 + gM02 * R02 * s2
        gW01 = gM00 * R10 * s0 + gM01 * R11 * s1 + gM02 * R12 * s2
        gW02 = gM00 * R20 * s0 + gM01 * R21 * s1 + gM02 * R22 * s2
        gW10 = gM10 * R00 * s0 + gM11 * R01 * s1 + gM12 * R02 * s2
        gW11 = gM10 * R10 * s0 + gM11 * R11 * s1 + gM12 * R12 * s2
        gW12 = gM10 * R20 * s0 + gM11 * R21 * s1 + gM12 * R22 * s2
        # W2 = J2 Rc -> the four nonzero entries of J2
        gJ00 = gW00 * C00 + gW01 * C01 + gW02 * C02
        gJ02 = gW00 * C20 + gW01 * C21 + gW02 * C22
        gJ11 = gW10 * C10 + gW11 * C11 + gW12 * C12
        gJ12 = gW10 * C20 + gW11 * C21 + gW12 * C22
        iz3 = iz2 * iz
        gc0 += -gJ02 * fx * iz2 + gu * fx * iz
        gc1 += -gJ12 * fy * iz2 + gv * fy * iz
        gc2 += (-gJ00 * fx * iz2 + 2.0 * gJ02 * fx * x * iz3 - gJ11 * fy * iz2 + 2.0 * gJ12 * fy * y * iz3
                - (gu * fx * x + gv * fy * y) * iz2)
        # c = Rc mu + T
        gmu0 = C00 * gc0 + C10 * gc1 + C20 * gc2
        gmu1 = C01 * gc0 + C11 * gc1 + C21 * gc2
        gmu2 = C02 * gc0 + C12 * gc1 + C22 * gc2
        # V = Rq diag(s): dL/dV = W2^T gM; dL/ds_k += sum_j dV[j][k] R[j][k]; dL/dR[j][k] = dV[j][k] s_k
        gV00 = W00 * gM00 + W10 * gM10
        gV01 = W00 * gM01 + W10 * gM11
        gV02 = W00 * gM02 + W10 * gM12
        gV10 = W01 * gM00 + W11 * gM10
        gV11 = W01 * gM01 + W11 * gM11
        gV12 = W01 * gM02 + W11 * gM12
        gV20 = W02 * gM00 + W12 * gM10
        gV21 = W02 * gM01 + W12 * gM11
        gV22 = W02 * gM02 + W12 * gM12
        gs0 += gV00 * R00 + gV10 * R10 + gV20 * R20
        gs1 += gV01 * R01 + gV11 * R11 + gV21 * R21
        gs2 += gV02 * R02 + gV12 * R12 + gV22 * R22
        G0 = gV00 * s0
        G1 = gV01 * s1
        G2 = gV02 * s2
        G3 = gV10 * s0
        G4 = gV11 * s1
        G5 = gV12 * s2
        G6 = gV20 * s0
        G7 = gV21 * s1
        G8 = gV22 * s2
        # rotation matrix -> normalised quaternion -> quaternion
        gqw = 2.0 * (-qz * G1 + qy * G2 + qz * G3 - qx * G5 - qy * G6 + qx * G7)
        gqx = 2.0 * (qy * G1 + qz * G2 + qy * G3 - 2.0 * qx * G4 - qw * G5 + qz * G6 + qw * G7 - 2.0 * qx * G8)
        gqy = 2.0 * (-2.0 * qy * G0 + qx * G1 + qw * G2 + qx * G3 + qz * G5 - qw * G6 + qz * G7 - 2.0 * qy * G8)
        gqz = 2.0 * (-2.0 * qz * G0 - qw * G1 + qx * G2 + qw * G3 - 2.0 * qz * G4 + qy * G5 + qx * G6 + qy * G7)
        dot = gqw * qw + gqx * qx + gqy * qy + gqz * qz
        # only visible Gaussians receive gradient (exactly zero elsewhere, never NaN)
        tl.store(gmeans_ptr + 3 * i, tl.where(visible, gmu0, 0.0).to(tl.float32), mask=m)
        tl.store(gmeans_ptr + 3 * i + 1, tl.where(visible, gmu1, 0.0).to(tl.float32), mask=m)
        tl.store(gmeans_ptr + 3 * i + 2, tl.where(visible, gmu2, 0.0).to(tl.float32), mask=m)
        tl.store(gscales_ptr + 3 * i, tl.where(visible, gs0, 0.0).to(tl.float32), mask=m)
        tl.store(gscales_ptr + 3 * i + 1, tl.where(visible, gs1, 0.0).to(tl.float32), mask=m)
        tl.store(gscales_ptr + 3 * i + 2, tl.where(visible, gs2, 0.0).to(tl.float32), mask=m)
        tl.store(grot_ptr + 4 * i, tl.where(visible, (gqw - qw * dot) / qnorm, 0.0).to(tl.float32), mask=m)
        tl.store(grot_ptr + 4 * i + 1, tl.where(visible, (gqx - qx * dot) / qnorm, 0.0).to(tl.float32), mask=m)
        tl.store(grot_ptr + 4 * i + 2, tl.where(visible, (gqy - qy * dot) / qnorm, 0.0).to(tl.float32), mask=m)
        tl.store(grot_ptr + 4 * i + 3, tl.where(visible, (gqz - qz * dot) / qnorm, 0.0).to(tl.float32), mask=m)
        tl.store(grho_ptr + i, tl.where(visible, g_rho, 0.0).to(tl.float32), mask=m)
        if HAS_M2:
            tl.store(gm2_ptr + 2 * i, tl.where(visible, gu, 0.0).to(tl.float32), mask=m)
            tl.store(gm2_ptr + 2 * i + 1, tl.where(visible, gv, 0.0).to(tl.float32), mask=m)


@triton.jit(do_not_specialize=["W"])
def _splat_kernel(prm_ptr, box_ptr, img_ptr, sums_ptr, W, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per Gaussian walks its pixel box in flat blocks of BLOCK pixels.  Forward: adds
    w exp(-q/2) into the image img_ptr.  Backward: img_ptr is dLoss/dimage; writes the six pixel sums of
    gauss_math.h (PixelSums: Sw, St2, Stdy, Sdy2, St, Sdy) to sums [P, 6]."""
    i = tl.program_id(0).to(tl.int64)
    x0 = tl.load(box_ptr + 4 * i)
    y0 = tl.load(box_ptr + 4 * i + 1)
    bw = tl.load(box_ptr + 4 * i + 2)
    area = tl.load(box_ptr + 4 * i + 3)
    u = tl.load(prm_ptr + 6 * i)
    v = tl.load(prm_ptr + 6 * i + 1)
    A = tl.load(prm_ptr + 6 * i + 2)
    r = tl.load(prm_ptr + 6 * i + 3)
    D = tl.load(prm_ptr + 6 * i + 4)
    w = tl.load(prm_ptr + 6 * i + 5)
    lanes = tl.arange(0, BLOCK)
    if not BACKWARD:
        for start in range(0, area, BLOCK):
            k = start + lanes
            px = x0 + k % bw
            py = y0 + k // bw
            dx = px.to(tl.float32) - u
            dy = py.to(tl.float32) - v
            t = dx + r * dy
            e = tl.exp(-0.5 * (A * t * t + D * dy * dy))
            tl.atomic_add(img_ptr + py.to(tl.int64) * W + px, w * e, mask=k < area, sem="relaxed")
    else:
        # lane-wise sums; s = -1/2 g w e = dLoss/dq at a pixel
        acc_w = tl.zeros([BLOCK], dtype=tl.float32)     # sum g e
        acc_tt = tl.zeros([BLOCK], dtype=tl.float32)    # sum s t^2
        acc_ty = tl.zeros([BLOCK], dtype=tl.float32)    # sum s t dy
        acc_yy = tl.zeros([BLOCK], dtype=tl.float32)    # sum s dy^2
        acc_t = tl.zeros([BLOCK], dtype=tl.float32)     # sum s t
        acc_y = tl.zeros([BLOCK], dtype=tl.float32)     # sum s dy
        for start in range(0, area, BLOCK):
            k = start + lanes
            px = x0 + k % bw
            py = y0 + k // bw
            g = tl.load(img_ptr + py.to(tl.int64) * W + px, mask=k < area, other=0.0)
            dx = px.to(tl.float32) - u
            dy = py.to(tl.float32) - v
            t = dx + r * dy
            ge = g * tl.exp(-0.5 * (A * t * t + D * dy * dy))
            sp = -0.5 * ge * w
            acc_w += ge
            acc_tt += sp * t * t
            acc_ty += sp * t * dy
            acc_yy += sp * dy * dy
            acc_t += sp * t
            acc_y += sp * dy
        tl.store(sums_ptr + 6 * i, tl.sum(acc_w, axis=0))
        tl.store(sums_ptr + 6 * i + 1, tl.sum(acc_tt, axis=0))
        tl.store(sums_ptr + 6 * i + 2, tl.sum(acc_ty, axis=0))
        tl.store(sums_ptr + 6 * i + 3, tl.sum(acc_yy, axis=0))
        tl.store(sums_ptr + 6 * i + 4, tl.sum(acc_t, axis=0))
        tl.store(sums_ptr + 6 * i + 5, tl.sum(acc_y, axis=0))


class _Raster(torch.autograd.Function):
    """(image [H, W], radii [P] int32, visible [P] bool, centres [P, 2]) of float32 Gaussians; see `rasterize`."""

    @staticmethod
    def forward(ctx, means, scales, rotations, rho, means2d, params, W: int, H: int):
        P = means.shape[0]
        dev = means.device
        image = torch.zeros(H * W, dtype=torch.float32, device=dev)
        radii = torch.empty(P, dtype=torch.int32, device=dev)
        visible = torch.empty(P, dtype=torch.int8, device=dev)
        centres = torch.empty(P, 2, dtype=torch.float32, device=dev)
        prm = torch.empty(P, 6, dtype=torch.float32, device=dev)
        box = torch.empty(P, 4, dtype=torch.int32, device=dev)
        m2 = means if means2d is None else means2d   # never read when HAS_M2 is off
        if P > 0:
            with on_device(means):
                _project_kernel[(triton.cdiv(P, PROJECT_BLOCK),)](
                    means, scales, rotations, rho, m2, params, prm, box, radii, visible, centres, prm,
                    prm, prm, prm, prm, prm, P, W, H, HAS_M2=means2d is not None, BACKWARD=False,
                    BLOCK=PROJECT_BLOCK, num_warps=4)
                _splat_kernel[(P,)](prm, box, image, prm, W, BACKWARD=False, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(means, scales, rotations, rho, m2, params, prm, box)
        ctx.size = (W, H)
        ctx.has_m2 = means2d is not None
        visible = visible.view(torch.bool)
        ctx.mark_non_differentiable(radii, visible, centres)
        return image.view(H, W), radii, visible, centres

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image, *_unused):
        means, scales, rotations, rho, m2, params, prm, box = ctx.saved_tensors
        W, H = ctx.size
        P = means.shape[0]
        g_means, g_scales = torch.empty_like(means), torch.empty_like(scales)
        g_rot, g_rho = torch.empty_like(rotations), torch.empty_like(rho)
        g_m2 = torch.empty_like(m2) if ctx.has_m2 else None
        if P > 0:
            g = grad_image.contiguous().float()
            sums = torch.empty_like(prm)
            with on_device(means):
                _splat_kernel[(P,)](prm, box, g, sums, W, BACKWARD=True, BLOCK=BLOCK, num_warps=4)
                _project_kernel[(triton.cdiv(P, PROJECT_BLOCK),)](
                    means, scales, rotations, rho, m2, params, prm, box, prm, prm, prm, sums,
                    g_means, g_scales, g_rot, g_rho, means if g_m2 is None else g_m2, P, W, H,
                    HAS_M2=ctx.has_m2, BACKWARD=True, BLOCK=PROJECT_BLOCK, num_warps=4)
        return g_means, g_scales, g_rot, g_rho, g_m2, None, None, None


def rasterize(means, scales, rotations, rho, params, W: int, H: int, means2d=None) -> RasterResult:
    """X-ray image [H, W] float32 of float32 Gaussians (means [P, 3] mm, scales [P, 3] mm, rotations [P, 4]
    (w, x, y, z), rho [P] 1/mm, means2d optional [P, 2] pixels) for the packed camera `params` [16] float64
    (R row-major, T mm, fx, fy, cx, cy pixels) of a W x H detector.  Differentiable w.r.t. all five."""
    image, radii, visible, centres = _Raster.apply(
        means.contiguous(), scales.contiguous(), rotations.contiguous(), rho.contiguous(),
        None if means2d is None else means2d.contiguous(), params.contiguous(), int(W), int(H))
    return RasterResult(image, radii, visible, centres, None)
