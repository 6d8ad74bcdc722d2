"""Qt-free parts of the DRGS4D Slicer module: worker protocol, process control, scene updates, inputs, dependencies.

Importable with only ``slicer-core`` (MRML classes) and ``vtk``; never imports Slicer's Qt layer or ``slicer.app`` at
import time, so that the pytest suites under ``Testing/slicer`` can drive it outside the Slicer application.
"""

from .protocol import PROTOCOL_VERSION  # noqa: F401

__all__ = ["PROTOCOL_VERSION"]
