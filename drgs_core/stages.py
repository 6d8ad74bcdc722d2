"""The named stages of a reconstruction run, in order.

One list shared by the pipeline (progress events), the worker protocol and the Slicer panel (which keeps a
mirror of it, checked by a test, because the panel may run in a Python without drgs_core).
"""

STAGES = ("load", "fdk", "init", "train", "voxelize", "mesh", "write")
