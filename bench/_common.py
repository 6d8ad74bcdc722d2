"""Shared helpers of the bench scripts: device description, CUDA-event timing."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def device_info() -> dict:
    """Card, driver, CUDA/torch versions, SM count, L2 size."""
    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, sms=p.multi_processor_count, mem_gb=round(p.total_memory / 2**30, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
            info["driver"] = out.splitlines()[0] if out else "?"
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "?"
    else:
        info.update(card="cpu", driver="-")
    return info


def cuda_time_ms(fn, warmup: int = 3, repeat: int = 20) -> dict:
    """Median / min / max of `repeat` timings of fn() with CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": repeat}


def copy_bandwidth_gbs(n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s counting bytes read plus bytes written."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = cuda_time_ms(lambda: dst.copy_(src), warmup=3, repeat=10)["median"]
    return 2 * n_bytes / (t * 1e-3) / 1e9


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")
