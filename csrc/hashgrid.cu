// Multiresolution hash-grid encoding, forward and backward, for D = 1..4 input dimensions.
//
// Indexing follows drgs_core/model/hashgrid.py (the reference) bit for bit:
//   x   = clamp(x, 0, 1);  s = x * N_l (float32);  c = clamp(floor(s), 0, N_l - 1);  f = s - c
//   corner b in {0,1}^D (bit d of the corner number = b_d), vertex v = c + b
//   direct level:  row = offset_l + sum_d v_d (N_l + 1)^d
//   hashed level:  row = offset_l + (XOR_d (uint32(v_d) * uint32(pi_d))) mod T,  pi = (1, 2654435761, 805459861,
//                  3674653429), all products modulo 2^32
//   weight w_b = prod_d (b_d ? f_d : 1 - f_d), multiplied in the order d = 0, 1, ...
//   out[p, l*F + k] = sum_b w_b table[row_b, k]
// Backward: d table[row_b, k] += w_b * g[p, l*F + k] (atomicAdd), and, when asked,
//   d x_d += N_l sum_b (sum_k g_k table[row_b, k]) dw_b/df_d   for 0 <= x_d <= 1 (zero outside: the clamp).
// Forward: one thread per (point, level), level fastest.  Backward: see hash_backward_kernel.
#include "kernels.h"

namespace drgs {

namespace {

template <int D>
struct Cell {
    int c[D];
    float f[D];
};

template <int D>
__device__ __forceinline__ void locate(const float* __restrict__ xp, int N, Cell<D>& cell, bool& inside) {
    inside = true;
    const float fN = (float)N;
#pragma unroll
    for (int d = 0; d < D; ++d) {
        float x = xp[d];
        inside = inside && (x >= 0.f) && (x <= 1.f);
        x = fminf(fmaxf(x, 0.f), 1.f);
        const float s = __fmul_rn(x, fN);
        int c = (int)floorf(s);
        c = max(c, 0);
        c = min(c, N - 1);
        cell.c[d] = c;
        cell.f[d] = __fsub_rn(s, (float)c);
    }
}

template <int D>
__device__ __forceinline__ int64_t corner_row(const Cell<D>& cell, int corner, int N, bool hashed, uint32_t T,
                                              int64_t offset) {
    const uint32_t primes[4] = {1u, 2654435761u, 805459861u, 3674653429u};
    if (hashed) {
        uint32_t h = 0;
#pragma unroll
        for (int d = 0; d < D; ++d) {
            const uint32_t v = (uint32_t)(cell.c[d] + ((corner >> d) & 1));
            h ^= v * primes[d];
        }
        return offset + (int64_t)(h % T);
    }
    int64_t idx = 0, stride = 1;
#pragma unroll
    for (int d = 0; d < D; ++d) {
        idx += (int64_t)(cell.c[d] + ((corner >> d) & 1)) * stride;
        stride *= (int64_t)(N + 1);
    }
    return offset + idx;
}

template <int D>
__device__ __forceinline__ float corner_weight(const Cell<D>& cell, int corner) {
    float w = ((corner & 1) ? cell.f[0] : __fsub_rn(1.f, cell.f[0]));
#pragma unroll
    for (int d = 1; d < D; ++d) {
        const float wd = ((corner >> d) & 1) ? cell.f[d] : __fsub_rn(1.f, cell.f[d]);
        w = __fmul_rn(wd, w);
    }
    return w;
}

template <int D, int F>
__global__ void hash_forward_kernel(int64_t P, HashMeta meta, const float* __restrict__ x,
                                    const float* __restrict__ table, float* __restrict__ out) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int L = meta.n_levels;
    if (tid >= P * L) return;
    const int64_t p = tid / L;
    const int l = (int)(tid - p * L);
    const int N = meta.res[l];
    Cell<D> cell;
    bool inside;
    locate<D>(x + p * D, N, cell, inside);
    float acc[F];
#pragma unroll
    for (int k = 0; k < F; ++k) acc[k] = 0.f;
#pragma unroll
    for (int corner = 0; corner < (1 << D); ++corner) {
        const int64_t row = corner_row<D>(cell, corner, N, meta.hashed[l], meta.table_size, meta.offset[l]);
        const float w = corner_weight<D>(cell, corner);
        const float* tr = table + row * F;
        if constexpr (F == 2) {
            const float2 v = __ldg(reinterpret_cast<const float2*>(tr));
            acc[0] = fmaf(w, v.x, acc[0]);
            acc[1] = fmaf(w, v.y, acc[1]);
        } else {
#pragma unroll
            for (int k = 0; k < F; ++k) acc[k] = fmaf(w, __ldg(tr + k), acc[k]);
        }
    }
    float* o = out + p * (int64_t)(L * F) + (int64_t)l * F;
#pragma unroll
    for (int k = 0; k < F; ++k) o[k] = acc[k];
}

// Backward, one block row per level (blockIdx.y = level - level_base), grid-stride over points.
// Small levels (rows * F <= kSmallLevelFloats, the coarse direct levels where every point hits the same few
// rows) accumulate the table gradient in shared memory first and flush it with one global atomic per non-zero
// entry and block: this removes the contention of thousands of threads adding into a handful of addresses.
constexpr int kSmallLevelFloats = 8192;  // 32 KB of shared memory

template <int D, int F, bool SMALL>
__global__ void hash_backward_kernel(int64_t P, HashMeta meta, int level_base, const float* __restrict__ x,
                                     const float* __restrict__ table, const float* __restrict__ grad_out,
                                     float* __restrict__ grad_table, float* __restrict__ grad_x) {
    extern __shared__ float s_acc[];
    const int L = meta.n_levels;
    const int l = level_base + blockIdx.y;
    const int N = meta.res[l];
    const bool hashed = meta.hashed[l];
    const int64_t offset = meta.offset[l];
    int64_t rows = meta.table_size;
    if (!hashed) {
        rows = 1;
        for (int d = 0; d < D; ++d) rows *= (int64_t)(N + 1);
    }
    if (SMALL) {
        for (int i = threadIdx.x; i < rows * F; i += blockDim.x) s_acc[i] = 0.f;
        __syncthreads();
    }
    const bool want_x = grad_x != nullptr;
    const bool want_t = grad_table != nullptr;
    for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < P; p += (int64_t)gridDim.x * blockDim.x) {
        Cell<D> cell;
        bool inside;
        locate<D>(x + p * D, N, cell, inside);
        float g[F];
        const float* go = grad_out + p * (int64_t)(L * F) + (int64_t)l * F;
#pragma unroll
        for (int k = 0; k < F; ++k) g[k] = go[k];
        float gx[D];
#pragma unroll
        for (int d = 0; d < D; ++d) gx[d] = 0.f;
#pragma unroll
        for (int corner = 0; corner < (1 << D); ++corner) {
            const int64_t row = corner_row<D>(cell, corner, N, hashed, meta.table_size, offset);
            if (want_t) {
                const float w = corner_weight<D>(cell, corner);
                if (SMALL) {
                    float* dst = s_acc + (row - offset) * F;
#pragma unroll
                    for (int k = 0; k < F; ++k) atomicAdd(dst + k, w * g[k]);
                } else {
#pragma unroll
                    for (int k = 0; k < F; ++k) atomicAdd(grad_table + row * F + k, w * g[k]);
                }
            }
            if (want_x) {
                float dot = 0.f;
#pragma unroll
                for (int k = 0; k < F; ++k) dot = fmaf(g[k], __ldg(table + row * F + k), dot);
#pragma unroll
                for (int d = 0; d < D; ++d) {
                    // dw/df_d = (+1 or -1) * prod_{e != d} (b_e ? f_e : 1 - f_e)
                    float w = ((corner >> d) & 1) ? 1.f : -1.f;
#pragma unroll
                    for (int e = 0; e < D; ++e) {
                        if (e == d) continue;
                        w *= ((corner >> e) & 1) ? cell.f[e] : 1.f - cell.f[e];
                    }
                    gx[d] = fmaf(dot, w, gx[d]);
                }
            }
        }
        if (want_x) {
            // the clamp passes gradient only where 0 <= x_d <= 1
            const float* xp = x + p * D;
#pragma unroll
            for (int d = 0; d < D; ++d)
                if (inside || (xp[d] >= 0.f && xp[d] <= 1.f)) atomicAdd(grad_x + p * D + d, gx[d] * (float)N);
        }
    }
    if (SMALL && want_t) {
        __syncthreads();
        float* dst = grad_table + offset * F;
        for (int i = threadIdx.x; i < rows * F; i += blockDim.x) {
            const float v = s_acc[i];
            if (v != 0.f) atomicAdd(dst + i, v);
        }
    }
}

template <int D>
cudaError_t launch_forward(int64_t P, const HashMeta& meta, int F, const float* x, const float* table, float* out,
                           cudaStream_t stream) {
    const int threads = 256;
    const int64_t n = P * meta.n_levels;
    const unsigned blocks = (unsigned)((n + threads - 1) / threads);
    switch (F) {
        case 1: hash_forward_kernel<D, 1><<<blocks, threads, 0, stream>>>(P, meta, x, table, out); break;
        case 2: hash_forward_kernel<D, 2><<<blocks, threads, 0, stream>>>(P, meta, x, table, out); break;
        case 4: hash_forward_kernel<D, 4><<<blocks, threads, 0, stream>>>(P, meta, x, table, out); break;
        case 8: hash_forward_kernel<D, 8><<<blocks, threads, 0, stream>>>(P, meta, x, table, out); break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

template <int D, int F>
cudaError_t launch_backward_f(int64_t P, const HashMeta& meta, const float* x, const float* table, const float* go,
                              float* gt, float* gx, cudaStream_t stream) {
    // levels are ordered by resolution, so the small ones form a prefix
    int n_small = 0;
    for (int l = 0; l < meta.n_levels; ++l) {
        int64_t rows = meta.table_size;
        if (!meta.hashed[l]) {
            rows = 1;
            for (int d = 0; d < D; ++d) rows *= (int64_t)(meta.res[l] + 1);
        }
        if (rows * F <= kSmallLevelFloats && n_small == l) ++n_small;
    }
    const int threads = 256;
    const int64_t point_blocks = (P + threads - 1) / threads;
    if (n_small > 0) {
        int max_floats = 0;
        for (int l = 0; l < n_small; ++l) {
            int64_t rows = meta.table_size;
            if (!meta.hashed[l]) {
                rows = 1;
                for (int d = 0; d < D; ++d) rows *= (int64_t)(meta.res[l] + 1);
            }
            max_floats = (int)(rows * F > max_floats ? rows * F : max_floats);
        }
        dim3 grid((unsigned)(point_blocks < 64 ? point_blocks : 64), (unsigned)n_small);
        hash_backward_kernel<D, F, true><<<grid, threads, (size_t)max_floats * sizeof(float), stream>>>(
            P, meta, 0, x, table, go, gt, gx);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    if (n_small < meta.n_levels) {
        const int64_t cap = 65535LL * 8;  // grid-stride beyond this many blocks per level
        dim3 grid((unsigned)(point_blocks < cap ? point_blocks : cap), (unsigned)(meta.n_levels - n_small));
        hash_backward_kernel<D, F, false><<<grid, threads, 0, stream>>>(P, meta, n_small, x, table, go, gt, gx);
    }
    return cudaGetLastError();
}

template <int D>
cudaError_t launch_backward(int64_t P, const HashMeta& meta, int F, const float* x, const float* table,
                            const float* go, float* gt, float* gx, cudaStream_t stream) {
    switch (F) {
        case 1: return launch_backward_f<D, 1>(P, meta, x, table, go, gt, gx, stream);
        case 2: return launch_backward_f<D, 2>(P, meta, x, table, go, gt, gx, stream);
        case 4: return launch_backward_f<D, 4>(P, meta, x, table, go, gt, gx, stream);
        case 8: return launch_backward_f<D, 8>(P, meta, x, table, go, gt, gx, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace

cudaError_t hash_forward(int64_t P, int D, int F, const HashMeta& meta, const float* x, const float* table,
                         float* out, cudaStream_t stream) {
    if (P == 0) return cudaSuccess;
    switch (D) {
        case 1: return launch_forward<1>(P, meta, F, x, table, out, stream);
        case 2: return launch_forward<2>(P, meta, F, x, table, out, stream);
        case 3: return launch_forward<3>(P, meta, F, x, table, out, stream);
        case 4: return launch_forward<4>(P, meta, F, x, table, out, stream);
        default: return cudaErrorInvalidValue;
    }
}

cudaError_t hash_backward(int64_t P, int D, int F, const HashMeta& meta, const float* x, const float* table,
                          const float* grad_out, float* grad_table, float* grad_x, cudaStream_t stream) {
    if (P == 0 || (grad_table == nullptr && grad_x == nullptr)) return cudaSuccess;
    switch (D) {
        case 1: return launch_backward<1>(P, meta, F, x, table, grad_out, grad_table, grad_x, stream);
        case 2: return launch_backward<2>(P, meta, F, x, table, grad_out, grad_table, grad_x, stream);
        case 3: return launch_backward<3>(P, meta, F, x, table, grad_out, grad_table, grad_x, stream);
        case 4: return launch_backward<4>(P, meta, F, x, table, grad_out, grad_table, grad_x, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace drgs
