"""Shared phantoms for the phantom tests (generated once per session, kept small)."""

import time

import pytest

from drgs_core.phantom import make_phantom, preset


@pytest.fixture(scope="session")
def demo_timed():
    """The demo preset as shipped, and its generation time in seconds."""
    tick = time.perf_counter()
    phantom = make_phantom(preset("demo"))
    return phantom, time.perf_counter() - tick


@pytest.fixture(scope="session")
def demo(demo_timed):
    return demo_timed[0]


def small_config(**overrides):
    """The demo tree (same 128 mm box and seed) with few frames and a small detector."""
    base = dict(n_frames=12, detector_shape=(48, 48), volume_resolution=(32, 32, 32), volume_spacing=(4.0, 4.0, 4.0),
                mesh_supersample=2)
    base.update(overrides)
    return preset("demo", **base)


@pytest.fixture(scope="session")
def clean_small():
    """Noise-, scatter- and motion-free small phantom."""
    return make_phantom(small_config(noise=False))


@pytest.fixture(scope="session")
def small():
    """Factory: small_config(**overrides) -> PhantomConfig."""
    return small_config
