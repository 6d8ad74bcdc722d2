"""Fixtures of the server tests: `server_proc` (a real `drgs4d serve` on loopback) is importable from here."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
