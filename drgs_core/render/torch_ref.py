"""PyTorch reference backend of `drgs_core.render` (CPU and GPU, no compiled code).

Rules: `drgs_core.render.common` (METHOD §5 and §7).  Design of the fast path:

* Preprocessing (culling, projection, Sigma'_2, eta) runs in plain autograd on [P]-sized tensors, laid out
  component-major ([3, P], ...) so that every operation is a long contiguous loop (`common.project_gaussians`).
* Splatting uses per-Gaussian *patches*.  A visible Gaussian's footprint clipped to the image is exactly an
  integer rectangle of nx x ny pixels starting at (x0, y0) (the footprint rule is a box test).  Each side is
  rounded up to the next entry of `PATCH_SIDES` (1, 2, 3, 4, 6, 8, 12, 16, ...; clamped to the image size);
  Gaussians with equal rounded shape (Sx, Sy) form a bucket, and small buckets are merged into a larger existing
  shape when that wastes fewer than `MERGE_CELLS` cells (a bucket costs a few dozen tensor calls).  A bucket is
  processed in chunks of at most `budget` cells; a chunk of p patches is one [Sy, Sx, p] block (Gaussian index
  fastest, which vectorises well on the CPU) built from per-row and per-column terms plus one outer product,
  exponentiated once and added into the flat image with `index_add_`.  Cells beyond a footprint are sent to a
  trash slot after the last pixel instead of being masked, and exponents are floored at `_exp_floor` (denormal
  exp() results are ~50x slower on the CPU; the floor is ~1e-38 in float32, ~1e-307 in float64).
* The splatting step is a custom autograd Function.  Its backward pass gathers dLoss/dpixel on the same cells
  and forms the per-Gaussian moments sum(g e), sum(g e dx), sum(g e dx^2), sum(g e dx dy), ... from which the
  gradients of (u, v, conic, weight) follow in closed form.  Forward cell values are kept for the backward
  pass while they total at most `CACHE_CELLS`; above that the backward pass recomputes them chunk by chunk, so
  memory stays bounded whatever the number of Gaussians (never a [P, H*W] tensor).
* Voxelisation is the same in 3D: boxes on the voxel grid bucketed by (Sx, Sy, Sz), [Sx, Sy, Sz, p] chunks of at
  most `chunk` cells, a custom Function whose backward pass always recomputes.

`rasterize_dense` / `voxelize_dense` are the straightforward all-pixel / all-voxel evaluations in plain
autograd, for tiny problems and tests.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .common import (
    FOOTPRINT_SIGMAS,
    RasterResult,
    axis_variances,
    precision_3d,
    project_gaussians,
    voxel_boxes,
)

#: Allowed patch side lengths (cells); a side larger than all of them is used as is (clamped to the image).
PATCH_SIDES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
#: Default maximum number of patch cells evaluated at once (rasterisation and voxelisation), on the CPU and on
#: GPUs (where fewer, larger chunks save kernel launches; a few temporaries of this many elements are alive).
DEFAULT_BUDGET = 1 << 22
DEFAULT_BUDGET_GPU = 1 << 24
#: A bucket is merged into a larger existing patch shape when that wastes fewer cells than this; the cost of
#: one extra bucket (a few dozen small tensor operations, forward and backward) is worth roughly this many cells.
MERGE_CELLS = 16384


def _budget(value, device) -> int:
    """The chunk budget in cells: `value`, or the device's default."""
    if value is not None:
        return max(1, int(value))
    return DEFAULT_BUDGET if torch.device(device).type == "cpu" else DEFAULT_BUDGET_GPU


def _patch_sides(count: torch.Tensor, limit: int) -> torch.Tensor:
    """Smallest allowed side >= count (long tensor), clamped to `limit`."""
    sides = torch.tensor(PATCH_SIDES, dtype=torch.long, device=count.device)
    pos = torch.searchsorted(sides, count.contiguous())
    big = pos >= len(PATCH_SIDES)
    out = sides[pos.clamp(max=len(PATCH_SIDES) - 1)]
    out = torch.where(big, count, out)
    return torch.minimum(out, torch.full_like(out, limit))


def _merge_shapes(shapes: list[tuple], counts: list[int], merge_cells: int) -> list[int]:
    """For each distinct patch shape, the index of the shape its items are evaluated with.

    Greedy: the least populated shapes are moved, one at a time, into the dominating shape (every side >=)
    that wastes the fewest cells, when the waste is below `merge_cells`.
    """
    n = len(shapes)
    target = list(range(n))
    alive = [True] * n
    count = list(counts)
    area = [1] * n
    for i, sh in enumerate(shapes):
        for s in sh:
            area[i] *= s
    for i in sorted(range(n), key=lambda k: count[k]):
        best, best_cost = -1, merge_cells
        for j in range(n):
            if j == i or not alive[j] or any(a < b for a, b in zip(shapes[j], shapes[i])):
                continue
            cost = count[i] * (area[j] - area[i])
            if cost < best_cost:
                best, best_cost = j, cost
        if best >= 0:
            alive[i] = False
            count[best] += count[i]
            for k in range(n):
                if target[k] == i:
                    target[k] = best
    return target


class _Plan:
    """How a set of items (Gaussians) is split into patch-shape buckets and chunks.

    order [V] long: item permutation that makes every chunk a contiguous range; first/count [V, D] long (sorted);
    chunks: list of (shape tuple of D sides, start, stop) into the sorted order.
    """

    def __init__(self, first: torch.Tensor, count: torch.Tensor, limits: list[int], budget: int,
                 merge_cells: int | None = None):
        D = len(limits)
        merge_cells = MERGE_CELLS if merge_cells is None else merge_cells
        self.chunks = []
        self.cells = 0
        if count.shape[0] == 0:
            self.order = torch.zeros(0, dtype=torch.long, device=count.device)
            self.first, self.count = first, count
            return
        sides = torch.stack([_patch_sides(count[:, d], limits[d]) for d in range(D)], -1)
        key = torch.zeros_like(sides[:, 0])
        for d in range(D):
            key = key * (limits[d] + 1) + sides[:, d]
        uniq, inverse, n_per = torch.unique(key, return_inverse=True, return_counts=True)
        shapes = [tuple(r) for r in _unkey(uniq, limits).tolist()]
        target = _merge_shapes(shapes, n_per.tolist(), merge_cells)
        tgt = torch.tensor(target, dtype=torch.long, device=key.device)[inverse]
        self.order = torch.argsort(tgt, stable=True)
        self.first, self.count = first[self.order], count[self.order]
        groups, sizes = torch.unique_consecutive(tgt[self.order], return_counts=True)
        start = 0
        for gi, n in zip(groups.tolist(), sizes.tolist()):
            shape = shapes[gi]
            cells = 1
            for s in shape:
                cells *= s
            per = max(1, budget // cells)
            for a in range(start, start + n, per):
                self.chunks.append((shape, a, min(a + per, start + n)))
            start += n
            self.cells += cells * n


def _unkey(key: torch.Tensor, limits: list[int]) -> torch.Tensor:
    out = []
    for lim in reversed(limits):
        out.append(key % (lim + 1))
        key = key // (lim + 1)
    return torch.stack(out[::-1], -1)


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------
#: Forward patch values are kept for the backward pass while their total is at most this many cells
#: (4 bytes each in float32); above it the backward pass recomputes them chunk by chunk.
CACHE_CELLS = 1 << 24


def _exp_floor(dtype) -> float:
    """Lowest exponent passed to exp(): keeps results normal numbers (denormals make exp() ~50x slower on CPU).

    exp(floor) is ~3e-38 in float32 and ~1e-307 in float64, far below any value that can matter in a sum.
    """
    return float(torch.log(torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float64))) + 1.0


def _axis(first, count, centre, side, stride, trash, coords=None):
    """One axis of a chunk of p patches/boxes, laid out [side, p] (the Gaussian index is the fastest axis:
    broadcasting over it vectorises well on the CPU).

    first, count [p] long; centre [p]; samples first + k for k < side (positions: k itself, or coords[k] mm).
    Returns (d [side, p] = sample position - centre, idx [side, p] int32 (int64 for huge grids) =
    (first + k) * stride, or `trash` for k >= count, i.e. outside the footprint/box).
    """
    k = torch.arange(side, device=first.device)[:, None]
    pos = first[None, :] + k
    if coords is None:
        d = pos.to(centre.dtype) - centre[None, :]
    else:
        d = coords[pos.clamp(max=coords.numel() - 1)] - centre[None, :]
    idx_type = torch.int32 if 3 * trash < 2**31 else torch.int64  # a sum of 3 trash indices must not overflow
    idx = (pos * stride).masked_fill_(k >= count[None, :], trash).to(idx_type)
    return d, idx


# ---------------------------------------------------------------------------------------------
# Rasterisation
# ---------------------------------------------------------------------------------------------
class _SplatPatches(torch.autograd.Function):
    """image [H, W] = sum over visible Gaussians of w exp(-1/2 d^T [[a, b], [b, c]] d) on their footprints.

    Inputs: prm [6, V] = (u, v, a, b, c, w) (pixels, 1/pixel^2, line-integral units), plan: `_Plan` over the
    footprint rectangles ((x0, y0), (nx, ny)).  A chunk of p patches is evaluated as [sy, sx, p] cells; cells
    outside a footprint are sent to a trash slot after the last pixel (index H*W), so no value mask is needed.
    """

    @staticmethod
    def forward(ctx, prm_in, plan, H, W):
        u, v, a, b, c, w = prm_in.unbind(0)
        prm = torch.stack([u, v, -0.5 * a, -b, -0.5 * c, w], 0)[:, plan.order].contiguous()  # [6, V] sorted
        floor = _exp_floor(prm.dtype)
        cache = [] if (any(ctx.needs_input_grad) and plan.cells <= CACHE_CELLS) else None
        image = prm.new_zeros(H * W + 1)
        for (sx, sy), lo, hi in plan.chunks:
            p = prm[:, lo:hi]
            t, pix, _ = _SplatPatches._cells(p, plan.first[lo:hi], plan.count[lo:hi], sx, sy, H, W, floor)
            if cache is None:
                val = t.mul_(p[5])
            else:
                cache.append(t)
                val = t * p[5]
            image.index_add_(0, pix, val.view(-1))
        ctx.save_for_backward(prm)
        ctx.meta = (plan, H, W, floor, cache)
        return image[:-1].view(H, W)

    @staticmethod
    def _axes(p, first, count, sx, sy, H, W):
        trash = H * W
        dx, ix = _axis(first[:, 0], count[:, 0], p[0], sx, 1, trash)
        dy, iy = _axis(first[:, 1], count[:, 1], p[1], sy, W, trash)
        pix = torch.add(iy[:, None, :], ix[None, :, :]).clamp_(max=trash).view(-1)
        return dx, dy, pix

    @staticmethod
    def _cells(p, first, count, sx, sy, H, W, floor):
        """exp(exponent) on [sy, sx, p] cells, flat pixel indices [sy*sx*p] (trash = H*W), (dx, dy)."""
        dx, dy, pix = _SplatPatches._axes(p, first, count, sx, sy, H, W)
        # exponent = -1/2 (a dx^2 + c dy^2) - b dx dy
        t = torch.add((p[4] * dy * dy)[:, None, :], (p[2] * dx * dx)[None, :, :])
        t.addcmul_((p[3] * dy)[:, None, :], dx[None, :, :]).clamp_(min=floor).exp_()
        return t, pix, (dx, dy)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image):
        (prm,) = ctx.saved_tensors
        plan, H, W, floor, cache = ctx.meta
        gflat = torch.cat([grad_image.reshape(-1), grad_image.new_zeros(1)])  # trash slot gets no gradient
        grads = torch.zeros_like(prm)  # [6, V] sorted; rows u, v, a, b, c, w
        for i, ((sx, sy), lo, hi) in enumerate(plan.chunks):
            p = prm[:, lo:hi]
            if cache is None:
                t, pix, (dx, dy) = _SplatPatches._cells(p, plan.first[lo:hi], plan.count[lo:hi], sx, sy, H, W, floor)
                t.mul_(gflat.index_select(0, pix).view(t.shape))
            else:
                dx, dy, pix = _SplatPatches._axes(p, plan.first[lo:hi], plan.count[lo:hi], sx, sy, H, W)
                t = cache[i] * gflat.index_select(0, pix).view(cache[i].shape)
            # t = G exp(...) [sy, sx, p], zero outside the footprints; moments of t in dx, dy:
            tx = t.sum(0)  # [sx, p]
            ty = t.sum(1)  # [sy, p]
            txy = (t * dx[None]).sum(1)  # [sy, p]: sum_x t dx
            s0 = tx.sum(0)
            sx1 = (tx * dx).sum(0)
            sxx = (tx * dx * dx).sum(0)
            sy1 = (ty * dy).sum(0)
            syy = (ty * dy * dy).sum(0)
            sxy = (txy * dy).sum(0)
            w = p[5]
            a, b, c = -2.0 * p[2], -p[3], -2.0 * p[4]
            grads[:, lo:hi] = torch.stack([
                w * (a * sx1 + b * sy1), w * (b * sx1 + c * sy1),
                -0.5 * w * sxx, -w * sxy, -0.5 * w * syy, s0], 0)
        out = torch.empty_like(grads)
        out[:, plan.order] = grads
        return out, None, None, None


def rasterize(means, scales, rotations, rho, camera, means2d=None, *, budget: int | None = None) -> RasterResult:
    """Cone-beam X-ray rasterisation of 3D Gaussians for one camera (torch reference, patch/bucket path).

    means [P, 3] mm world, scales [P, 3] mm (activated std devs), rotations [P, 4] quaternions (w, x, y, z),
    rho [P] 1/mm, camera: `drgs_core.geometry.Camera`, means2d optional zero leaf [P, 2] (pixels) added to the
    projected centres.  budget: maximum patch cells evaluated at once (None: `DEFAULT_BUDGET` on the CPU,
    `DEFAULT_BUDGET_GPU` elsewhere).  Returns `RasterResult` with image
    [camera.height, camera.width] of line integrals.  Differentiable w.r.t. means, scales, rotations, rho and
    means2d.
    """
    proj = project_gaussians(means, scales, rotations, rho, camera, means2d)
    H, W = int(camera.height), int(camera.width)
    plan = _Plan(torch.stack([proj.x0, proj.y0], -1), torch.stack([proj.nx, proj.ny], -1), [W, H],
                 _budget(budget, means.device))
    image = _SplatPatches.apply(proj.params, plan, H, W)
    return RasterResult(image, proj.radii, proj.visible, proj.centres)


def rasterize_dense(means, scales, rotations, rho, camera, means2d=None) -> RasterResult:
    """Same as `rasterize`, evaluating every visible Gaussian on every pixel ([V, H, W] memory); plain autograd.

    For tiny problems and tests only.
    """
    proj = project_gaussians(means, scales, rotations, rho, camera, means2d)
    H, W = int(camera.height), int(camera.width)
    dtype, device = means.dtype, means.device
    xs = torch.arange(W, dtype=dtype, device=device)
    ys = torch.arange(H, dtype=dtype, device=device)
    dx = xs[None, None, :] - proj.u[:, None, None]
    dy = ys[None, :, None] - proj.v[:, None, None]
    q = (proj.conic_a[:, None, None] * dx * dx + 2.0 * proj.conic_b[:, None, None] * dx * dy
         + proj.conic_c[:, None, None] * dy * dy)
    inside = (dx.detach().abs() <= proj.half_u[:, None, None]) & (dy.detach().abs() <= proj.half_v[:, None, None])
    vals = proj.weight[:, None, None] * torch.exp(-0.5 * q)
    image = torch.where(inside, vals, torch.zeros_like(vals)).sum(0)
    return RasterResult(image, proj.radii, proj.visible, proj.centres)


# ---------------------------------------------------------------------------------------------
# Voxelisation
# ---------------------------------------------------------------------------------------------
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


class _SplatBoxes(torch.autograd.Function):
    """volume [nx, ny, nz] = sum_i rho_i exp(-1/2 d^T Q_i d) over each Gaussian's voxel box.

    Inputs: means [V, 3] mm, q6 [V, 6] precision entries (xx, yy, zz, xy, xz, yz) in 1/mm^2, rho [V] 1/mm,
    plan: `_Plan` over the voxel boxes, axes: voxel-centre coordinates (mm) per axis.  A chunk of p boxes is
    evaluated as [sx, sy, sz, p] cells; cells outside a 3-sigma box go to a trash slot after the last voxel.
    The backward pass recomputes the cells.
    """

    @staticmethod
    def forward(ctx, means, q6, rho, plan, axes):
        prm = torch.cat([means, -0.5 * q6[:, :3], -q6[:, 3:], rho[:, None]], -1).T[:, plan.order].contiguous()
        n = [int(ax.numel()) for ax in axes]
        floor = _exp_floor(prm.dtype)
        vol = means.new_zeros(n[0] * n[1] * n[2] + 1)
        for shape, lo, hi in plan.chunks:
            p = prm[:, lo:hi]
            t, flat, _ = _SplatBoxes._cells(p, plan.first[lo:hi], plan.count[lo:hi], axes, n, shape, floor)
            vol.index_add_(0, flat, t.mul_(p[9]).view(-1))
        ctx.save_for_backward(prm)
        ctx.meta = (plan, axes, floor)
        return vol[:-1].view(*n)

    @staticmethod
    def _cells(p, first, count, axes, n, shape, floor):
        """exp(exponent) on [sx, sy, sz, p] cells, flat voxel indices (trash = nx*ny*nz), (dx, dy, dz)."""
        trash = n[0] * n[1] * n[2]
        strides = (n[1] * n[2], n[2], 1)
        ds, idx = [], []
        for d in range(3):
            dd, ii = _axis(first[:, d], count[:, d], p[d], shape[d], strides[d], trash, axes[d])
            ds.append(dd)
            idx.append(ii)
        dx, dy, dz = ds
        # exponent -1/2 d^T Q d = plane(x, y) + lin(x, y) dz + ez(z)
        plane = torch.add((p[3] * dx * dx)[:, None, :], (p[4] * dy * dy)[None, :, :])
        plane.addcmul_((p[6] * dx)[:, None, :], dy[None, :, :])
        lin = torch.add((p[7] * dx)[:, None, :], (p[8] * dy)[None, :, :])
        t = torch.add(plane[:, :, None, :], (p[5] * dz * dz)[None, None, :, :])
        t.addcmul_(lin[:, :, None, :], dz[None, None, :, :]).clamp_(min=floor).exp_()
        flat = torch.add(idx[0][:, None, :], idx[1][None, :, :])
        flat = torch.add(flat[:, :, None, :], idx[2][None, None, :, :]).clamp_(max=trash).view(-1)
        return t, flat, (dx, dy, dz)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_vol):
        (prm,) = ctx.saved_tensors
        plan, axes, floor = ctx.meta
        n = [int(ax.numel()) for ax in axes]
        gflat = torch.cat([grad_vol.reshape(-1), grad_vol.new_zeros(1)])
        grads = torch.zeros_like(prm)  # [10, V] sorted: mu (3), q6 (6), rho
        for shape, lo, hi in plan.chunks:
            p = prm[:, lo:hi]
            t, flat, (dx, dy, dz) = _SplatBoxes._cells(p, plan.first[lo:hi], plan.count[lo:hi], axes, n, shape,
                                                        floor)
            t.mul_(gflat.index_select(0, flat).view(t.shape))  # G exp(...) [sx, sy, sz, p]
            tz = t.sum((0, 1))  # [sz, p]
            txy = t.sum(2)  # [sx, sy, p]
            tzxy = (t * dz[None, None]).sum(2)  # [sx, sy, p]: sum_z t dz
            tx, ty = txy.sum(1), txy.sum(0)
            s0 = tz.sum(0)
            s_x, s_y, s_z = (tx * dx).sum(0), (ty * dy).sum(0), (tz * dz).sum(0)
            s_xx, s_yy, s_zz = (tx * dx * dx).sum(0), (ty * dy * dy).sum(0), (tz * dz * dz).sum(0)
            s_xy = ((txy * dy[None]).sum(1) * dx).sum(0)
            s_xz = (tzxy.sum(1) * dx).sum(0)
            s_yz = (tzxy.sum(0) * dy).sum(0)
            rho = p[9]
            qxx, qyy, qzz = -2.0 * p[3], -2.0 * p[4], -2.0 * p[5]
            qxy, qxz, qyz = -p[6], -p[7], -p[8]
            grads[:, lo:hi] = torch.stack([
                rho * (qxx * s_x + qxy * s_y + qxz * s_z),
                rho * (qxy * s_x + qyy * s_y + qyz * s_z),
                rho * (qxz * s_x + qyz * s_y + qzz * s_z),
                -0.5 * rho * s_xx, -0.5 * rho * s_yy, -0.5 * rho * s_zz,
                -rho * s_xy, -rho * s_xz, -rho * s_yz,
                s0], 0)
        out = torch.empty_like(grads)
        out[:, plan.order] = grads
        out = out.T
        return out[:, :3], out[:, 3:9], out[:, 9], None, None


def _grid_axes(grid, like):
    return [torch.as_tensor(a, dtype=like.dtype, device=like.device) for a in grid.axes()]


def voxelize(means, scales, rotations, rho, grid, *, chunk: int | None = None) -> torch.Tensor:
    """Attenuation volume V(x) = sum_i rho_i exp(-1/2 (x - mu_i)^T Sigma_i^-1 (x - mu_i)) at voxel centres.

    means [P, 3] mm, scales [P, 3] mm, rotations [P, 4] (w, x, y, z), rho [P] 1/mm; grid: VolumeGrid.
    Returns [nx, ny, nz] (1/mm), indexed [x, y, z].  Voxel centre x counts for Gaussian i iff
    |x_d - mu_d| <= 3 sqrt(Sigma_dd) on each axis.  chunk: maximum box cells evaluated at once (None: as
    `budget` in `rasterize`).
    Differentiable w.r.t. means, scales, rotations and rho.
    """
    axes = _grid_axes(grid, means)
    boxes = voxel_boxes(means, scales, rotations, axes)
    g = boxes.index
    n = [int(a.numel()) for a in axes]
    plan = _Plan(boxes.first, boxes.count, n, _budget(chunk, means.device))
    Q = precision_3d(scales[g], rotations[g])
    q6 = torch.stack([Q[:, i, j] for i, j in _PAIRS], -1)
    return _SplatBoxes.apply(means[g], q6, rho[g], plan, axes)


def voxelize_dense(means, scales, rotations, rho, grid) -> torch.Tensor:
    """Same as `voxelize`, one Gaussian at a time over the whole grid in plain autograd (tests only)."""
    axes = _grid_axes(grid, means)
    X = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # [nx, ny, nz, 3]
    vol = torch.zeros(X.shape[:3], dtype=means.dtype, device=means.device)
    ok = (scales > 0).all(-1)
    idx = ok.nonzero().squeeze(1).tolist()
    if not idx:
        return vol + 0.0 * rho.sum()
    Q = precision_3d(scales[idx], rotations[idx])
    half = FOOTPRINT_SIGMAS * axis_variances(scales[idx], rotations[idx]).sqrt().detach()
    for k, i in enumerate(idx):
        d = X - means[i]
        q = torch.einsum("...a,ab,...b->...", d, Q[k], d)
        inside = (d.detach().abs() <= half[k]).all(-1)
        val = rho[i] * torch.exp(-0.5 * q)
        vol = vol + torch.where(inside, val, torch.zeros_like(val))
    return vol
