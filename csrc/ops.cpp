// Torch-facing operations and Python bindings of drgs_core._C.
//
// Built by setup.py (CUDAExtension "drgs_core._C") or JIT-compiled by drgs_core/cuda/_backend.py.  The kernels live in
// the .cu files behind kernels.h; this file checks arguments, allocates outputs (optionally poisoned with
// NaN / sentinel values so that tests can see unwritten elements) and sequences the launches on the current
// stream.  Python-side autograd wrappers: drgs_core/cuda/_wrapper.py.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "kernels.h"

namespace drgs {
namespace {

#define DRGS_CHECK_CUDA_TENSOR(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define DRGS_CHECK_INPUT(x)                                                      \
    DRGS_CHECK_CUDA_TENSOR(x);                                                   \
    TORCH_CHECK((x).is_contiguous(), #x " must be contiguous");                  \
    TORCH_CHECK((x).scalar_type() == torch::kFloat32, #x " must be float32")
#define DRGS_CUDA(call) C10_CUDA_CHECK(call)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int key_bits(int64_t n) {
    int bits = 1;
    while ((int64_t(1) << bits) < n) ++bits;
    return bits;
}

// Inclusive prefix sum of int32 counts into int64 offsets; returns the total (one device -> host sync).
int64_t inclusive_offsets(const torch::Tensor& counts, torch::Tensor& offsets) {
    offsets = counts.cumsum(0, torch::kInt64);
    if (offsets.numel() == 0) return 0;
    return offsets[-1].item<int64_t>();
}

// Stable sort of (key, value) int32 pairs by key, then ranges[key] = [first, last) (ranges zeroed first);
// keys >= n_keys are padding: they sort last and get no range.
torch::Tensor sort_and_range(const torch::Tensor& keys, const torch::Tensor& vals, int64_t n_keys,
                             torch::Tensor& ranges, cudaStream_t stream) {
    const int64_t n = keys.numel();
    TORCH_CHECK(n < (int64_t(1) << 31) - 1, "too many (bin, Gaussian) pairs for one sort: ", n);
    auto keys_out = torch::empty_like(keys);
    auto vals_out = torch::empty_like(vals);
    const int bits = key_bits(n_keys + 1);
    const size_t bytes = sort_pairs_temp_bytes((int)n, bits);
    auto temp = torch::empty({(int64_t)bytes + 16}, keys.options().dtype(torch::kUInt8));
    DRGS_CUDA(sort_pairs(temp.data_ptr(), bytes, keys.data_ptr<int>(), keys_out.data_ptr<int>(), vals.data_ptr<int>(),
                         vals_out.data_ptr<int>(), (int)n, bits, stream));
    DRGS_CUDA(key_ranges(keys_out.data_ptr<int>(), n, (int)n_keys, ranges.data_ptr<int>(), stream));
    return vals_out;
}

void check_gaussians(const torch::Tensor& means, const torch::Tensor& scales, const torch::Tensor& rotations,
                     const torch::Tensor& rho) {
    DRGS_CHECK_INPUT(means);
    DRGS_CHECK_INPUT(scales);
    DRGS_CHECK_INPUT(rotations);
    DRGS_CHECK_INPUT(rho);
    const int64_t P = means.size(0);
    TORCH_CHECK(means.dim() == 2 && means.size(1) == 3, "means must be [P, 3]");
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == P && scales.size(1) == 3, "scales must be [P, 3]");
    TORCH_CHECK(rotations.dim() == 2 && rotations.size(0) == P && rotations.size(1) == 4, "rotations must be [P, 4]");
    TORCH_CHECK(rho.dim() == 1 && rho.size(0) == P, "rho must be [P]");
    TORCH_CHECK(P < (int64_t(1) << 31), "too many Gaussians");
}

void check_camera(const torch::Tensor& means, const torch::Tensor& uvoff, const torch::Tensor& camera,
                  int64_t width, int64_t height) {
    if (uvoff.numel() > 0) {
        DRGS_CHECK_INPUT(uvoff);
        TORCH_CHECK(uvoff.dim() == 2 && uvoff.size(0) == means.size(0) && uvoff.size(1) == 2, "means2d must be [P, 2]");
    }
    DRGS_CHECK_CUDA_TENSOR(camera);
    TORCH_CHECK(camera.is_contiguous() && camera.scalar_type() == torch::kFloat64 && camera.numel() == 16,
                "camera must be a contiguous float64 [16] tensor (R row-major, T, fx, fy, cx, cy)");
    TORCH_CHECK(width > 0 && height > 0 && width * height < (int64_t(1) << 31), "bad image size");
}

}  // namespace

// capacity > 0: the pair list holds that many pairs and nothing waits for the GPU (CUDA-graph safe); the
// returned n_pairs (device) says how many were wanted, and n_pairs > capacity means contributions were
// dropped.  capacity <= 0: the list is sized exactly, at the cost of one device -> host sync.
std::vector<torch::Tensor> raster_forward(torch::Tensor means, torch::Tensor scales, torch::Tensor rotations,
                                          torch::Tensor rho, torch::Tensor uvoff, torch::Tensor camera, int64_t width,
                                          int64_t height, int64_t capacity, bool poison) {
    check_gaussians(means, scales, rotations, rho);
    check_camera(means, uvoff, camera, width, height);
    const c10::cuda::OptionalCUDAGuard guard(means.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int P = (int)means.size(0);
    auto f32 = means.options();
    auto i32 = means.options().dtype(torch::kInt32);
    auto image = torch::empty({height, width}, f32);
    auto radii = torch::empty({P}, i32);
    auto visible = torch::empty({P}, means.options().dtype(torch::kBool));
    auto centres = torch::empty({P, 2}, f32);
    auto geom0 = torch::empty({P, 4}, f32);
    auto geom1 = torch::empty({P, 2}, f32);
    auto box = torch::empty({P, 4}, i32);
    auto touched = torch::empty({P}, i32);
    if (poison) {
        image.fill_(NAN);
        centres.fill_(NAN);
        radii.fill_(-7);
        geom0.fill_(NAN);
        geom1.fill_(NAN);
        box.fill_(-7);
        touched.fill_(-7);
    }
    const int tiles_x = (int)ceil_div(width, kRasterTile), tiles_y = (int)ceil_div(height, kRasterTile);
    const int64_t n_tiles = (int64_t)tiles_x * tiles_y;
    RasterCam cam{camera.data_ptr<double>(), (int)width, (int)height};
    const float* uv = uvoff.numel() > 0 ? uvoff.data_ptr<float>() : nullptr;
    DRGS_CUDA(raster_preprocess(P, means.data_ptr<float>(), scales.data_ptr<float>(), rotations.data_ptr<float>(),
                                rho.data_ptr<float>(), uv, cam, geom0.data_ptr<float>(), geom1.data_ptr<float>(),
                                box.data_ptr<int>(), radii.data_ptr<int>(), visible.data_ptr<bool>(),
                                centres.data_ptr<float>(), touched.data_ptr<int>(), stream));
    torch::Tensor offsets = touched.cumsum(0, torch::kInt64);
    torch::Tensor n_pairs = P > 0 ? offsets[-1] : torch::zeros({}, means.options().dtype(torch::kInt64));
    if (capacity <= 0) capacity = n_pairs.item<int64_t>();
    // Unused slots keep the padding key n_tiles, which sorts after every tile and gets no range.
    auto keys = torch::full({capacity}, (int)n_tiles, i32);
    auto vals = torch::empty({capacity}, i32);
    auto ranges = torch::zeros({n_tiles, 2}, i32);
    torch::Tensor ids;
    if (capacity > 0) {
        DRGS_CUDA(raster_emit_pairs(P, box.data_ptr<int>(), touched.data_ptr<int>(), offsets.data_ptr<int64_t>(),
                                    tiles_x, capacity, keys.data_ptr<int>(), vals.data_ptr<int>(), stream));
        ids = sort_and_range(keys, vals, n_tiles, ranges, stream);
    }
    DRGS_CUDA(raster_render((int)width, (int)height, ranges.data_ptr<int>(), capacity > 0 ? ids.data_ptr<int>() : nullptr,
                            geom0.data_ptr<float>(), geom1.data_ptr<float>(), box.data_ptr<int>(),
                            image.data_ptr<float>(), stream));
    return {image, radii, visible, centres, geom0, geom1, box, touched, offsets, keys, vals, n_pairs};
}

// keys / vals / offsets / touched / n_pairs: the forward's unsorted pair list (see raster_forward).
std::vector<torch::Tensor> raster_backward(torch::Tensor grad_image, torch::Tensor means, torch::Tensor scales,
                                           torch::Tensor rotations, torch::Tensor rho, torch::Tensor uvoff,
                                           torch::Tensor camera, int64_t width, int64_t height, torch::Tensor geom0,
                                           torch::Tensor geom1, torch::Tensor box, torch::Tensor touched,
                                           torch::Tensor offsets, torch::Tensor keys, torch::Tensor vals,
                                           torch::Tensor n_pairs, bool poison) {
    check_gaussians(means, scales, rotations, rho);
    check_camera(means, uvoff, camera, width, height);
    DRGS_CHECK_INPUT(grad_image);
    TORCH_CHECK(grad_image.dim() == 2 && grad_image.size(0) == height && grad_image.size(1) == width,
                "grad_image must be [H, W]");
    const c10::cuda::OptionalCUDAGuard guard(means.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int P = (int)means.size(0);
    const int64_t capacity = keys.numel();
    TORCH_CHECK(geom0.numel() == 4 * (int64_t)P && geom1.numel() == 2 * (int64_t)P && box.numel() == 4 * (int64_t)P &&
                    touched.numel() == P && offsets.numel() == P && vals.numel() == capacity && n_pairs.numel() == 1,
                "saved forward buffers do not match the Gaussians");
    auto f32 = means.options();
    auto g_means = torch::empty({P, 3}, f32);
    auto g_scales = torch::empty({P, 3}, f32);
    auto g_rots = torch::empty({P, 4}, f32);
    auto g_rho = torch::empty({P}, f32);
    auto g_uv = torch::empty({P, 2}, f32);
    if (poison) {
        for (auto* t : {&g_means, &g_scales, &g_rots, &g_rho, &g_uv}) t->fill_(NAN);
    }
    if (P == 0) return {g_means, g_scales, g_rots, g_rho, g_uv};
    auto partial = torch::empty({std::max<int64_t>(capacity, 1), 6}, means.options().dtype(torch::kFloat64));
    if (poison) partial.fill_(NAN);
    const int tiles_x = (int)ceil_div(width, kRasterTile);
    DRGS_CUDA(raster_backward_pairs(capacity, n_pairs.data_ptr<int64_t>(), tiles_x, (int)width,
                                    grad_image.data_ptr<float>(), keys.data_ptr<int>(), vals.data_ptr<int>(),
                                    geom0.data_ptr<float>(), geom1.data_ptr<float>(), box.data_ptr<int>(),
                                    partial.data_ptr<double>(), stream));
    RasterCam cam{camera.data_ptr<double>(), (int)width, (int)height};
    const float* uv = uvoff.numel() > 0 ? uvoff.data_ptr<float>() : nullptr;
    DRGS_CUDA(raster_backward_gaussians(P, means.data_ptr<float>(), scales.data_ptr<float>(),
                                        rotations.data_ptr<float>(), rho.data_ptr<float>(), uv, cam,
                                        touched.data_ptr<int>(), offsets.data_ptr<int64_t>(), capacity,
                                        partial.data_ptr<double>(), g_means.data_ptr<float>(),
                                        g_scales.data_ptr<float>(), g_rots.data_ptr<float>(), g_rho.data_ptr<float>(),
                                        g_uv.data_ptr<float>(), stream));
    return {g_means, g_scales, g_rots, g_rho, g_uv};
}

torch::Tensor voxelize_forward(torch::Tensor means, torch::Tensor scales, torch::Tensor rotations, torch::Tensor rho,
                               std::vector<double> origin, std::vector<double> spacing, std::vector<int64_t> shape,
                               bool poison) {
    check_gaussians(means, scales, rotations, rho);
    TORCH_CHECK(origin.size() == 3 && spacing.size() == 3 && shape.size() == 3, "origin/spacing/shape need 3 values");
    const c10::cuda::OptionalCUDAGuard guard(means.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int P = (int)means.size(0);
    VoxelGridArgs ga;
    int64_t n_bricks = 1;
    for (int d = 0; d < 3; ++d) {
        TORCH_CHECK(shape[d] > 0 && shape[d] < (int64_t(1) << 30) && spacing[d] > 0, "bad grid shape or spacing");
        ga.o[d] = origin[d];
        ga.sp[d] = spacing[d];
        ga.n[d] = (int)shape[d];
        ga.nb[d] = (int)ceil_div(shape[d], kVoxelBrick);
        n_bricks *= ga.nb[d];
    }
    TORCH_CHECK(n_bricks < (int64_t(1) << 31), "grid too large");
    auto f32 = means.options();
    auto i32 = means.options().dtype(torch::kInt32);
    auto volume = torch::empty({shape[0], shape[1], shape[2]}, f32);
    if (poison) volume.fill_(NAN);
    auto prm = torch::empty({P, 16}, means.options().dtype(torch::kFloat64));
    auto vbox = torch::empty({P, 8}, i32);
    auto touched = torch::empty({P}, i32);
    DRGS_CUDA(voxel_preprocess(P, means.data_ptr<float>(), scales.data_ptr<float>(), rotations.data_ptr<float>(),
                               rho.data_ptr<float>(), ga, prm.data_ptr<double>(), vbox.data_ptr<int>(),
                               touched.data_ptr<int>(), stream));
    torch::Tensor offsets;
    const int64_t n_pairs = P > 0 ? inclusive_offsets(touched, offsets) : 0;
    auto ranges = torch::zeros({n_bricks, 2}, i32);
    torch::Tensor ids;
    if (n_pairs > 0) {
        auto keys = torch::empty({n_pairs}, i32);
        auto vals = torch::empty({n_pairs}, i32);
        DRGS_CUDA(voxel_emit_pairs(P, vbox.data_ptr<int>(), touched.data_ptr<int>(), offsets.data_ptr<int64_t>(), ga,
                                   keys.data_ptr<int>(), vals.data_ptr<int>(), stream));
        ids = sort_and_range(keys, vals, n_bricks, ranges, stream);
    }
    DRGS_CUDA(voxel_render(ga, n_bricks, ranges.data_ptr<int>(), n_pairs > 0 ? ids.data_ptr<int>() : nullptr,
                           prm.data_ptr<double>(), vbox.data_ptr<int>(), volume.data_ptr<float>(), stream));
    return volume;
}

namespace {
HashMeta make_meta(const std::vector<int64_t>& res, const std::vector<int64_t>& offsets,
                   const std::vector<int64_t>& hashed, int64_t table_size, int64_t n_rows) {
    TORCH_CHECK(res.size() == offsets.size() && res.size() == hashed.size(), "level metadata lengths differ");
    TORCH_CHECK(!res.empty() && (int)res.size() <= kHashMaxLevels, "1..", kHashMaxLevels, " levels supported");
    TORCH_CHECK(table_size > 0 && table_size <= (int64_t(1) << 31), "table size out of range");
    HashMeta m;
    m.n_levels = (int)res.size();
    m.table_size = (uint32_t)table_size;
    for (int l = 0; l < m.n_levels; ++l) {
        TORCH_CHECK(res[l] >= 1 && res[l] < (int64_t(1) << 30), "level resolution out of range");
        TORCH_CHECK(offsets[l] >= 0 && offsets[l] <= n_rows, "level offset out of range");
        m.res[l] = (int)res[l];
        m.hashed[l] = hashed[l] ? 1 : 0;
        m.offset[l] = offsets[l];
    }
    for (int l = m.n_levels; l < kHashMaxLevels; ++l) {
        m.res[l] = 1;
        m.hashed[l] = 0;
        m.offset[l] = 0;
    }
    return m;
}

void check_hash_inputs(const torch::Tensor& x, const torch::Tensor& table) {
    DRGS_CHECK_INPUT(x);
    DRGS_CHECK_INPUT(table);
    TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1 && x.size(1) <= 4, "x must be [P, D] with D in 1..4");
    TORCH_CHECK(table.dim() == 2, "table must be [rows, F]");
    const int64_t F = table.size(1);
    TORCH_CHECK(F == 1 || F == 2 || F == 4 || F == 8, "n_features must be 1, 2, 4 or 8");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(table.data_ptr()) % (F * 4 >= 8 ? 8 : 4) == 0, "table must be aligned");
}
}  // namespace

torch::Tensor hashgrid_forward(torch::Tensor x, torch::Tensor table, std::vector<int64_t> res,
                               std::vector<int64_t> offsets, std::vector<int64_t> hashed, int64_t table_size,
                               bool poison) {
    check_hash_inputs(x, table);
    const c10::cuda::OptionalCUDAGuard guard(x.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const HashMeta meta = make_meta(res, offsets, hashed, table_size, table.size(0));
    const int64_t P = x.size(0);
    const int D = (int)x.size(1);
    const int F = (int)table.size(1);
    auto out = torch::empty({P, (int64_t)meta.n_levels * F}, x.options());
    if (poison) out.fill_(NAN);
    DRGS_CUDA(hash_forward(P, D, F, meta, x.data_ptr<float>(), table.data_ptr<float>(), out.data_ptr<float>(), stream));
    return out;
}

std::vector<torch::Tensor> hashgrid_backward(torch::Tensor grad_out, torch::Tensor x, torch::Tensor table,
                                             std::vector<int64_t> res, std::vector<int64_t> offsets,
                                             std::vector<int64_t> hashed, int64_t table_size, bool need_table,
                                             bool need_x) {
    check_hash_inputs(x, table);
    DRGS_CHECK_INPUT(grad_out);
    const c10::cuda::OptionalCUDAGuard guard(x.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const HashMeta meta = make_meta(res, offsets, hashed, table_size, table.size(0));
    const int64_t P = x.size(0);
    const int D = (int)x.size(1);
    const int F = (int)table.size(1);
    TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == P && grad_out.size(1) == (int64_t)meta.n_levels * F,
                "grad_out must be [P, L*F]");
    torch::Tensor gt = need_table ? torch::zeros_like(table) : torch::empty({0}, table.options());
    torch::Tensor gx = need_x ? torch::zeros_like(x) : torch::empty({0}, x.options());
    DRGS_CUDA(hash_backward(P, D, F, meta, x.data_ptr<float>(), table.data_ptr<float>(), grad_out.data_ptr<float>(),
                            need_table ? gt.data_ptr<float>() : nullptr, need_x ? gx.data_ptr<float>() : nullptr,
                            stream));
    return {gt, gx};
}

}  // namespace drgs

// Bumped whenever an op's signature or semantics change (checked by drgs_core/cuda/_backend.py).
static const int kAbiVersion = 2;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "DRGS4D CUDA kernels: X-ray Gaussian rasteriser, voxeliser, hash-grid encoding";
    m.attr("ABI_VERSION") = kAbiVersion;
    m.def("raster_forward", &drgs::raster_forward,
          "image, radii, visible, centres, geom0, geom1, box, touched, offsets, keys, vals, n_pairs = "
          "raster_forward(means, scales, rotations, rho, means2d_or_empty, camera[16] float64, width, height, "
          "pair_capacity (<= 0: exact), poison)");
    m.def("raster_backward", &drgs::raster_backward,
          "g_means, g_scales, g_rotations, g_rho, g_means2d = raster_backward(grad_image, means, scales, rotations, "
          "rho, means2d_or_empty, camera, width, height, geom0, geom1, box, touched, offsets, keys, vals, n_pairs, "
          "poison)");
    m.def("voxelize_forward", &drgs::voxelize_forward,
          "volume[nx,ny,nz] = voxelize_forward(means, scales, rotations, rho, first_voxel_centre[3], spacing[3], "
          "shape[3], poison)");
    m.def("hashgrid_forward", &drgs::hashgrid_forward,
          "out[P, L*F] = hashgrid_forward(x[P,D], table[R,F], resolutions[L], offsets[L], hashed[L], table_size, "
          "poison)");
    m.def("hashgrid_backward", &drgs::hashgrid_backward,
          "grad_table, grad_x = hashgrid_backward(grad_out, x, table, resolutions, offsets, hashed, table_size, "
          "need_table, need_x)");
}
