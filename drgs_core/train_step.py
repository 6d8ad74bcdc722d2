"""One training iteration (METHOD §6), run eagerly or replayed from a captured CUDA graph.

On the GPU a 4DRGS iteration is ~200 small kernels; launched one by one from Python the GPU idles most of
the time.  `StepRunner` therefore captures the whole iteration (field, rasteriser, loss, backward, density
statistics, Adam) in a CUDA graph and replays it.  What changes between iterations lives in fixed device
buffers that are refilled before each replay: the view's packed camera, its measured image and the time.
The learning rates are device tensors (fused, capturable Adam).

The graph is captured again when its tensors go stale: after density control (new parameters), when the
densification window opens or closes, and when the rasteriser's (tile, Gaussian) pair list needs more room.
That list has a fixed capacity inside the graph (`render.rasterize(pair_capacity=...)`), sized from the
largest count seen so far with a 2x margin.  An iteration whose view needed more pairs than that is skipped
on the device (Adam's `found_inf`, and the density statistics are masked) and the next check re-captures
with more room; `skipped` counts them.

Both GPU backends ("cuda-ext" and "triton") are captured; their steps have no host synchronisation.  The
Triton rasteriser keeps no pair list (n_pairs is None), so with it nothing is ever skipped or re-captured
for lack of room.  Anywhere else (CPU, the torch reference renderer, whose culling has data-dependent shapes,
or `cuda_graph=False`) the same iteration runs eagerly.
"""

from __future__ import annotations

import logging

import torch

from .geometry import PackedCamera
from .metrics import ssim
from .render import active_backend, rasterize

log = logging.getLogger(__name__)

_CAPACITY_REFILL = 0.75  # re-capture when a view used more than this fraction of the capacity


class StepRunner:
    """Runs training iterations of `model` on the measured frames dsa [n, H, W] seen from `cameras` [n]; the
    loss compares image_scale x (rendering, measurement)."""

    def __init__(self, model, dsa: torch.Tensor, cameras: list, image_scale: float, ssim_weight: float,
                 use_graph: bool, background=None, background_l1: float = 0.0):
        dev = model.means.device
        self.device = dev
        packed = [c.pack(dev) for c in cameras]
        sizes = {(p.width, p.height) for p in packed}
        if len(sizes) != 1:
            raise ValueError(f"training frames have different detector sizes: {sorted(sizes)}")
        W, H = sizes.pop()
        self.cam_stack = torch.stack([p.params for p in packed])
        self.image_scale = float(image_scale)
        self.gt_stack = dsa * self.image_scale
        self.camera = PackedCamera(torch.zeros(16, dtype=torch.float64, device=dev), W, H)
        self.gt = torch.zeros(H, W, dtype=dsa.dtype, device=dev)
        self.t = torch.zeros((), dtype=torch.float32, device=dev)
        self.ssim_weight = float(ssim_weight)
        # Optional static signed background (drgs_core/model/background.py): rendered image = Gaussians + B, plus
        # an L1 penalty on B; B's rays come from the packed camera buffer, so it replays with the graph.  None: the
        # iteration is exactly the Gaussians-only one.
        self.background = background
        self.background_l1 = float(background_l1)
        self.use_graph = bool(use_graph and dev.type == "cuda" and active_backend(dev) != "torch")
        self.capacity: int | None = None  # pair-list capacity of the graph; None: no pair list (Triton) / eager
        self.capacity_margin = 2.0      # pair-list capacity >= margin x the largest pair count seen + slack
        self.capacity_slack = 4096
        self.pairs_seen = torch.zeros((), dtype=torch.int64, device=dev)   # largest pair count so far
        self.skipped_dev = torch.zeros((), dtype=torch.int64, device=dev)  # iterations skipped (overflow)
        self.captures = 0
        self._pair_list = False         # the rasteriser reports n_pairs (set by every eager iteration)
        self._graph = None
        self._graph_loss = None
        self._graph_for = None
        self._stream = None

    # ------------------------------------------------------------------ per iteration
    def load(self, k: int, t: float) -> None:
        """Select training frame k at normalised time t (device-side copies, no host synchronisation)."""
        self.camera.params.copy_(self.cam_stack[k])
        self.gt.copy_(self.gt_stack[k])
        self.t.fill_(t)

    def run(self, model, opt, stats) -> torch.Tensor:
        """One iteration on the loaded frame: forward, backward, density statistics (when `stats` is not
        None) and the optimizer step.  Returns the loss (a device tensor; do not keep it across calls)."""
        if not self.use_graph:
            opt.zero_grad(set_to_none=True)
            return self._iteration(model, opt, stats, capacity=None)
        key = (model.means, stats, opt)
        if self._graph is not None and all(a is b for a, b in zip(key, self._graph_for)):
            with torch.cuda.device(self.device):
                self._graph.replay()
            return self._graph_loss
        return self._capture(model, opt, stats, key)

    def invalidate(self) -> None:
        """Drop the captured graph (call when the model's parameters or the statistics are replaced)."""
        self._graph = self._graph_loss = self._graph_for = None

    def check(self) -> None:
        """Host-side look at the pair counts (synchronises): make room before views overflow."""
        if not self.use_graph or self.capacity is None:
            return
        if int(self.pairs_seen) > _CAPACITY_REFILL * self.capacity:
            self.invalidate()

    @property
    def skipped(self) -> int:
        return int(self.skipped_dev)

    # ------------------------------------------------------------------ internals
    def _iteration(self, model, opt, stats, capacity: int | None) -> torch.Tensor:
        rho = model.rho(self.t)
        means2d = torch.zeros(model.n, 2, device=self.device, requires_grad=True)
        out = rasterize(model.means, model.scales, model.rotations, rho, self.camera, means2d=means2d,
                        pair_capacity=capacity)
        img = out.image
        if self.background is not None:
            img = img + self.background.render(self.camera.params)
        img = img * self.image_scale
        w = self.ssim_weight
        loss = (1 - w) * (img - self.gt).abs().mean() + w * (1 - ssim(img, self.gt))
        if self.background is not None and self.background_l1 > 0:
            loss = loss + self.background_l1 * self.background.penalty()
        loss.backward()
        keep = None
        self._pair_list = out.n_pairs is not None
        if out.n_pairs is not None:
            torch.maximum(self.pairs_seen, out.n_pairs, out=self.pairs_seen)
            if capacity is not None:
                overflow = out.n_pairs > capacity
                self.skipped_dev += overflow
                opt.found_inf = overflow.float()   # the fused Adam kernel then leaves everything untouched
                keep = 1.0 - opt.found_inf
        if stats is not None and means2d.grad is not None:
            stats.update(out.visible, means2d.grad, self.camera.width, self.camera.height, rho, weight=keep,
                         residual=self.gt - img.detach(), centres=out.centres)
        opt.step()
        return loss.detach()

    def _capture(self, model, opt, stats, key) -> torch.Tensor:
        # Capture streams belong to the current device: make it the model's (e.g. cuda:1).
        with torch.cuda.device(self.device):
            return self._capture_on_device(model, opt, stats, key)

    def _capture_on_device(self, model, opt, stats, key) -> torch.Tensor:
        # This iteration runs eagerly (with an exactly sized pair list) on a side stream, as CUDA-graph
        # capture wants: it creates the optimizer state and library workspaces and measures the pair count.
        self.invalidate()
        opt.found_inf = None
        opt.zero_grad(set_to_none=True)
        if self._stream is None:  # our own: torch's shared default capture stream lives on the first device used
            self._stream = torch.cuda.Stream(self.device)
        side = self._stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            loss = self._iteration(model, opt, stats, capacity=None)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pair_list:
            needed = int(self.pairs_seen)
            self.capacity = max(self.capacity or 0, int(self.capacity_margin * needed) + self.capacity_slack)
        loss = loss.clone()
        opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                graph_loss = self._iteration(model, opt, stats, capacity=self.capacity)
        except RuntimeError as exc:  # e.g. an op that cannot be captured: keep training, eagerly
            log.warning("CUDA graph capture failed (%s); training continues without graphs", exc)
            opt.found_inf = None
            opt.zero_grad(set_to_none=True)
            self.use_graph = False
            return loss
        self._graph, self._graph_loss, self._graph_for = graph, graph_loss, key
        self.captures += 1
        return loss
