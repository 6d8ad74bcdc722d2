"""Classical cone-beam CT tools: forward projection of voxel volumes and FDK reconstruction.

Units and axes: volumes [nx, ny, nz] = [x, y, z] in 1/mm on a `VolumeGrid`; projection stacks [n, H, W]
(frame, detector row v, column u) of dimensionless line integrals; geometry from `ConeBeamGeometry`.
"""

from .fdk import (WINDOWS, ScanWeights, backproject, fdk, filter_projections, parker_weights, ramp_filter,
                  ramp_kernel_response, scan_weights)
from .projector import forward_project, ray_box_intersection

__all__ = [
    "forward_project", "ray_box_intersection",
    "fdk", "filter_projections", "backproject", "ramp_filter", "ramp_kernel_response",
    "scan_weights", "parker_weights", "ScanWeights", "WINDOWS",
]
