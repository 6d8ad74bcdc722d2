// Binning helpers shared by the rasteriser and the voxeliser: stable key sort (CUB) and key ranges.
#include <cub/cub.cuh>

#include "kernels.h"

namespace drgs {

size_t sort_pairs_temp_bytes(int n, int bits) {
    size_t bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const int*)nullptr, (int*)nullptr, (const int*)nullptr,
                                    (int*)nullptr, n, 0, bits);
    return bytes;
}

cudaError_t sort_pairs(void* temp, size_t temp_bytes, const int* keys_in, int* keys_out, const int* vals_in,
                       int* vals_out, int n, int bits, cudaStream_t stream) {
    return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, vals_in, vals_out, n, 0, bits,
                                           stream);
}

namespace {
__global__ void key_ranges_kernel(const int* __restrict__ keys, int64_t n, int n_keys, int2* __restrict__ ranges) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int k = keys[i];
    if (k >= n_keys) return;
    if (i == 0 || keys[i - 1] != k) ranges[k].x = (int)i;
    if (i == n - 1 || keys[i + 1] != k) ranges[k].y = (int)(i + 1);
}
}  // namespace

cudaError_t key_ranges(const int* sorted_keys, int64_t n, int n_keys, int* ranges, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    const unsigned blocks = (unsigned)((n + 255) / 256);
    key_ranges_kernel<<<blocks, 256, 0, stream>>>(sorted_keys, n, n_keys, reinterpret_cast<int2*>(ranges));
    return cudaGetLastError();
}

}  // namespace drgs
