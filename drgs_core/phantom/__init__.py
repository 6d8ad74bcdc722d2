"""Synthetic rotational-DSA phantom with exact ground truth.

Not an inverse crime: vessels are analytic capsules (cylinders with hemispherical caps) whose projections are
exact analytic chord integrals, never Gaussians and never the project's rasteriser or voxel projector.  The
vessel field is mu(x, t) = max over the capsules containing x of peak_mu * scale * c(t - t_arrival) (1/mm):
overlapping capsules at joints never double count, in the projections and in the truth volumes alike.
Background anatomy (head, skull shell, skull base) is a weighted sum of exact ellipsoids.

Public API::

    PhantomConfig, preset(name, **overrides), PRESETS           # 'demo', 'paper', 'paper1024'
    make_phantom(config_or_preset_name) -> Phantom
    write_phantom(phantom, folder, sequence_frames=None) -> dict of written paths
    Phantom: case, truth_volume, truth_mask, truth_mesh, clean_dsa, config, tree, tubes,
             line_integrals(origins, directions, t), attenuation(points, t), volume_at(t),
             background_line_integrals(origins, directions), background_attenuation(points)
"""

from .core import FILLED_THRESHOLD, Phantom, make_phantom, write_phantom
from .presets import PRESETS, PhantomConfig, preset

__all__ = ["FILLED_THRESHOLD", "PRESETS", "Phantom", "PhantomConfig", "make_phantom", "preset", "write_phantom"]
