// Per-Gaussian geometry for the X-ray rasteriser and the voxeliser, in double precision.
//
// Written from docs/DESIGN.md ("drgs_core.render", numerical rules) and METHOD.md sections 4, 5 and 7.
// Everything here is __host__ __device__ so that it can be unit-tested on the CPU as well.
//
// Notation (one Gaussian):
//   q = (w, x, y, z) quaternion (normalised here), Rq its rotation, s the three std-devs (mm),
//   Sigma = Rq diag(s^2) Rq^T,  c = Rc mu + T (camera space, mm),  L = |c|.
//   J2 = first two rows of the EWA Jacobian: [[fx/cz, 0, -fx cx/cz^2], [0, fy/cz, -fy cy/cz^2]].
//   W2 = J2 Rc (2x3),  Sigma'2 = W2 Sigma W2^T = [[a, b], [b, cc]]  (pixel^2).
//   eta = sqrt(2 pi det Sigma' / det Sigma'2).  Since Rc is a rotation, det Sigma' = det(J)^2 det(Sigma),
//   and det J = fx fy L / cz^3 (expanding the 3x3 determinant with the unit third row c/L), so
//   eta = sqrt(2 pi) * fx fy L / cz^3 * |s0 s1 s2| / sqrt(det Sigma'2)   -- no 3x3 determinant needed.
//   conic K = Sigma'2^{-1} = [[A, B], [B, C]].
//   Stable quadratic form: q(dx, dy) = A (dx + r dy)^2 + D dy^2 with r = B / A, D = C - B r.
//   footprint half-widths hx = 3 sqrt(a), hy = 3 sqrt(cc).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DRGS_HD __host__ __device__ __forceinline__
#else
#define DRGS_HD inline
#endif

namespace drgs {

// Rotation matrix (row-major 3x3) of a unit quaternion (w, x, y, z).
DRGS_HD void quat_to_rot(const double q[4], double R[9]) {
    const double w = q[0], x = q[1], y = q[2], z = q[3];
    R[0] = 1.0 - 2.0 * (y * y + z * z);
    R[1] = 2.0 * (x * y - w * z);
    R[2] = 2.0 * (x * z + w * y);
    R[3] = 2.0 * (x * y + w * z);
    R[4] = 1.0 - 2.0 * (x * x + z * z);
    R[5] = 2.0 * (y * z - w * x);
    R[6] = 2.0 * (x * z - w * y);
    R[7] = 2.0 * (y * z + w * x);
    R[8] = 1.0 - 2.0 * (x * x + y * y);
}

// Normalise a quaternion; returns its norm (clamped away from zero).
DRGS_HD double quat_normalise(const double q[4], double qn[4]) {
    double n = sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
    n = n > 1e-12 ? n : 1e-12;
    for (int k = 0; k < 4; ++k) qn[k] = q[k] / n;
    return n;
}

// Sigma = M M^T with M = Rq diag(s).  Sym stored as full 3x3.
DRGS_HD void covariance(const double Rq[9], const double s[3], double S[9]) {
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
            double acc = 0.0;
            for (int k = 0; k < 3; ++k) acc += Rq[3 * i + k] * Rq[3 * j + k] * s[k] * s[k];
            S[3 * i + j] = acc;
        }
}

struct Camera {
    double R[9];  // world -> camera rotation, row-major
    double T[3];
    double fx, fy, cx, cy;
    int width, height;
};

// Everything the forward projection computes that the backward pass reuses.
struct Proj {
    double c[3];    // camera-space centre
    double L;       // |c|
    double W2[6];   // J2 Rc, row-major 2x3
    double V[9];    // Rq diag(s): Sigma = V V^T
    double M[6];    // W2 V (2x3): Sigma'2 = M M^T
    double Rq[9];   // rotation of the normalised quaternion
    double qn[4];   // normalised quaternion
    double qnorm;   // |q| (clamped)
    double a, b, cc, det2;   // Sigma'2 and its determinant
    double eta;
    double A, B, C;          // conic
    double r, D;             // stable form of the conic
    double u, v;             // projected centre (pixels), offset included
    double hx, hy;           // footprint half-widths (pixels)
    bool front;              // not culled by the near plane (and finite)
    bool valid;              // front, det Sigma'2 > 0, everything finite
};

DRGS_HD bool finite_d(double x) { return x == x && x - x == 0.0; }

// Forward projection of one Gaussian (DESIGN.md numerical rules).  (uoff, voff) is added to the centre.
DRGS_HD void project(const double mu[3], const double s[3], const double q[4], const Camera& cam,
                     double uoff, double voff, Proj& p) {
    p.valid = false;
    p.front = false;
    for (int i = 0; i < 3; ++i)
        p.c[i] = cam.R[3 * i] * mu[0] + cam.R[3 * i + 1] * mu[1] + cam.R[3 * i + 2] * mu[2] + cam.T[i];
    const double x = p.c[0], y = p.c[1], z = p.c[2];
    if (!(finite_d(x) && finite_d(y) && finite_d(z))) return;
    // cull: behind (or too close to) the source
    if (!(z >= 0.2 * cam.T[2])) return;
    p.front = true;
    const double iz = 1.0 / z, iz2 = iz * iz;
    p.u = cam.cx + cam.fx * x * iz + uoff;
    p.v = cam.cy + cam.fy * y * iz + voff;
    p.L = sqrt(x * x + y * y + z * z);
    p.qnorm = quat_normalise(q, p.qn);
    quat_to_rot(p.qn, p.Rq);
    for (int i = 0; i < 3; ++i)
        for (int k = 0; k < 3; ++k) p.V[3 * i + k] = p.Rq[3 * i + k] * s[k];
    const double J00 = cam.fx * iz, J02 = -cam.fx * x * iz2;
    const double J11 = cam.fy * iz, J12 = -cam.fy * y * iz2;
    for (int k = 0; k < 3; ++k) {
        p.W2[k] = J00 * cam.R[k] + J02 * cam.R[6 + k];
        p.W2[3 + k] = J11 * cam.R[3 + k] + J12 * cam.R[6 + k];
    }
    for (int rr = 0; rr < 2; ++rr)
        for (int k = 0; k < 3; ++k)
            p.M[3 * rr + k] = p.W2[3 * rr] * p.V[k] + p.W2[3 * rr + 1] * p.V[3 + k] + p.W2[3 * rr + 2] * p.V[6 + k];
    const double* m0 = p.M;
    const double* m1 = p.M + 3;
    p.a = m0[0] * m0[0] + m0[1] * m0[1] + m0[2] * m0[2];
    p.b = m0[0] * m1[0] + m0[1] * m1[1] + m0[2] * m1[2];
    p.cc = m1[0] * m1[0] + m1[1] * m1[1] + m1[2] * m1[2];
    // det Sigma'2 by Cauchy-Binet: sum of the squared 2x2 minors of M (never negative by rounding)
    const double k01 = m0[0] * m1[1] - m0[1] * m1[0];
    const double k02 = m0[0] * m1[2] - m0[2] * m1[0];
    const double k12 = m0[1] * m1[2] - m0[2] * m1[1];
    p.det2 = k01 * k01 + k02 * k02 + k12 * k12;
    if (!(p.det2 > 0.0) || !finite_d(p.det2) || !finite_d(p.u) || !finite_d(p.v)) return;
    const double sprod = fabs(s[0] * s[1] * s[2]);
    p.eta = 2.5066282746310002 * cam.fx * cam.fy * p.L * iz2 * iz * sprod / sqrt(p.det2);
    p.A = p.cc / p.det2;
    p.B = -p.b / p.det2;
    p.C = p.a / p.det2;
    p.r = p.B / p.A;
    p.D = p.C - p.B * p.r;
    p.hx = 3.0 * sqrt(p.a);
    p.hy = 3.0 * sqrt(p.cc);
    p.valid = true;
}

// Integer pixel box of the footprint, clipped to the image: pixel x is inside iff |x - u| <= hx.
// Returns false (and an empty box) when no pixel centre of the image lies in it.
DRGS_HD bool pixel_box(const Proj& p, int W, int H, int& x0, int& y0, int& x1, int& y1) {
    x0 = 0; y0 = 0; x1 = -1; y1 = -1;
    if (!p.valid) return false;
    const double fx0 = fmax(ceil(p.u - p.hx), 0.0);
    const double fx1 = fmin(floor(p.u + p.hx), (double)(W - 1));
    const double fy0 = fmax(ceil(p.v - p.hy), 0.0);
    const double fy1 = fmin(floor(p.v + p.hy), (double)(H - 1));
    if (!(fx0 <= fx1) || !(fy0 <= fy1)) return false;
    x0 = (int)fx0; x1 = (int)fx1; y0 = (int)fy0; y1 = (int)fy1;
    return true;
}

// Radius reported for density control: ceil(max(hx, hy)), clamped to int range.
DRGS_HD int pixel_radius(const Proj& p) {
    double m = fmax(p.hx, p.hy);
    m = ceil(m);
    if (!(m < 1e9)) m = 1e9;
    return (int)m;
}

// Gradients of one Gaussian's parameters from the per-Gaussian pixel sums.
//   Sw = sum_p g_p e_p                 (dLoss/dw, w = rho eta)
//   with s_p = -0.5 g_p w e_p  (dLoss/dq at pixel p), t = dx + r dy, dx = x - u, dy = y - v:
//   St2 = sum s t^2, Stdy = sum s t dy, Sdy2 = sum s dy^2, St = sum s t, Sdy = sum s dy.
struct PixelSums {
    double Sw, St2, Stdy, Sdy2, St, Sdy;
};

struct GaussGrad {
    double mu[3], s[3], q[4], rho, u, v;
};

DRGS_HD void project_backward(const double mu[3], const double s[3], const double q[4], double rho,
                              const Camera& cam, const Proj& p, const PixelSums& ps, GaussGrad& g) {
    for (int k = 0; k < 3; ++k) { g.mu[k] = 0.0; g.s[k] = 0.0; }
    for (int k = 0; k < 4; ++k) g.q[k] = 0.0;
    g.rho = 0.0; g.u = 0.0; g.v = 0.0;
    if (!p.valid) return;
    (void)mu;
    // --- pixel-level parameters (A, r, D, u, v, w)
    const double gA_ = ps.St2;
    const double gr = 2.0 * p.A * ps.Stdy;
    const double gD = ps.Sdy2;
    g.u = -2.0 * p.A * ps.St;
    g.v = -2.0 * p.A * p.r * ps.St - 2.0 * p.D * ps.Sdy;
    const double gw = ps.Sw;
    // --- (A, r, D) -> conic (A, B, C); B is the off-diagonal scalar
    const double iA = 1.0 / p.A;
    const double gA = gA_ - gr * p.B * iA * iA + gD * p.B * p.B * iA * iA;
    const double gB = gr * iA - 2.0 * gD * p.B * iA;
    const double gC = gD;
    // --- conic -> Sigma'2 via K = M^{-1}: dL/dM = -K G K with G = [[gA, gB/2], [gB/2, gC]]
    const double G00 = gA, G01 = 0.5 * gB, G11 = gC;
    const double KG00 = p.A * G00 + p.B * G01, KG01 = p.A * G01 + p.B * G11;
    const double KG10 = p.B * G00 + p.C * G01, KG11 = p.B * G01 + p.C * G11;
    double H00 = -(KG00 * p.A + KG01 * p.B);
    double H01 = -(KG00 * p.B + KG01 * p.C);
    double H11 = -(KG10 * p.B + KG11 * p.C);
    double g_a = H00, g_cc = H11, g_b = 2.0 * H01;
    // --- eta = K0 L cz^-3 |s0 s1 s2| det2^-1/2 ;  w = rho eta
    g.rho = gw * p.eta;
    const double g_eta = gw * rho;
    const double ge = g_eta * p.eta;        // d/dlog(eta)
    const double g_det2 = -0.5 * ge / p.det2;
    g_a += g_det2 * p.cc;
    g_cc += g_det2 * p.a;
    g_b += -2.0 * g_det2 * p.b;
    double gc[3] = {0.0, 0.0, 0.0};
    const double x = p.c[0], y = p.c[1], z = p.c[2];
    const double iz = 1.0 / z, iz2 = iz * iz, iz3 = iz2 * iz;
    const double gL = ge / p.L;
    gc[0] += gL * x / p.L;
    gc[1] += gL * y / p.L;
    gc[2] += gL * z / p.L - 3.0 * ge * iz;
    double gs[3];
    for (int k = 0; k < 3; ++k) gs[k] = ge / s[k];   // d log|s0 s1 s2| / ds_k = 1 / s_k
    // --- Sigma'2 = M M^T, Gs = [[g_a, g_b/2], [g_b/2, g_cc]]  ->  dL/dM = 2 Gs M
    const double Gs00 = g_a, Gs01 = 0.5 * g_b, Gs11 = g_cc;
    double gM[6];
    for (int k = 0; k < 3; ++k) {
        gM[k] = 2.0 * (Gs00 * p.M[k] + Gs01 * p.M[3 + k]);
        gM[3 + k] = 2.0 * (Gs01 * p.M[k] + Gs11 * p.M[3 + k]);
    }
    // M = W2 V: dL/dW2 = gM V^T, dL/dV = W2^T gM
    double gW[6];
    for (int rr = 0; rr < 2; ++rr)
        for (int j = 0; j < 3; ++j)
            gW[3 * rr + j] = gM[3 * rr] * p.V[3 * j] + gM[3 * rr + 1] * p.V[3 * j + 1] + gM[3 * rr + 2] * p.V[3 * j + 2];
    // W2 = J2 Rc  ->  dL/dJ2 = dL/dW2 Rc^T (only the four nonzero entries of J2 matter)
    const double gJ00 = gW[0] * cam.R[0] + gW[1] * cam.R[1] + gW[2] * cam.R[2];
    const double gJ02 = gW[0] * cam.R[6] + gW[1] * cam.R[7] + gW[2] * cam.R[8];
    const double gJ11 = gW[3] * cam.R[3] + gW[4] * cam.R[4] + gW[5] * cam.R[5];
    const double gJ12 = gW[3] * cam.R[6] + gW[4] * cam.R[7] + gW[5] * cam.R[8];
    gc[0] += -gJ02 * cam.fx * iz2;
    gc[1] += -gJ12 * cam.fy * iz2;
    gc[2] += -gJ00 * cam.fx * iz2 + 2.0 * gJ02 * cam.fx * x * iz3 - gJ11 * cam.fy * iz2 + 2.0 * gJ12 * cam.fy * y * iz3;
    // projected centre
    gc[0] += g.u * cam.fx * iz;
    gc[1] += g.v * cam.fy * iz;
    gc[2] += -(g.u * cam.fx * x + g.v * cam.fy * y) * iz2;
    // c = Rc mu + T
    for (int k = 0; k < 3; ++k) g.mu[k] = cam.R[k] * gc[0] + cam.R[3 + k] * gc[1] + cam.R[6 + k] * gc[2];
    // --- V = Rq diag(s): dL/dV = W2^T gM
    double gRq[9];
    for (int j = 0; j < 3; ++j)
        for (int k = 0; k < 3; ++k) {
            const double gV = p.W2[j] * gM[k] + p.W2[3 + j] * gM[3 + k];
            gs[k] += gV * p.Rq[3 * j + k];
            gRq[3 * j + k] = gV * s[k];
        }
    for (int k = 0; k < 3; ++k) g.s[k] = gs[k];
    // --- rotation matrix -> normalised quaternion
    const double w_ = p.qn[0], x_ = p.qn[1], y_ = p.qn[2], z_ = p.qn[3];
    const double* G = gRq;
    double gqn[4];
    gqn[0] = 2.0 * (-z_ * G[1] + y_ * G[2] + z_ * G[3] - x_ * G[5] - y_ * G[6] + x_ * G[7]);
    gqn[1] = 2.0 * (y_ * G[1] + z_ * G[2] + y_ * G[3] - 2.0 * x_ * G[4] - w_ * G[5] + z_ * G[6] + w_ * G[7] - 2.0 * x_ * G[8]);
    gqn[2] = 2.0 * (-2.0 * y_ * G[0] + x_ * G[1] + w_ * G[2] + x_ * G[3] + z_ * G[5] - w_ * G[6] + z_ * G[7] - 2.0 * y_ * G[8]);
    gqn[3] = 2.0 * (-2.0 * z_ * G[0] - w_ * G[1] + x_ * G[2] + w_ * G[3] - 2.0 * z_ * G[4] + y_ * G[5] + x_ * G[6] + y_ * G[7]);
    // --- normalisation q -> q / |q|
    const double dot = gqn[0] * w_ + gqn[1] * x_ + gqn[2] * y_ + gqn[3] * z_;
    for (int k = 0; k < 4; ++k) g.q[k] = (gqn[k] - p.qn[k] * dot) / p.qnorm;
}

// ---------------------------------------------------------------------------------------------
// Voxeliser: V(x) = sum_i rho_i exp(-1/2 (x - mu)^T Sigma^{-1} (x - mu)).  With Sigma = Rq diag(s^2) Rq^T,
// (x - mu)^T Sigma^{-1} (x - mu) = sum_k (Rq[:, k] . (x - mu) / s_k)^2, which is free of cancellation.
// Box rule: voxel centre x contributes iff |x_d - mu_d| <= 3 sqrt(Sigma_dd) for every axis d.
struct VoxPrep {
    double m[9];    // row k = Rq[:, k] / s_k
    double half[3]; // 3 sqrt(Sigma_dd)
};

DRGS_HD void voxel_prep(const double s[3], const double q[4], VoxPrep& vp) {
    double qn[4], Rq[9];
    quat_normalise(q, qn);
    quat_to_rot(qn, Rq);
    for (int k = 0; k < 3; ++k)
        for (int d = 0; d < 3; ++d) vp.m[3 * k + d] = Rq[3 * d + k] / s[k];
    for (int d = 0; d < 3; ++d) {
        double v = 0.0;
        for (int k = 0; k < 3; ++k) v += Rq[3 * d + k] * Rq[3 * d + k] * s[k] * s[k];
        vp.half[d] = 3.0 * sqrt(v);
    }
}

// Index range [i0, i1] of voxel centres o + i * sp (i in 0..n-1) with |centre - mu| <= half.
DRGS_HD bool voxel_range(double mu, double half, double o, double sp, int n, int& i0, int& i1) {
    const double lo = fmax(ceil((mu - half - o) / sp), 0.0);
    const double hi = fmin(floor((mu + half - o) / sp), (double)(n - 1));
    i0 = 0; i1 = -1;
    if (!(lo <= hi)) return false;
    i0 = (int)lo; i1 = (int)hi;
    return true;
}

}  // namespace drgs
