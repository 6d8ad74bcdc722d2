"""The smallest meaningful reconstruction: a reduced demo phantom and a request that runs on a CPU in seconds.

Shared by the module's ScriptedLoadableModuleTest (inside Slicer) and the pytest suites (Testing/conftest.py writes
this case once per session), so all of them exercise the same path.  Importing this module needs neither Slicer nor
the engine.
"""

from __future__ import annotations

import os

# The demo phantom, shrunk: 16 frames of 32x32 pixels, a 24^3 grid of 5 mm voxels, a small vessel tree.
TINY_PHANTOM = dict(n_frames=16, detector_shape=(32, 32), volume_resolution=(24, 24, 24),
                    volume_spacing=(5.0, 5.0, 5.0), max_branches=8, max_generations=4)


def write_tiny_phantom(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write the tiny phantom case folder (needs drgs_core and torch in this interpreter); returns its path."""
    from drgs_core.phantom import make_phantom, preset, write_phantom

    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "transforms.json")):
        write_phantom(make_phantom(preset("demo", seed=seed, **TINY_PHANTOM)), folder)
    return folder


def phantom_command(folder: str | os.PathLike, seed: int = 0) -> list[str]:
    """Worker arguments that write the tiny phantom into ``folder`` (SampleData: no torch in Slicer's process)."""
    import json

    options = dict(TINY_PHANTOM, seed=seed)
    return ["--make-phantom", os.fspath(folder), "--phantom-options", json.dumps(options)]


def tiny_request(case: str, out: str, **overrides) -> dict:
    """A CPU-sized request for the tiny phantom with preview snapshots and checkpoints."""
    fields = dict(case=case, out=out, views=8, preset="tiny", device="cpu", iterations=30, snapshot_every=10,
                  checkpoint_every=10, progress_every=1, seed=0, times_4d=2, n_gaussians=400)
    fields.update(overrides)
    from .job import make_request  # job needs the MRML classes; importing it here keeps this module light

    return make_request(**fields)
