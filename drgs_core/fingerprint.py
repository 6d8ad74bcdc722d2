"""What a checkpoint belongs to: a fingerprint of the case and of every setting that changes the model.

A checkpoint stores ``fingerprint(case, cfg)``; resuming compares it with the current run and refuses any
difference by name, so a run never silently continues another case's or another setting's model.  The settings
are all ReconstructConfig fields not marked ``model=False`` (drgs_core.config), so new fields count by default.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .config import ReconstructConfig, model_fields
from .errors import DRGSInputError


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def case_fingerprint(case) -> dict:
    """Sizes of the input files, a hash of the geometry and a hash of a sample of the DSA."""
    g, grid = case.geometry, case.grid
    files = {}
    for key in ("fill_path", "mask_path", "transforms_path"):
        p = (case.meta or {}).get(key)
        if p and os.path.exists(p):
            files[key.replace("_path", "_bytes")] = os.path.getsize(p)
    dsa = np.asarray(case.dsa)
    sample = dsa.reshape(dsa.shape[0], -1)[:, :: max(1, dsa[0].size // 4096)]
    return {"n_frames": int(case.n_frames), "detector": [int(g.height), int(g.width)],
            "geometry": _digest(g.primary_angles, g.secondary_angles, [g.sad, g.sid], g.detector_spacing,
                                grid.resolution, grid.spacing),
            "dsa": _digest(sample), **files}


def fingerprint(case, cfg: ReconstructConfig) -> dict:
    """{"case": ..., "settings": {field: value}} for a checkpoint."""
    return {"case": case_fingerprint(case), "settings": {k: getattr(cfg, k) for k in model_fields()}}


def differences(saved: dict | None, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's fingerprint and this run's."""
    if not saved:
        return ["the checkpoint records no fingerprint (written by an older version)"]
    out = []
    sc, cc = saved.get("case", {}), current["case"]
    for key in sorted(set(sc) | set(cc)):
        if sc.get(key) != cc.get(key):
            out.append(f"case {key} ({sc.get(key)} in the checkpoint, {cc.get(key)} now)")
    ss, cs = saved.get("settings", {}), current["settings"]
    for key in sorted(set(ss) | set(cs)):
        if ss.get(key) != cs.get(key):
            out.append(f"{key} ({ss.get(key)!r} in the checkpoint, {cs.get(key)!r} now)")
    return out


def check(saved: dict | None, current: dict | None, path) -> None:
    """Raise DRGSInputError naming every difference (no check when `current` is None)."""
    if current is None:
        return
    diff = differences(saved, current)
    if diff:
        raise DRGSInputError(f"the checkpoint {path} belongs to a different run", "differs in " + "; ".join(diff),
                             "the same case and model settings as the run that wrote it",
                             "resume with the original case and settings, or start afresh without --resume "
                             f"(or delete {Path(path).name}, or choose another --out)")


def load_payload(path, device) -> dict:
    """torch.load of a checkpoint; a damaged file is an input error that says what to do."""
    import torch

    try:
        payload = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(payload, dict) or "model" not in payload or "state" not in payload:
            raise ValueError("not a DRGS4D checkpoint")
    except Exception as exc:  # noqa: BLE001 - unpickling fails in many ways
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DRGSInputError(f"the checkpoint {path} is damaged or not a checkpoint", text,
                             "a checkpoint.pt written by drgs4d",
                             f"delete {path} and start afresh (without --resume), or choose another --out"
                             ) from None
    return payload
