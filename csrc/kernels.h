// Plain launchers of the drgs_core._C kernels (no torch types here, so the .cu files compile quickly).
// The torch-facing wrappers, argument checks and allocation live in ops.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace drgs {

constexpr int kRasterTile = 16;      // rasteriser tile edge (pixels)
constexpr int kVoxelBrick = 8;       // voxeliser brick edge (voxels)

// Camera parameters live in device memory (16 doubles: R row-major world -> camera, T mm, fx, fy, cx, cy
// pixels) so that one captured CUDA graph can render any view: only the buffer's contents change.
struct RasterCam {
    const double* params;
    int width, height;
};

// ---- binning helpers (sort.cu)
size_t sort_pairs_temp_bytes(int n, int bits);
cudaError_t sort_pairs(void* temp, size_t temp_bytes, const int* keys_in, int* keys_out, const int* vals_in,
                       int* vals_out, int n, int bits, cudaStream_t stream);
// ranges: int2 per key, must be zeroed; receives [first, last) of each key < n_keys in the sorted keys
// (keys >= n_keys are padding and are ignored).
cudaError_t key_ranges(const int* sorted_keys, int64_t n, int n_keys, int* ranges, cudaStream_t stream);

// ---- rasteriser (raster.cu).  geom0: float4 (u, v, A, r); geom1: float2 (D, w); box: int4 (x0, y0, x1, y1).
// The (tile, Gaussian) pair list has a fixed capacity; `total` (device) is the number of pairs wanted, of
// which min(total, capacity) are stored: the pairs of Gaussian i are [offsets[i] - touched[i], offsets[i]).
cudaError_t raster_preprocess(int P, const float* means, const float* scales, const float* rots, const float* rho,
                              const float* uvoff, RasterCam cam, float* geom0, float* geom1, int* box, int* radii,
                              bool* visible, float* centres, int* tiles_touched, cudaStream_t stream);
cudaError_t raster_emit_pairs(int P, const int* box, const int* touched, const int64_t* offsets, int tiles_x,
                              int64_t capacity, int* keys, int* vals, cudaStream_t stream);
cudaError_t raster_render(int width, int height, const int* ranges, const int* ids, const float* geom0,
                          const float* geom1, const int* box, float* image, cudaStream_t stream);
cudaError_t raster_backward_pairs(int64_t capacity, const int64_t* total, int tiles_x, int width,
                                  const float* grad_image, const int* keys, const int* vals, const float* geom0,
                                  const float* geom1, const int* box, double* partial, cudaStream_t stream);
cudaError_t raster_backward_gaussians(int P, const float* means, const float* scales, const float* rots,
                                      const float* rho, const float* uvoff, RasterCam cam, const int* touched,
                                      const int64_t* offsets, int64_t capacity, const double* partial,
                                      float* g_means, float* g_scales, float* g_rots, float* g_rho, float* g_uv,
                                      cudaStream_t stream);

// ---- voxeliser (voxel.cu)
struct VoxelGridArgs {
    double o[3];   // first voxel centre (mm)
    double sp[3];  // spacing (mm)
    int n[3];      // voxels per axis
    int nb[3];     // bricks per axis
};
// prm: 16 doubles per Gaussian; vbox: 8 ints per Gaussian.
cudaError_t voxel_preprocess(int P, const float* means, const float* scales, const float* rots, const float* rho,
                             VoxelGridArgs ga, double* prm, int* vbox, int* touched, cudaStream_t stream);
cudaError_t voxel_emit_pairs(int P, const int* vbox, const int* counts, const int64_t* offsets, VoxelGridArgs ga,
                             int* keys, int* vals, cudaStream_t stream);
cudaError_t voxel_render(VoxelGridArgs ga, int64_t n_bricks, const int* ranges, const int* ids, const double* prm,
                         const int* vbox, float* volume, cudaStream_t stream);

// ---- hash-grid encoding (hashgrid.cu)
constexpr int kHashMaxLevels = 32;
struct HashMeta {
    int n_levels;
    uint32_t table_size;
    int res[kHashMaxLevels];
    int hashed[kHashMaxLevels];
    int64_t offset[kHashMaxLevels];
};
cudaError_t hash_forward(int64_t P, int D, int F, const HashMeta& meta, const float* x, const float* table,
                         float* out, cudaStream_t stream);
cudaError_t hash_backward(int64_t P, int D, int F, const HashMeta& meta, const float* x, const float* table,
                          const float* grad_out, float* grad_table, float* grad_x, cudaStream_t stream);

}  // namespace drgs
