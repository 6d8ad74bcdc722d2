"""Loader of the optional compiled extension `drgs_core._C` (CUDA kernels from `csrc/`).

`load_extension()` returns the extension module, or None when it cannot be used here; `unavailable_reason()`
then says why.  Order of attempts:

1. a prebuilt `drgs_core._C` (compiled by `setup.py` when a CUDA toolkit and a CUDA build of PyTorch were
   present at install time, or forced with DRGS4D_BUILD_CUDA=1);
2. a just-in-time build of `csrc/*.cu, *.cpp` with `torch.utils.cpp_extension.load` into a cache folder
   (`$DRGS4D_CACHE`, default `~/.cache/drgs4d`), keyed by a hash of the sources, the PyTorch and CUDA versions
   and the GPU architecture, so a rebuild happens only when one of them changes (the first build takes about
   a minute).  This is what a source install (e.g. inside 3D Slicer's Python) uses.

Environment:
    DRGS4D_DISABLE_CUDA=1   never load the extension (the Triton or PyTorch path runs instead)
    DRGS4D_NO_JIT=1         use a prebuilt extension only
    DRGS4D_CACHE=DIR        where JIT builds are kept
    DRGS4D_JIT_VERBOSE=1    show the compiler output of a JIT build
    DRGS4D_POISON=1         debug: kernels fill their outputs with NaN / sentinels before writing them

Compiler flags: `_flags.py` (shared with setup.py).  Nothing here runs until a CUDA tensor asks for a kernel.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from ._flags import CXX_FLAGS, NVCC_FLAGS

log = logging.getLogger(__name__)

#: Must equal kAbiVersion in csrc/ops.cpp.
ABI_VERSION = 2

_CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "reason": "not loaded yet", "source": None}


def cache_dir() -> Path:
    """Folder of the JIT builds: $DRGS4D_CACHE or ~/.cache/drgs4d."""
    env = os.environ.get("DRGS4D_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "drgs4d"


def source_files() -> list[Path]:
    """The extension's sources (compiled: .cu and .cpp; hashed: also the headers)."""
    if not _CSRC.is_dir():
        return []
    return sorted(p for p in _CSRC.iterdir() if p.suffix in (".cu", ".cpp", ".h", ".cuh"))


def poison_enabled() -> bool:
    """Debug mode in which kernels pre-fill outputs with NaN so that unwritten elements show."""
    return os.environ.get("DRGS4D_POISON", "0") not in ("", "0")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _accept(module, source: str):
    version = getattr(module, "ABI_VERSION", None)
    if version != ABI_VERSION:
        raise ImportError(f"{source} extension has ABI version {version}, this drgs_core needs {ABI_VERSION}")
    _state.update(module=module, reason=None, source=source)
    return module


def _jit_build(torch):
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError("this PyTorch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (nvcc); install one or set CUDA_HOME")
    files = source_files()
    compiled = [str(p) for p in files if p.suffix in (".cu", ".cpp")]
    if not compiled:
        raise RuntimeError(f"the CUDA sources are not installed (looked in {_CSRC})")
    major, minor = torch.cuda.get_device_capability()
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or f"{major}.{minor}"
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{arch}|{ABI_VERSION}".encode())
    tag = h.hexdigest()[:16]
    name = f"drgs4d_C_{tag}"
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        log.info("building the CUDA extension in %s (first use only)", build)
        return cpp_extension.load(
            name=name,
            sources=compiled,
            extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=list(NVCC_FLAGS),
            build_directory=str(build),
            verbose=_env_true("DRGS4D_JIT_VERBOSE"),
        )
    finally:
        if old_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch


def load_extension(force: bool = False):
    """The compiled extension module, or None (see `unavailable_reason()`).  Tried once per process."""
    if _state["tried"] and not force:
        return _state["module"]
    with _lock:
        if _state["tried"] and not force:
            return _state["module"]
        _state.update(tried=True, module=None, source=None)
        if _env_true("DRGS4D_DISABLE_CUDA"):
            _state["reason"] = "disabled by DRGS4D_DISABLE_CUDA"
            return None
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - torch is a hard dependency
            _state["reason"] = f"PyTorch is not importable: {exc}"
            return None
        if not torch.cuda.is_available():
            _state["reason"] = "no CUDA device is available to PyTorch"
            return None
        errors = []
        try:
            from .. import _C  # prebuilt by setup.py

            return _accept(_C, "prebuilt")
        except ImportError as exc:
            errors.append(f"prebuilt drgs_core._C: {exc}")
        if _env_true("DRGS4D_NO_JIT"):
            errors.append("JIT build disabled by DRGS4D_NO_JIT")
        else:
            try:
                return _accept(_jit_build(torch), "jit")
            except Exception as exc:  # compiler missing, build error, ...
                errors.append(f"JIT build: {type(exc).__name__}: {exc}")
        _state["reason"] = "; ".join(errors)
        log.warning("CUDA kernels unavailable, using the PyTorch reference: %s", _state["reason"])
        return None


def unavailable_reason() -> str | None:
    """Why `load_extension()` returned None (None when the extension is loaded)."""
    return _state["reason"]


def extension_info() -> dict:
    """{'loaded': bool, 'source': 'prebuilt' | 'jit' | None, 'reason': str | None, 'cache': str}."""
    return {"loaded": _state["module"] is not None, "source": _state["source"], "reason": _state["reason"],
            "cache": str(cache_dir())}
