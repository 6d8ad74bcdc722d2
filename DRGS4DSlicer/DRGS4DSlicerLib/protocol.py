"""The worker's JSON-lines protocol, seen from the panel.

The reconstruction runs in a separate process (``python -m drgs_core.worker --config FILE``).  It writes one JSON
object per line on stdout, every object carrying ``"protocol": PROTOCOL_VERSION`` and ``"event"``; everything else it
has to say (logging) goes to stderr.  This module turns raw bytes from that pipe into validated event dicts and knows
nothing about processes, Qt or MRML, so it can be tested on its own.

Events (fields beyond ``protocol`` and ``event``; ``?`` = optional, may be null):

=========  ==========================================================================================================
worker     pid (of the interpreter running the engine: the process a cancel signals), python?
started    run_dir, n_frames, views, iterations, device
progress   stage (load|fdk|init|train|voxelize|mesh|write), iteration?, iterations?, loss?, n_gaussians?,
           elapsed_s?, eta_s?
snapshot   iteration, volume? (uncompressed .nrrd, at most 128^3 voxels, LPS mm), mesh? (binary .vtk, LPS mm)
done       outputs {volume, mesh_stl, mesh_vtk, segmentation, volume_4d, renders, cine, gaussians, config, metrics,
           checkpoint, background? (only with static_background)}, metrics?
cancelled  checkpoint? (path of the checkpoint a later run can resume from; null: this run saved none, e.g. it stopped
           before training), iteration?, stage? (where a stop before training happened)
error      kind (input|resources|internal|crashed|protocol), message, traceback?
=========  ==========================================================================================================

Unknown event names are passed through untouched (a newer worker may add events); unknown fields are kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

PROTOCOL_VERSION = 1

STAGES = ("load", "fdk", "init", "train", "voxelize", "mesh", "write")
TERMINAL_EVENTS = ("done", "cancelled", "error")
ERROR_KINDS = ("input", "resources", "internal", "crashed", "protocol")
OUTPUT_KEYS = ("volume", "mesh_stl", "mesh_vtk", "segmentation", "volume_4d", "renders", "cine", "gaussians",
               "config", "metrics", "checkpoint")

# Exit codes of the worker process.
EXIT_DONE = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_CANCELLED = 3

_NUMBER = (int, float)
_OPT = type(None)

# event -> {field: (accepted types, required)}
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "worker": {
        "pid": ((int,), True),
        "python": ((str, _OPT), False),
    },
    "started": {
        "run_dir": ((str,), True),
        "n_frames": ((int,), True),
        "views": ((int,), True),
        "iterations": ((int,), True),
        "device": ((str,), True),
    },
    "progress": {
        "stage": ((str,), True),
        "iteration": ((int, _OPT), False),
        "iterations": ((int, _OPT), False),
        "loss": (_NUMBER + (_OPT,), False),
        "n_gaussians": ((int, _OPT), False),
        "elapsed_s": (_NUMBER + (_OPT,), False),
        "eta_s": (_NUMBER + (_OPT,), False),
    },
    "snapshot": {
        "iteration": ((int,), True),
        "volume": ((str, _OPT), False),
        "mesh": ((str, _OPT), False),
    },
    "done": {
        "outputs": ((dict,), True),
        "metrics": ((dict, _OPT), False),
    },
    "cancelled": {
        "checkpoint": ((str, _OPT), False),
        "iteration": ((int, _OPT), False),
        "stage": ((str, _OPT), False),
    },
    "error": {
        "kind": ((str,), True),
        "message": ((str,), True),
        "traceback": ((str, _OPT), False),
    },
}


class ProtocolError(ValueError):
    """A line that is JSON and claims to be an event but breaks the protocol."""


@dataclass
class ParsedLine:
    """One line of worker stdout.

    kind: "event" (``event`` holds the validated dict), "noise" (not a protocol line: stray output, kept in
    ``text``) or "invalid" (looked like an event but failed validation; ``problem`` says why).
    """

    kind: str
    text: str
    event: dict | None = None
    problem: str = ""


def _type_ok(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; never accept it as a number
        return bool in types
    if int in types and float not in types and isinstance(value, float) and value.is_integer():
        return True  # 1000.0 where an int is expected is harmless
    return isinstance(value, types)


def validate_event(obj) -> dict:
    """Check one decoded protocol object; return it (ints normalised) or raise ProtocolError."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    if "event" not in obj or not isinstance(obj["event"], str):
        raise ProtocolError("missing the 'event' field")
    version = obj.get("protocol")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"worker speaks protocol {version!r}, this panel understands protocol {PROTOCOL_VERSION}; "
                            "update the DRGS4D extension and the drgs_core engine to the same release")
    schema = _SCHEMA.get(obj["event"])
    if schema is None:
        return dict(obj)  # forward compatible: unknown events pass through
    out = dict(obj)
    for name, (types, required) in schema.items():
        if name not in obj:
            if required:
                raise ProtocolError(f"'{obj['event']}' event lacks the field '{name}'")
            out[name] = None
            continue
        value = obj[name]
        if not _type_ok(value, types):
            raise ProtocolError(f"'{obj['event']}' event: field '{name}' has type {type(value).__name__}")
        if int in types and isinstance(value, float) and value.is_integer():
            out[name] = int(value)
    if obj["event"] == "progress" and out["stage"] not in STAGES:
        # keep going (a newer engine may add a stage) but do not pretend we know it
        out["stage_known"] = False
    return out


def parse_line(line: str | bytes) -> ParsedLine:
    """Parse one line (without or with its newline) of worker stdout; never raises."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    text = line.strip()
    if not text.startswith("{"):
        return ParsedLine("noise", text)
    try:
        obj = json.loads(text)
    except ValueError:
        return ParsedLine("noise", text)
    if not isinstance(obj, dict) or "event" not in obj:
        return ParsedLine("noise", text)
    try:
        return ParsedLine("event", text, event=validate_event(obj))
    except ProtocolError as exc:
        return ParsedLine("invalid", text, problem=str(exc))


class LineBuffer:
    """Reassemble lines from arbitrary chunks of a byte stream (partial lines are held back).

    ``feed(chunk)`` returns the complete lines it could finish; ``flush()`` returns what is left at end of stream.
    A runaway line longer than ``max_line`` bytes is cut so that memory stays bounded.
    """

    def __init__(self, max_line: int = 16 * 1024 * 1024):
        self._pending = bytearray()
        self.max_line = max_line

    def feed(self, chunk: bytes | str) -> list[str]:
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8")
        self._pending.extend(chunk)
        lines = []
        while True:
            cut = self._pending.find(b"\n")
            if cut < 0:
                break
            raw = bytes(self._pending[:cut])
            del self._pending[:cut + 1]
            lines.append(raw.rstrip(b"\r").decode("utf-8", errors="replace"))
        if len(self._pending) > self.max_line:
            lines.append(bytes(self._pending).decode("utf-8", errors="replace"))
            self._pending.clear()
        return lines

    def flush(self) -> list[str]:
        if not self._pending:
            return []
        rest = bytes(self._pending).rstrip(b"\r").decode("utf-8", errors="replace")
        self._pending.clear()
        return [rest] if rest.strip() else []


def _json_default(obj):
    # numpy scalars/arrays and paths without importing numpy here
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return obj.__fspath__()
    return str(obj)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def encode_event(event: dict) -> str:
    """One protocol line (no newline) for ``event``; adds the protocol version, maps NaN/inf to null."""
    payload = {"protocol": PROTOCOL_VERSION}
    payload.update(event)
    payload["protocol"] = PROTOCOL_VERSION
    # round-trip through the default handler first so that numpy values become plain floats before _finite
    plain = json.loads(json.dumps(payload, default=_json_default, allow_nan=True))
    return json.dumps(_finite(plain), allow_nan=False, separators=(",", ":"))


# ---- human-readable summaries for the panel ------------------------------------------------------------------------

def format_duration(seconds) -> str:
    """12 -> '12 s', 75 -> '1 min 15 s', 3725 -> '1 h 2 min'; None -> '?'."""
    if seconds is None:
        return "?"
    seconds = max(0, int(round(float(seconds))))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def translate(text: str) -> str:
    """Translation hook for the texts below; the panel replaces it with Slicer's ``tr`` (this module stays Qt-free).
    Texts are whole sentences with named ``{placeholders}``, formatted after translation."""
    return text


def tr(text: str, **values) -> str:
    return translate(text).format(**values) if values else translate(text)


_STAGE_TEXT = {
    "load": "Loading the runs",
    "fdk": "FDK initial reconstruction",
    "init": "Initialising Gaussians",
    "train": "Training",
    "voxelize": "Voxelising the vessel volume",
    "mesh": "Extracting the surface",
    "write": "Writing results",
}


def describe_event(event: dict) -> str:
    """A one-line status text for an event (used for the panel's status label)."""
    name = event.get("event")
    if name == "started":
        return tr("Started on {device}: {views} of {frames} frames, {iterations} iterations",
                  device=event.get("device"), views=event.get("views"), frames=event.get("n_frames"),
                  iterations=event.get("iterations"))
    if name == "progress":
        stage = event.get("stage")
        parts = [tr(_STAGE_TEXT[stage]) if stage in _STAGE_TEXT else str(stage)]
        it, total = event.get("iteration"), event.get("iterations")
        if it is not None and total:
            parts[0] = tr("{stage} {iteration}/{total}", stage=parts[0], iteration=it, total=total)
        if event.get("loss") is not None:
            parts.append(tr("loss {loss}", loss=f"{event['loss']:.4g}"))
        if event.get("n_gaussians") is not None:
            parts.append(tr("{count} Gaussians", count=f"{event['n_gaussians']:,}"))
        if event.get("elapsed_s") is not None:
            parts.append(tr("{duration} elapsed", duration=format_duration(event["elapsed_s"])))
        if event.get("eta_s") is not None:
            parts.append(tr("about {duration} left", duration=format_duration(event["eta_s"])))
        return " · ".join(parts)
    if name == "snapshot":
        return tr("Preview updated at iteration {iteration}", iteration=event.get("iteration"))
    if name == "done":
        return tr("Reconstruction finished")
    if name == "cancelled":
        if event.get("checkpoint"):
            return tr("Cancelled; the last checkpoint is kept and the run can be resumed")
        if event.get("stage") and not event.get("forced"):
            return tr("Cancelled before training ({stage})",
                      stage=(tr(_STAGE_TEXT[event["stage"]]) if event["stage"] in _STAGE_TEXT
                             else str(event["stage"])).lower())
        return tr("Cancelled")
    if name == "error":
        return tr("Error: {message}", message=event.get("message"))
    return str(name)


def progress_fraction(event: dict) -> float | None:
    """Overall progress in [0, 1] for a progress event (training dominates; other stages get fixed slots)."""
    if event.get("event") == "done":
        return 1.0
    if event.get("event") != "progress":
        return None
    slots = {"load": (0.0, 0.02), "fdk": (0.02, 0.05), "init": (0.05, 0.07), "train": (0.07, 0.93),
             "voxelize": (0.93, 0.96), "mesh": (0.96, 0.98), "write": (0.98, 1.0)}
    lo, hi = slots.get(event.get("stage"), (None, None))
    if lo is None:
        return None
    it, total = event.get("iteration"), event.get("iterations")
    inner = min(1.0, max(0.0, it / total)) if (it is not None and total) else 0.0
    return round(lo + (hi - lo) * inner, 6)
