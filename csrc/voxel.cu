// Voxelisation of 3D Gaussians (METHOD.md section 7, DESIGN.md box rule):
//   V(x) = sum_i rho_i exp(-1/2 (x - mu_i)^T Sigma_i^{-1} (x - mu_i)) at voxel centres x, where voxel x counts
//   for Gaussian i iff |x_d - mu_d| <= 3 sqrt(Sigma_dd) on every axis d.  Gaussians with a scale <= 0, a zero
//   quaternion or non-finite parameters contribute nothing.
//
// Same binning scheme as the rasteriser, in 3D: per-Gaussian voxel boxes (double precision), one
// (brick, Gaussian) pair per touched 8x8x8 brick, stable radix sort by brick, then one block per brick and
// one thread per voxel; no atomics, so the result is deterministic.
#include "gauss_math.h"
#include "kernels.h"

namespace drgs {

namespace {

constexpr int BRICK = kVoxelBrick;
constexpr int BRICK_VOXELS = BRICK * BRICK * BRICK;
constexpr int BATCH = 128;

// prm: 16 doubles per Gaussian: mu (3), rho, m (9, row k = Rq[:, k] / s_k), 3 unused.  The quadratic form is
// evaluated in double precision: for thin Gaussians (s_min << s_max) y_k = m_k . (x - mu) cancels strongly and
// float32 would lose several digits.  vbox: 2 int4: (i0, j0, k0, 0), (i1, j1, k1, 0).
__global__ void voxel_prep_kernel(int P, const float* __restrict__ means, const float* __restrict__ scales,
                                  const float* __restrict__ rots, const float* __restrict__ rho, VoxelGridArgs ga,
                                  double* __restrict__ prm, int4* __restrict__ vbox, int* __restrict__ touched) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= P) return;
    double mu[3], s[3], q[4];
    bool ok = true;
    for (int k = 0; k < 3; ++k) {
        mu[k] = (double)means[3 * i + k];
        s[k] = (double)scales[3 * i + k];
        ok = ok && finite_d(mu[k]) && finite_d(s[k]) && s[k] > 0.0;
    }
    double qn2 = 0.0;
    for (int k = 0; k < 4; ++k) {
        q[k] = (double)rots[4 * i + k];
        ok = ok && finite_d(q[k]);
        qn2 += q[k] * q[k];
    }
    ok = ok && qn2 > 0.0;
    int lo[3] = {0, 0, 0}, hi[3] = {-1, -1, -1};
    VoxPrep vp;
    if (ok) {
        voxel_prep(s, q, vp);
        for (int d = 0; d < 3 && ok; ++d)
            ok = finite_d(vp.half[d]) && voxel_range(mu[d], vp.half[d], ga.o[d], ga.sp[d], ga.n[d], lo[d], hi[d]);
    }
    if (!ok) {
        for (int k = 0; k < 16; ++k) prm[16 * i + k] = 0.0;
        vbox[2 * i] = make_int4(0, 0, 0, 0);
        vbox[2 * i + 1] = make_int4(-1, -1, -1, 0);
        touched[i] = 0;
        return;
    }
    double* o = prm + 16 * i;
    o[0] = mu[0]; o[1] = mu[1]; o[2] = mu[2]; o[3] = (double)rho[i];
    for (int k = 0; k < 9; ++k) o[4 + k] = vp.m[k];
    o[13] = 0.0; o[14] = 0.0; o[15] = 0.0;
    vbox[2 * i] = make_int4(lo[0], lo[1], lo[2], 0);
    vbox[2 * i + 1] = make_int4(hi[0], hi[1], hi[2], 0);
    touched[i] = (hi[0] / BRICK - lo[0] / BRICK + 1) * (hi[1] / BRICK - lo[1] / BRICK + 1) *
                 (hi[2] / BRICK - lo[2] / BRICK + 1);
}

__global__ void emit_brick_pairs_kernel(int P, const int4* __restrict__ vbox, const int* __restrict__ counts,
                                        const int64_t* __restrict__ offsets, VoxelGridArgs ga, int* __restrict__ keys,
                                        int* __restrict__ vals) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= P) return;
    const int n = counts[i];
    if (n == 0) return;
    int64_t o = offsets[i] - n;
    const int4 lo = vbox[2 * i], hi = vbox[2 * i + 1];
    for (int bx = lo.x / BRICK; bx <= hi.x / BRICK; ++bx)
        for (int by = lo.y / BRICK; by <= hi.y / BRICK; ++by)
            for (int bz = lo.z / BRICK; bz <= hi.z / BRICK; ++bz) {
                keys[o] = (bx * ga.nb[1] + by) * ga.nb[2] + bz;
                vals[o] = i;
                ++o;
            }
}

__global__ void __launch_bounds__(BRICK_VOXELS)
voxel_render_kernel(VoxelGridArgs ga, const int2* __restrict__ ranges, const int* __restrict__ ids,
                    const double2* __restrict__ prm, const int4* __restrict__ vbox, float* __restrict__ volume) {
    __shared__ double2 s_p[BATCH][8];
    __shared__ int4 s_lo[BATCH], s_hi[BATCH];
    // brick index: z fastest
    int b = blockIdx.x;
    const int bz = b % ga.nb[2];
    b /= ga.nb[2];
    const int by = b % ga.nb[1];
    const int bx = b / ga.nb[1];
    const int tid = threadIdx.x;
    const int k = bz * BRICK + (tid % BRICK);
    const int j = by * BRICK + ((tid / BRICK) % BRICK);
    const int i = bx * BRICK + tid / (BRICK * BRICK);
    const double x = ga.o[0] + i * ga.sp[0];
    const double y = ga.o[1] + j * ga.sp[1];
    const double z = ga.o[2] + k * ga.sp[2];
    const int2 range = ranges[blockIdx.x];
    float acc = 0.f;
    for (int base = range.x; base < range.y; base += BATCH) {
        __syncthreads();
        const int n = min(BATCH, range.y - base);
        for (int t = tid; t < 8 * n; t += BRICK_VOXELS) {
            const int g = ids[base + t / 8];
            s_p[t / 8][t % 8] = prm[8 * g + (t % 8)];
        }
        for (int t = tid; t < n; t += BRICK_VOXELS) {
            const int g = ids[base + t];
            s_lo[t] = vbox[2 * g];
            s_hi[t] = vbox[2 * g + 1];
        }
        __syncthreads();
        for (int t = 0; t < n; ++t) {
            const int4 lo = s_lo[t], hi = s_hi[t];
            if (i < lo.x || i > hi.x || j < lo.y || j > hi.y || k < lo.z || k > hi.z) continue;
            const double2 a0 = s_p[t][0], a1 = s_p[t][1], a2 = s_p[t][2], a3 = s_p[t][3];
            const double2 a4 = s_p[t][4], a5 = s_p[t][5], a6 = s_p[t][6];
            // a0 = (mu_x, mu_y), a1 = (mu_z, rho), a2..a6 = m00 m01 | m02 m10 | m11 m12 | m20 m21 | m22 -
            const double dx = x - a0.x, dy = y - a0.y, dz = z - a1.x;
            const double y0 = fma(a2.x, dx, fma(a2.y, dy, a3.x * dz));
            const double y1 = fma(a3.y, dx, fma(a4.x, dy, a4.y * dz));
            const double y2 = fma(a5.x, dx, fma(a5.y, dy, a6.x * dz));
            const float q = (float)fma(y0, y0, fma(y1, y1, y2 * y2));
            acc = fmaf((float)a1.y, __expf(-0.5f * q), acc);
        }
    }
    if (i < ga.n[0] && j < ga.n[1] && k < ga.n[2])
        volume[((int64_t)i * ga.n[1] + j) * ga.n[2] + k] = acc;
}

}  // namespace

static unsigned grid_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads > 0 ? (n + threads - 1) / threads : 1); }

cudaError_t voxel_preprocess(int P, const float* means, const float* scales, const float* rots, const float* rho,
                             VoxelGridArgs ga, double* prm, int* vbox, int* touched, cudaStream_t stream) {
    if (P == 0) return cudaSuccess;
    voxel_prep_kernel<<<grid_for(P, 128), 128, 0, stream>>>(P, means, scales, rots, rho, ga, prm,
                                                            reinterpret_cast<int4*>(vbox), touched);
    return cudaGetLastError();
}

cudaError_t voxel_emit_pairs(int P, const int* vbox, const int* counts, const int64_t* offsets, VoxelGridArgs ga,
                             int* keys, int* vals, cudaStream_t stream) {
    if (P == 0) return cudaSuccess;
    emit_brick_pairs_kernel<<<grid_for(P, 128), 128, 0, stream>>>(P, reinterpret_cast<const int4*>(vbox), counts,
                                                                  offsets, ga, keys, vals);
    return cudaGetLastError();
}

cudaError_t voxel_render(VoxelGridArgs ga, int64_t n_bricks, const int* ranges, const int* ids, const double* prm,
                         const int* vbox, float* volume, cudaStream_t stream) {
    if (n_bricks == 0) return cudaSuccess;
    voxel_render_kernel<<<(unsigned)n_bricks, BRICK_VOXELS, 0, stream>>>(
        ga, reinterpret_cast<const int2*>(ranges), ids, reinterpret_cast<const double2*>(prm),
        reinterpret_cast<const int4*>(vbox), volume);
    return cudaGetLastError();
}

}  // namespace drgs
