"""DRGS4D engine (drgs_core). The optional CUDA extension is added by csrc/ when a CUDA toolkit is present."""

import glob
import os
import runpy

from setuptools import find_packages, setup

# The one set of compiler flags, shared with the JIT build (drgs_core/cuda/_backend.py).
_FLAGS = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "drgs_core", "cuda", "_flags.py"))


def _cuda_extension_kwargs() -> dict:
    """Optional CUDA extension drgs_core._C from csrc/ (see drgs_core/cuda/_backend.py for the JIT fallback).

    Built when PyTorch is importable at build time, is a CUDA build and a CUDA toolkit (nvcc) is found.
    DRGS4D_BUILD_CUDA=1 forces the build (an error if it cannot be done), =0 skips it.  A plain CPU-only
    `pip install -e .` (build isolation: no torch at build time) builds nothing and stays fast.  To build in
    place: `DRGS4D_BUILD_CUDA=1 pip install --no-build-isolation -e .`.
    """
    mode = os.environ.get("DRGS4D_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "no", "false", "off"):
        return {}
    forced = mode in ("1", "yes", "true", "on")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if forced:
            raise
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if forced:
            raise RuntimeError("DRGS4D_BUILD_CUDA=1 needs a CUDA build of PyTorch and a CUDA toolkit (CUDA_HOME)")
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return {}
    ext = CUDAExtension(
        name="drgs_core._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": list(_FLAGS["CXX_FLAGS"]), "nvcc": list(_FLAGS["NVCC_FLAGS"])},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="drgs4d",
    version="0.1.0",
    description="4D radiative Gaussian splatting for sparse-view rotational DSA vessel reconstruction",
    packages=find_packages(include=["drgs_core", "drgs_core.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "SimpleITK>=2.2",
        "nibabel>=5.0",
        "pynrrd>=1.0",
        "scikit-image>=0.21",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pydicom>=3.0",  # DICOM import of rotational XA (drgs_core.io.dicom)
    ],
    extras_require={
        "batch": ["ray==2.60.0"],  # drgs4d batch
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],  # drgs4d serve
        # decoders for compressed XA pixel data (JPEG lossless / JPEG 2000); pydicom uses them if present
        "dicom": ["pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1", "pylibjpeg-openjpeg>=2.3"],
        # toolkit-free GPU kernels (Linux CUDA wheels of torch already bring triton)
        "triton": ["triton>=3.0; platform_system == 'Linux'", "triton-windows>=3.0; platform_system == 'Windows'"],
        # triton in "test": the Triton kernels also run on the CPU in CI, through its interpreter (>= 3.2 so that a
        # CUDA build of torch keeps the triton it ships with); vermin checks the Slicer module's Python 3.9 syntax
        "test": ["pytest>=7", "slicer-core==5.13.31053.0", "triton>=3.2; platform_system == 'Linux'",
                 "vermin==1.6.0", "ray==2.60.0", "fastapi>=0.110", "uvicorn>=0.29"],
    },
    entry_points={"console_scripts": ["drgs4d=drgs_core.cli:main"]},
    **_cuda_extension_kwargs(),
)
