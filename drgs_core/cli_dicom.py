"""`drgs4d import-dicom` and the DICOM options of `drgs4d reconstruct` (only the CLI prints)."""

from __future__ import annotations

import json


def _grid(a):
    """The reconstruction grid from --volume / --voxel-size (None: the importer's default)."""
    if a.volume is None and a.voxel_size is None:
        return None
    from .errors import DRGSInputError
    from .geometry import VolumeGrid

    if a.volume is None or a.voxel_size is None:
        raise DRGSInputError("--volume and --voxel-size go together", "only one of them",
                             "both: the grid size in voxels and the voxel size in mm", "pass both or neither")
    return VolumeGrid((a.volume,) * 3, (a.voxel_size,) * 3)


def _listing_rows(runs, pairs) -> list[dict]:
    paired = {}
    for i, p in enumerate(pairs):
        paired.setdefault(p.mask.id, f"mask of pair {i + 1}")
        paired.setdefault(p.fill.id, f"fill of pair {i + 1}")
    rows = []
    for r in runs:
        s = r.summary()
        angles = s["primary_deg"]
        rows.append({"id": r.id, "description": r.series_description or "-", "kind": r.kind,
                     "frames": str(r.n_frames), "angles": f"{angles[0]:.1f}..{angles[1]:.1f}" if angles else "-",
                     "time": r.acquisition_time or "-", "role": paired.get(r.id, "-"),
                     "status": "ok" if r.usable else "unusable"})
    return rows


def cmd_import_dicom(a) -> int:
    from .cli import format_table
    from .io.dicom import find_pairs, import_dicom, list_runs, write_import

    if a.list:
        runs = list_runs(a.dicom_dir)
        pairs = find_pairs(runs)
        if a.json:
            print(json.dumps({"runs": [r.summary() for r in runs], "pairs": [p.summary() for p in pairs]},
                             indent=2))
            return 0
        cols = [("id", "run id", ""), ("description", "series", ""), ("kind", "kind", ""), ("frames", "frames", ""),
                ("angles", "primary deg", ""), ("time", "time", ""), ("role", "pairing", ""),
                ("status", "status", "")]
        print(format_table(_listing_rows(runs, pairs), cols) if runs else f"no XA runs in {a.dicom_dir}")
        for r in runs:
            if r.problem:
                print(f"\n{r.id}: {r.problem}")
        return 0
    if not a.out:
        from .errors import DRGSInputError

        raise DRGSInputError("import-dicom needs --out (or --list)", "", "an output case folder",
                             "pass --out CASE")
    result = import_dicom(a.dicom_dir, fill=a.fill, mask=a.mask, grid=_grid(a))
    out = write_import(result, a.out)
    g = result.case.geometry
    print(f"fill {result.pair.fill.id}\nmask {result.pair.mask.id}" + (" (reverse order)" if result.pair.reversed
                                                                       else ""))
    for w in result.provenance["warnings"]:
        print(f"warning: {w}")
    print(f"case folder {out}: {g.n_frames} frames of {g.height}x{g.width}, sad {g.sad:g} mm, sid {g.sid:g} mm, "
          f"grid {result.case.grid.resolution}")
    return 0


def add_parser(sub) -> None:
    """Register `import-dicom` on the CLI's subparsers."""
    s = sub.add_parser("import-dicom", help="turn a rotational XA / Enhanced XA mask+fill pair into a case folder")
    s.add_argument("dicom_dir", help="folder of DICOM files (searched recursively), a DICOM file, or a .txt list")
    s.add_argument("--out", help="output case folder (fill_run, mask_run, transforms.json, provenance.json)")
    s.add_argument("--list", action="store_true", help="list the XA runs and candidate mask/fill pairs, and exit")
    s.add_argument("--json", action="store_true", help="with --list: print JSON")
    s.add_argument("--fill", help="fill run id or UID (default: the automatic pair)")
    s.add_argument("--mask", help="mask run id or UID (default: the automatic pair)")
    s.add_argument("--volume", type=int, help="grid size in voxels (cubic; with --voxel-size)")
    s.add_argument("--voxel-size", type=float, help="voxel size in mm (with --volume)")
    s.set_defaults(func=cmd_import_dicom)


def add_reconstruct_arguments(s) -> None:
    """`reconstruct --dicom DIR [--fill-uid UID --mask-uid UID]`."""
    s.add_argument("--dicom", help="folder of rotational XA DICOM (instead of a case folder)")
    s.add_argument("--fill-uid", help="with --dicom: the fill run id or UID (default: automatic pairing)")
    s.add_argument("--mask-uid", help="with --dicom: the mask run id or UID (default: automatic pairing)")
