"""The one set of compiler flags of the CUDA extension, shared by setup.py (prebuilt) and the JIT build.

Plain constants, no imports: setup.py reads this file with `runpy` before the package (or torch) is importable.
"""

CXX_FLAGS = ["-O3", "-std=c++17"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
