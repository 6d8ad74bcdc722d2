"""The JSON-lines protocol: encoding (worker side), parsing and validation (panel side)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from DRGS4DSlicerLib import protocol
from drgs_core import worker


def test_versions_and_exit_codes_agree_between_worker_and_panel():
    assert worker.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION == 1
    assert (worker.EXIT_DONE, worker.EXIT_INTERNAL, worker.EXIT_INPUT, worker.EXIT_CANCELLED) == \
        (protocol.EXIT_DONE, protocol.EXIT_INTERNAL, protocol.EXIT_INPUT, protocol.EXIT_CANCELLED)


SAMPLES = [
    {"event": "started", "run_dir": "/tmp/r", "n_frames": 133, "views": 30, "iterations": 10000, "device": "cuda:0"},
    {"event": "progress", "stage": "train", "iteration": 100, "iterations": 10000, "loss": 0.0123,
     "n_gaussians": 30000, "elapsed_s": 12.5, "eta_s": 1200.0},
    {"event": "progress", "stage": "fdk"},
    {"event": "snapshot", "iteration": 500, "volume": "/tmp/r/s/v.nii.gz", "mesh": "/tmp/r/s/m.vtk"},
    {"event": "done", "outputs": {"volume": "/tmp/r/volume.nii.gz"}, "metrics": {"iso_level": 0.008}},
    {"event": "cancelled", "checkpoint": "/tmp/r/ckpt.pt", "iteration": 1200},
    {"event": "cancelled", "checkpoint": None, "iteration": 0, "stage": "fdk"},  # stopped before training
    {"event": "error", "kind": "input", "message": "views > frames"},
]


@pytest.mark.parametrize("event", SAMPLES, ids=[s["event"] + str(i) for i, s in enumerate(SAMPLES)])
def test_worker_encoding_round_trips_through_panel_parser(event):
    line = worker.encode_event(event)
    assert "\n" not in line
    parsed = protocol.parse_line(line + "\n")
    assert parsed.kind == "event", parsed.problem
    assert parsed.event["protocol"] == 1
    for key, value in event.items():
        assert parsed.event[key] == value
    # the panel's own encoder produces the same object
    assert json.loads(protocol.encode_event(event)) == json.loads(line)


def test_encoding_makes_numpy_paths_and_nan_json_safe():
    event = {"event": "progress", "stage": "train", "iteration": np.int64(7), "iterations": np.int32(10),
             "loss": float("nan"), "n_gaussians": np.int64(5), "elapsed_s": np.float32(1.5), "eta_s": float("inf"),
             "extra": {"path": Path("/a/b"), "arr": np.arange(3)}}
    for encode in (worker.encode_event, protocol.encode_event):
        line = encode(event)
        obj = json.loads(line)  # strict JSON: would fail on NaN with a strict parser below
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert obj["iteration"] == 7 and obj["loss"] is None and obj["eta_s"] is None
        assert obj["extra"] == {"path": "/a/b", "arr": [0, 1, 2]}
        assert protocol.parse_line(line).kind == "event"


@pytest.mark.parametrize("line", ["", "hello world", "{not json", "[1, 2]", '{"a": 1}', "Traceback (most recent",
                                  '"just a string"'])
def test_noise_is_not_an_event(line):
    assert protocol.parse_line(line).kind == "noise"


@pytest.mark.parametrize("obj, problem", [
    ({"protocol": 1, "event": "snapshot", "volume": "v"}, "iteration"),
    ({"protocol": 2, "event": "progress", "stage": "train"}, "protocol 2"),
    ({"event": "progress", "stage": "train"}, "protocol None"),
    ({"protocol": 1, "event": "started", "run_dir": "r", "n_frames": True, "views": 3, "iterations": 1,
      "device": "cpu"}, "n_frames"),
    ({"protocol": 1, "event": "error", "kind": "input"}, "message"),
    ({"protocol": 1, "event": "done", "outputs": []}, "outputs"),
])
def test_invalid_events_are_reported_with_a_reason(obj, problem):
    parsed = protocol.parse_line(json.dumps(obj))
    assert parsed.kind == "invalid"
    assert problem in parsed.problem


def test_validation_normalises_integral_floats_and_fills_optional_fields():
    parsed = protocol.parse_line('{"protocol":1,"event":"progress","stage":"train","iteration":10.0}')
    assert parsed.event["iteration"] == 10 and isinstance(parsed.event["iteration"], int)
    assert parsed.event["loss"] is None and parsed.event["eta_s"] is None
    unknown_stage = protocol.parse_line('{"protocol":1,"event":"progress","stage":"polish"}')
    assert unknown_stage.kind == "event" and unknown_stage.event["stage_known"] is False


def test_unknown_events_pass_through_for_forward_compatibility():
    parsed = protocol.parse_line('{"protocol":1,"event":"heartbeat","t":3}')
    assert parsed.kind == "event" and parsed.event == {"protocol": 1, "event": "heartbeat", "t": 3}


def test_line_buffer_reassembles_partial_lines_and_split_utf8():
    events = [worker.encode_event({"event": "error", "kind": "input", "message": "angle 200° ≠ frames"}),
              worker.encode_event(SAMPLES[1])]
    data = ("noise\r\n" + events[0] + "\n" + events[1] + "\n" + "partial tail").encode("utf-8")
    buf = protocol.LineBuffer()
    lines = []
    for i in range(len(data)):  # one byte at a time: splits the multibyte characters too
        lines += buf.feed(data[i:i + 1])
    assert lines == ["noise", events[0], events[1]]
    assert buf.flush() == ["partial tail"]
    assert buf.flush() == []
    assert protocol.parse_line(lines[1]).event["message"] == "angle 200° ≠ frames"


def test_line_buffer_bounds_a_runaway_line():
    buf = protocol.LineBuffer(max_line=100)
    out = buf.feed(b"x" * 250)
    assert len(out) == 1 and len(out[0]) == 250
    assert buf.feed(b"ok\n") == ["ok"]


def test_human_readable_texts():
    assert protocol.format_duration(None) == "?"
    assert protocol.format_duration(12.4) == "12 s"
    assert protocol.format_duration(75) == "1 min 15 s"
    assert protocol.format_duration(3725) == "1 h 02 min"
    text = protocol.describe_event(protocol.parse_line(worker.encode_event(SAMPLES[1])).event)
    assert text.startswith("Training 100/10000") and "loss 0.0123" in text and "30,000 Gaussians" in text
    assert "left" in text and "elapsed" in text
    assert "resumed" in protocol.describe_event({"event": "cancelled", "checkpoint": "x"})
    early = protocol.parse_line(worker.encode_event(SAMPLES[6])).event
    assert early["checkpoint"] is None
    assert protocol.describe_event(early) == "Cancelled before training (fdk initial reconstruction)"
    assert protocol.describe_event({"event": "cancelled", "checkpoint": None, "forced": True}) == "Cancelled"
    assert protocol.describe_event({"event": "error", "message": "bad"}) == "Error: bad"


def test_progress_fraction_is_monotonic_over_the_stages():
    seq = [{"event": "progress", "stage": s} for s in ("load", "fdk", "init")]
    seq += [{"event": "progress", "stage": "train", "iteration": i, "iterations": 100} for i in (1, 50, 100)]
    seq += [{"event": "progress", "stage": s} for s in ("voxelize", "mesh", "write")]
    fractions = [protocol.progress_fraction(e) for e in seq]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)
    assert math.isclose(protocol.progress_fraction({"event": "done"}), 1.0)
    assert protocol.progress_fraction({"event": "snapshot"}) is None


def test_status_texts_go_through_the_translation_hook(monkeypatch):
    """Whole sentences with named placeholders are translated first, then formatted (never concatenated)."""
    seen = []

    def fake_translate(text):
        seen.append(text)
        return text.replace("Training", "Entraînement").replace("about {duration} left", "encore {duration}")

    monkeypatch.setattr(protocol, "translate", fake_translate)
    text = protocol.describe_event({"event": "progress", "stage": "train", "iteration": 5, "iterations": 10,
                                    "eta_s": 75})
    assert text == "Entraînement 5/10 · encore 1 min 15 s"
    assert "{stage} {iteration}/{total}" in seen and all("5" not in s for s in seen)
