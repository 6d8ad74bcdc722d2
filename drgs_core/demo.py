"""`drgs4d demo`: demo phantom -> FDK -> static-field ablation -> 4DRGS -> evaluation table and figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .geometry import view_indices
from .io import read_case, read_stack, read_volume
from .model.serialize import load_model, save_json
from .pipeline import ReconstructConfig, run_fdk, run_reconstruction
from .render.common import quaternion_to_rotation


def run_demo(out: Path, device: str = "auto", views: int = 30, seed: int = 0, quiet: bool = False,
             iterations: int | None = None, preset: str = "demo") -> tuple[list[dict], Path]:
    """Returns the summary rows (FDK, static field, 4DRGS) and the path of the figure."""
    from .cli import ProgressPrinter
    from .phantom import make_phantom, write_phantom
    from .phantom.presets import preset as phantom_preset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    case_dir = out / "phantom"
    ph = make_phantom(phantom_preset("demo", seed=seed))
    write_phantom(ph, case_dir)
    case = read_case(case_dir)
    rows = []

    fdk_metrics = run_fdk(case_dir, out / "fdk", views=views, device=device)
    rows.append({"method": "FDK", "time_s": fdk_metrics["fdk_s"], **fdk_metrics["truth"]})

    for name, static in (("static", True), ("4drgs", False)):
        cfg = ReconstructConfig(out=str(out / name), case=str(case_dir), views=views, device=device, seed=seed,
                                preset=preset, iterations=iterations, static_field=static)
        label = "static field: " if static else "4DRGS: "
        res = run_reconstruction(cfg, on_event=ProgressPrinter(label=label, quiet=quiet))
        m = res["metrics"]
        rows.append({"method": "4DRGS static field" if static else "4DRGS", "time_s": m["total_s"],
                     "heldout_psnr": m["heldout_psnr"], "heldout_ssim": m["heldout_ssim"], **m["truth"]})
    save_json(out / "summary.json", rows)
    figure = make_figure(out, case, ph, view_indices(case.n_frames, views))
    return rows, figure


def make_figure(out: Path, case, phantom, train_idx) -> Path:
    """MIPs of truth / FDK / 4DRGS, measured vs rendered DSA on a held-out frame, a 4D time curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = read_volume(out / "phantom" / "truth" / "volume.nii.gz")[0]
    fdk_v = read_volume(out / "fdk" / "volume.nii.gz")[0]
    ours = read_volume(out / "4drgs" / "volume.nii.gz")[0]
    renders = read_stack(out / "4drgs" / "renders.nii.gz")
    held = np.setdiff1d(np.arange(case.n_frames), train_idx)
    k = int(held[len(held) // 2])

    fig, ax = plt.subplots(2, 4, figsize=(16, 8))
    for a, (title, v) in zip(ax[0, :3], (("truth", truth), ("FDK", fdk_v), ("4DRGS", ours))):
        a.imshow(v.max(axis=1).T, origin="lower", cmap="gray")  # x horizontal, z up
        a.set_title(f"{title}: MIP along y")
    vmax = float(case.dsa[k].max())
    ax[1, 0].imshow(case.dsa[k], cmap="gray", vmin=0, vmax=vmax)
    ax[1, 0].set_title(f"measured DSA, held-out frame {k}")
    ax[1, 1].imshow(renders[k], cmap="gray", vmin=0, vmax=vmax)
    ax[1, 1].set_title(f"4DRGS rendering, frame {k}")
    ax[1, 2].imshow(np.abs(renders[k] - case.dsa[k]), cmap="magma")
    ax[1, 2].set_title("|difference|")

    # Time curve at the brightest vessel voxel: truth vessel attenuation vs the 4D field.
    model = load_model(out / "4drgs")
    i, j, kk = np.unravel_index(np.argmax(truth), truth.shape)
    times = case.times
    pt = torch.as_tensor(case.grid.index_to_world(np.array([i, j, kk], float)), dtype=torch.float32)
    with torch.no_grad():
        R = quaternion_to_rotation(model.rotations)
        local = torch.einsum("pji,pj->pi", R, pt - model.means) / model.scales  # diag(1/s) R^T (x - mu)
        w = torch.exp(-0.5 * local.pow(2).sum(-1))
        curve = [float((w * model.rho(float(t))).sum()) for t in times]
    true_curve = [float(phantom.attenuation(pt[None].numpy().astype(np.float64), float(t)).ravel()[0]) for t in times]
    ax[0, 3].plot(times, true_curve, label="truth")
    ax[0, 3].plot(times, curve, label="4DRGS")
    ax[0, 3].set_xlabel("normalised time")
    ax[0, 3].set_ylabel("attenuation (1/mm)")
    ax[0, 3].set_title("time curve at a vessel point")
    ax[0, 3].legend()
    ax[1, 3].axis("off")
    for a in ax.flat[:7]:
        if a is not ax[0, 3]:
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    path = out / "demo.png"
    tmp = out / ".demo.png.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path
