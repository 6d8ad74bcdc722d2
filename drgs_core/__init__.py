"""DRGS4D engine: 4D radiative Gaussian splatting for sparse-view rotational DSA."""

from .errors import DRGSInputError

__version__ = "0.1.0"
__all__ = ["DRGSInputError", "__version__"]
