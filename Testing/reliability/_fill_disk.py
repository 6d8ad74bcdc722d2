"""Run every writer of drgs_core with a file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a
full disk; C++ writers such as SimpleITK's see the same failing write() calls) and report what happened.

    python _fill_disk.py FOLDER LIMIT_BYTES   ->  one JSON object {writer: outcome} on stdout
"""

import json
import resource
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from drgs_core.geometry import VolumeGrid
from drgs_core.io import write_labelmap, write_mesh, write_sequence_nrrd, write_stack, write_volume
from drgs_core.io.atomic import write_text_atomic
from drgs_core.model.gaussians import GaussianModel
from drgs_core.model.serialize import save_json, save_model

folder, limit = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
grid = VolumeGrid((24, 24, 24), (1.0, 1.0, 1.0))
vol = rng.random(grid.resolution).astype(np.float32)
verts = rng.random((3000, 3)) * 10
faces = rng.integers(0, 3000, (6000, 3))
model = GaussianModel(grid, log2_table_size=12, n_levels=4)
writers = {
    "stack.nii.gz": lambda p: write_stack(p, rng.random((16, 32, 32)), (1, 1)),
    "stack.nrrd": lambda p: write_stack(p, rng.random((16, 32, 32)), (1, 1)),
    "volume.nii.gz": lambda p: write_volume(p, vol, grid),
    "volume.nrrd": lambda p: write_volume(p, vol, grid),
    "labels.nii.gz": lambda p: write_labelmap(p, vol > 0.5, grid),
    "seq.seq.nrrd": lambda p: write_sequence_nrrd(p, np.stack([vol] * 3), grid, [0, 0.5, 0.9]),
    "mesh.stl": lambda p: write_mesh(p, verts, faces),
    "mesh.vtk": lambda p: write_mesh(p, verts, faces),
    "metrics.json": lambda p: save_json(p, {"values": rng.random(5000).tolist()}),
    "text.txt": lambda p: write_text_atomic(p, "x" * 100_000),
    "model.pt": lambda p: save_model(p, model),
}
for name in writers:
    (folder / name).write_bytes(b"old")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
report = {}
for name, write in writers.items():
    try:
        write(folder / name)
        report[name] = "no error"
    except Exception as exc:  # noqa: BLE001 - the outcome is what is reported
        report[name] = f"{type(exc).__name__}: {exc}"[:200]
torch.set_num_threads(1)
print(json.dumps(report))
