// Cone-beam X-ray rasterisation of 3D Gaussians (METHOD.md section 5, DESIGN.md numerical rules).
//
// Forward (no compositing: contributions add, so their order does not matter):
//   1. preprocess: one thread per Gaussian, double precision (gauss_math.h): projected centre, conic,
//      weight w = rho * eta, clipped pixel box of the 3-sigma footprint, radii, visibility, tiles touched.
//   2. prefix sum of tiles touched; emit one (tile, Gaussian) pair per touched 16x16 tile into a pair list
//      of fixed capacity (padding keys sort last; pairs beyond the capacity are dropped and the caller sees
//      total > capacity), so that no launch depends on a count read back by the host.
//   3. stable radix sort of the pairs by tile; [first, last) range of every tile.
//   4. render: one block per tile, one thread per pixel; the tile's Gaussians are staged through shared
//      memory in batches of 256 and every pixel adds w exp(-q/2) of those whose box holds it.
//
// Backward (deterministic, no atomics), over the forward's unsorted pair list, where the pairs of one
// Gaussian are contiguous:
//   1. one warp per (tile, Gaussian) pair evaluates the per-pixel terms of the tile's part of the Gaussian's
//      box against dLoss/dimage and reduces the six pixel sums of gauss_math.h (PixelSums) over the warp;
//      one row of partial sums per pair;
//   2. one thread per Gaussian adds its pairs' partial sums (fixed order) and runs the double-precision
//      chain rule through the projection (project_backward) to means, scales, quaternions, rho and the
//      projected centre (the means2d gradient).
#include <algorithm>

#include "gauss_math.h"
#include "kernels.h"

namespace drgs {

namespace {

constexpr int TILE = kRasterTile;
constexpr int TILE_PIXELS = TILE * TILE;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ Camera load_camera(const RasterCam& a) {
    Camera c;
#pragma unroll
    for (int k = 0; k < 9; ++k) c.R[k] = a.params[k];
#pragma unroll
    for (int k = 0; k < 3; ++k) c.T[k] = a.params[9 + k];
    c.fx = a.params[12]; c.fy = a.params[13]; c.cx = a.params[14]; c.cy = a.params[15];
    c.width = a.width; c.height = a.height;
    return c;
}

__device__ __forceinline__ void load_gaussian(int i, const float* means, const float* scales, const float* rots,
                                              double mu[3], double s[3], double q[4]) {
#pragma unroll
    for (int k = 0; k < 3; ++k) {
        mu[k] = (double)means[3 * i + k];
        s[k] = (double)scales[3 * i + k];
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) q[k] = (double)rots[4 * i + k];
}

// geom per Gaussian: float4 (u, v, A, r), float2 (D, w); box: int4 (x0, y0, x1, y1), empty when x1 < x0.
__global__ void preprocess_kernel(int P, const float* __restrict__ means, const float* __restrict__ scales,
                                  const float* __restrict__ rots, const float* __restrict__ rho,
                                  const float* __restrict__ uvoff, RasterCam cam_args,
                                  float4* __restrict__ geom0, float2* __restrict__ geom1, int4* __restrict__ box,
                                  int* __restrict__ radii, bool* __restrict__ visible, float* __restrict__ centres,
                                  int* __restrict__ tiles_touched) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= P) return;
    const Camera cam = load_camera(cam_args);
    double mu[3], s[3], q[4];
    load_gaussian(i, means, scales, rots, mu, s, q);
    const double uo = uvoff ? (double)uvoff[2 * i] : 0.0;
    const double vo = uvoff ? (double)uvoff[2 * i + 1] : 0.0;
    Proj p;
    project(mu, s, q, cam, uo, vo, p);
    int x0, y0, x1, y1;
    const bool vis = pixel_box(p, cam.width, cam.height, x0, y0, x1, y1);
    centres[2 * i] = p.front ? (float)p.u : 0.f;
    centres[2 * i + 1] = p.front ? (float)p.v : 0.f;
    visible[i] = vis;
    radii[i] = vis ? pixel_radius(p) : 0;
    box[i] = make_int4(x0, y0, x1, y1);
    if (vis) {
        geom0[i] = make_float4((float)p.u, (float)p.v, (float)p.A, (float)p.r);
        geom1[i] = make_float2((float)p.D, (float)((double)rho[i] * p.eta));
        tiles_touched[i] = (x1 / TILE - x0 / TILE + 1) * (y1 / TILE - y0 / TILE + 1);
    } else {
        geom0[i] = make_float4(0.f, 0.f, 0.f, 0.f);
        geom1[i] = make_float2(0.f, 0.f);
        tiles_touched[i] = 0;
    }
}

__global__ void emit_tile_pairs_kernel(int P, const int4* __restrict__ box, const int* __restrict__ counts,
                                       const int64_t* __restrict__ offsets, int tiles_x, int64_t capacity,
                                       int* __restrict__ keys, int* __restrict__ vals) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= P) return;
    const int n = counts[i];
    if (n == 0) return;
    int64_t o = offsets[i] - n;
    if (o >= capacity) return;
    const int4 b = box[i];
    for (int ty = b.y / TILE; ty <= b.w / TILE; ++ty)
        for (int tx = b.x / TILE; tx <= b.z / TILE; ++tx) {
            if (o >= capacity) return;
            keys[o] = ty * tiles_x + tx;
            vals[o] = i;
            ++o;
        }
}

__global__ void __launch_bounds__(TILE_PIXELS)
render_kernel(int width, int height, int tiles_x, const int2* __restrict__ ranges, const int* __restrict__ ids,
              const float4* __restrict__ geom0, const float2* __restrict__ geom1, const int4* __restrict__ box,
              float* __restrict__ image) {
    __shared__ float4 s_g0[TILE_PIXELS];
    __shared__ float2 s_g1[TILE_PIXELS];
    __shared__ int4 s_box[TILE_PIXELS];
    const int tile = blockIdx.y * tiles_x + blockIdx.x;
    const int tid = threadIdx.y * TILE + threadIdx.x;
    const int px = blockIdx.x * TILE + threadIdx.x;
    const int py = blockIdx.y * TILE + threadIdx.y;
    const int2 range = ranges[tile];
    const float fx = (float)px, fy = (float)py;
    float acc = 0.f;
    for (int base = range.x; base < range.y; base += TILE_PIXELS) {
        __syncthreads();
        const int k = base + tid;
        if (k < range.y) {
            const int g = ids[k];
            s_g0[tid] = geom0[g];
            s_g1[tid] = geom1[g];
            s_box[tid] = box[g];
        }
        __syncthreads();
        const int n = min(TILE_PIXELS, range.y - base);
        for (int j = 0; j < n; ++j) {
            const int4 b = s_box[j];
            if (px < b.x || px > b.z || py < b.y || py > b.w) continue;
            const float4 g0 = s_g0[j];
            const float2 g1 = s_g1[j];
            const float dx = fx - g0.x, dy = fy - g0.y;
            const float t = fmaf(g0.w, dy, dx);
            const float q = fmaf(g0.z * t, t, g1.x * dy * dy);
            acc = fmaf(g1.y, __expf(-0.5f * q), acc);
        }
    }
    if (px < width && py < height) image[py * width + px] = acc;
}

// ---------------------------------------------------------------- backward
// A grid-stride loop of warps over the stored pairs; partial[c] = the six PixelSums of pair c (double).
__global__ void backward_pairs_kernel(int64_t capacity, const int64_t* __restrict__ total, int tiles_x, int width,
                                      const float* __restrict__ grad_image, const int* __restrict__ keys,
                                      const int* __restrict__ vals, const float4* __restrict__ geom0,
                                      const float2* __restrict__ geom1, const int4* __restrict__ box,
                                      double* __restrict__ partial) {
    const int lane = threadIdx.x & 31;
    const int64_t n = min(*total, capacity);
    const int64_t n_warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; c < n; c += n_warps) {
        const int tile = keys[c];
        const int g = vals[c];
        const float4 g0 = geom0[g];
        const float2 g1 = geom1[g];
        const int4 b = box[g];
        // The pixels of the tile inside the box (the box is already clipped to the image).
        const int tx0 = (tile % tiles_x) * TILE, ty0 = (tile / tiles_x) * TILE;
        const int x0 = max(b.x, tx0), y0 = max(b.y, ty0);
        const int bw = min(b.z, tx0 + TILE - 1) - x0 + 1;
        const int area = bw * (min(b.w, ty0 + TILE - 1) - y0 + 1);
        const float A = g0.z, r = g0.w, D = g1.x, w = g1.y;
        double Sw = 0.0, St2 = 0.0, Stdy = 0.0, Sdy2 = 0.0, St = 0.0, Sdy = 0.0;
        for (int idx = lane; idx < area; idx += 32) {
            const int x = x0 + idx % bw, y = y0 + idx / bw;
            const float gi = grad_image[(int64_t)y * width + x];
            const float dx = (float)x - g0.x, dy = (float)y - g0.y;
            const float t = fmaf(r, dy, dx);
            const float e = __expf(-0.5f * fmaf(A * t, t, D * dy * dy));
            const float ge = gi * e;
            const double sp = -0.5 * (double)(ge * w);
            Sw += (double)ge;
            St2 += sp * (double)(t * t);
            Stdy += sp * (double)(t * dy);
            Sdy2 += sp * (double)(dy * dy);
            St += sp * (double)t;
            Sdy += sp * (double)dy;
        }
        Sw = warp_sum(Sw);
        St2 = warp_sum(St2);
        Stdy = warp_sum(Stdy);
        Sdy2 = warp_sum(Sdy2);
        St = warp_sum(St);
        Sdy = warp_sum(Sdy);
        if (lane == 0) {
            double* o = partial + 6 * c;
            o[0] = Sw; o[1] = St2; o[2] = Stdy; o[3] = Sdy2; o[4] = St; o[5] = Sdy;
        }
    }
}

__global__ void backward_gaussians_kernel(int P, const float* __restrict__ means, const float* __restrict__ scales,
                                          const float* __restrict__ rots, const float* __restrict__ rho,
                                          const float* __restrict__ uvoff, RasterCam cam_args,
                                          const int* __restrict__ counts, const int64_t* __restrict__ offsets,
                                          int64_t capacity, const double* __restrict__ partial,
                                          float* __restrict__ g_means,
                                          float* __restrict__ g_scales, float* __restrict__ g_rots,
                                          float* __restrict__ g_rho, float* __restrict__ g_uv) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= P) return;
    const int n = counts[i];
    GaussGrad gg;
    for (int k = 0; k < 3; ++k) { gg.mu[k] = 0.0; gg.s[k] = 0.0; }
    for (int k = 0; k < 4; ++k) gg.q[k] = 0.0;
    gg.rho = 0.0; gg.u = 0.0; gg.v = 0.0;
    if (n > 0) {
        PixelSums ps{0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        const int64_t o = offsets[i] - n;
        const int64_t end = min(offsets[i], capacity);  // pairs past the capacity were never stored
        for (int64_t c = o; c < end; ++c) {
            const double* pp = partial + 6 * c;
            ps.Sw += pp[0]; ps.St2 += pp[1]; ps.Stdy += pp[2]; ps.Sdy2 += pp[3]; ps.St += pp[4]; ps.Sdy += pp[5];
        }
        const Camera cam = load_camera(cam_args);
        double mu[3], s[3], q[4];
        load_gaussian(i, means, scales, rots, mu, s, q);
        const double uo = uvoff ? (double)uvoff[2 * i] : 0.0;
        const double vo = uvoff ? (double)uvoff[2 * i + 1] : 0.0;
        Proj p;
        project(mu, s, q, cam, uo, vo, p);
        project_backward(mu, s, q, (double)rho[i], cam, p, ps, gg);
    }
    for (int k = 0; k < 3; ++k) {
        g_means[3 * i + k] = (float)gg.mu[k];
        g_scales[3 * i + k] = (float)gg.s[k];
    }
    for (int k = 0; k < 4; ++k) g_rots[4 * i + k] = (float)gg.q[k];
    g_rho[i] = (float)gg.rho;
    g_uv[2 * i] = (float)gg.u;
    g_uv[2 * i + 1] = (float)gg.v;
}

}  // namespace

static unsigned grid_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads > 0 ? (n + threads - 1) / threads : 1); }

cudaError_t raster_preprocess(int P, const float* means, const float* scales, const float* rots, const float* rho,
                              const float* uvoff, RasterCam cam, float* geom0, float* geom1, int* box, int* radii,
                              bool* visible, float* centres, int* tiles_touched, cudaStream_t stream) {
    if (P == 0) return cudaSuccess;
    preprocess_kernel<<<grid_for(P, 128), 128, 0, stream>>>(
        P, means, scales, rots, rho, uvoff, cam, reinterpret_cast<float4*>(geom0), reinterpret_cast<float2*>(geom1),
        reinterpret_cast<int4*>(box), radii, visible, centres, tiles_touched);
    return cudaGetLastError();
}

cudaError_t raster_emit_pairs(int P, const int* box, const int* touched, const int64_t* offsets, int tiles_x,
                              int64_t capacity, int* keys, int* vals, cudaStream_t stream) {
    if (P == 0 || capacity == 0) return cudaSuccess;
    emit_tile_pairs_kernel<<<grid_for(P, 128), 128, 0, stream>>>(P, reinterpret_cast<const int4*>(box), touched,
                                                                 offsets, tiles_x, capacity, keys, vals);
    return cudaGetLastError();
}

cudaError_t raster_render(int width, int height, const int* ranges, const int* ids, const float* geom0,
                          const float* geom1, const int* box, float* image, cudaStream_t stream) {
    const int tiles_x = (width + TILE - 1) / TILE, tiles_y = (height + TILE - 1) / TILE;
    dim3 grid(tiles_x, tiles_y), block(TILE, TILE);
    render_kernel<<<grid, block, 0, stream>>>(width, height, tiles_x, reinterpret_cast<const int2*>(ranges), ids,
                                              reinterpret_cast<const float4*>(geom0),
                                              reinterpret_cast<const float2*>(geom1),
                                              reinterpret_cast<const int4*>(box), image);
    return cudaGetLastError();
}

cudaError_t raster_backward_pairs(int64_t capacity, const int64_t* total, int tiles_x, int width,
                                  const float* grad_image, const int* keys, const int* vals, const float* geom0,
                                  const float* geom1, const int* box, double* partial, cudaStream_t stream) {
    if (capacity == 0) return cudaSuccess;
    // Enough resident warps to fill the device; the loop covers the rest without a host-side count.
    int device = 0, sms = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const int threads = 256;
    const unsigned blocks = std::min<unsigned>(grid_for(capacity * 32, threads), (unsigned)std::max(sms, 1) * 16u);
    backward_pairs_kernel<<<blocks, threads, 0, stream>>>(
        capacity, total, tiles_x, width, grad_image, keys, vals, reinterpret_cast<const float4*>(geom0),
        reinterpret_cast<const float2*>(geom1), reinterpret_cast<const int4*>(box), partial);
    return cudaGetLastError();
}

cudaError_t raster_backward_gaussians(int P, const float* means, const float* scales, const float* rots,
                                      const float* rho, const float* uvoff, RasterCam cam, const int* touched,
                                      const int64_t* offsets, int64_t capacity, const double* partial,
                                      float* g_means, float* g_scales, float* g_rots, float* g_rho, float* g_uv,
                                      cudaStream_t stream) {
    if (P == 0) return cudaSuccess;
    backward_gaussians_kernel<<<grid_for(P, 128), 128, 0, stream>>>(P, means, scales, rots, rho, uvoff, cam, touched,
                                                                    offsets, capacity, partial, g_means, g_scales,
                                                                    g_rots, g_rho, g_uv);
    return cudaGetLastError();
}

}  // namespace drgs
