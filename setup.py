"""DRGS4D engine (drgs_core). The optional CUDA extension is added by csrc/ when a CUDA toolkit is present."""

from setuptools import find_packages, setup

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
    ],
    extras_require={"test": ["pytest>=7", "slicer-core", "vtk"]},
    entry_points={"console_scripts": ["drgs4d=drgs_core.cli:main"]},
)
