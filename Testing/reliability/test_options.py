"""Every bad request value and command-line option is an input error naming it, before any work starts."""

import json
import math
from dataclasses import dataclass, field

import pytest

from drgs_core import cli, worker
from drgs_core.config import ReconstructConfig, check_values
from drgs_core.errors import DRGSInputError

from .conftest import request

# (key, value, words the message must contain)
BAD_REQUEST_VALUES = [
    ("views", "abc", ["'views'", "abc", "integer"]),
    ("views", None, ["'views'", "null"]),
    ("views", 3.7, ["'views'", "3.7", "whole number"]),
    ("views", 0, ["'views'", ">= 1"]),
    ("views", True, ["'views'"]),
    ("device", 5, ["'device'", "5"]),
    ("iterations", "30", ["'iterations'", "'30'"]),
    ("case", 123, ["'case'", "123"]),
    ("progress_every", 0, ["'progress_every'", ">= 1"]),
    ("resume", "no", ["'resume'", "true or false"]),
    ("static_field", 1, ["'static_field'", "true or false"]),
    ("iso_level", math.nan, ["'iso_level'", "finite"]),
    ("iso_level", 1e9, ["'iso_level'", "out of range"]),
    ("snapshot_every", -1, ["'snapshot_every'", ">= 0"]),
    ("n_gaussians", 0, ["'n_gaussians'"]),
    ("n_gaussians", -5, ["'n_gaussians'"]),
    ("max_gaussians", 0, ["'max_gaussians'"]),
    ("checkpoint_every", -1, ["'checkpoint_every'"]),
    ("densify_until", -1, ["'densify_until'"]),
    ("init_threshold", "abc", ["'init_threshold'", "'auto'"]),
    ("detector_binning", 0, ["'detector_binning'"]),
    ("schedule", "slow", ["'schedule'", "'fast'"]),
    ("preset", "huge", ["'preset'", "'demo'"]),
    ("out", None, ["output folder"]),
    ("out", "", ["'out'", "empty"]),
    ("bogus_key", 1, ["unknown", "bogus_key"]),
]


@pytest.mark.parametrize("key, value, words", BAD_REQUEST_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_REQUEST_VALUES])
def test_bad_request_value_is_an_input_error_before_any_work(tiny_case, tmp_path, key, value, words):
    events = []
    req = request(tiny_case, tmp_path / "run")
    req[key] = value
    code = worker.run(req, events.append, lambda: False)
    assert code == worker.EXIT_INPUT
    assert [e["event"] for e in events] == ["error"]  # nothing started
    assert events[0]["kind"] == "input"
    for w in words:
        assert w.lower() in events[0]["message"].lower(), events[0]["message"]
    assert not (tmp_path / "run").exists()


def test_request_out_an_existing_file_and_case_plus_fill(tiny_case, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    for req, word in ((request(tiny_case, f), "existing file"),
                      (request(tiny_case, tmp_path / "r", fill=str(f)), "both")):
        events = []
        assert worker.run(req, events.append, lambda: False) == worker.EXIT_INPUT
        assert events[-1]["kind"] == "input" and word in events[-1]["message"]


def test_worker_config_a_directory_is_an_input_error(tmp_path):
    with pytest.raises(DRGSInputError, match="cannot be read"):
        worker.read_request(str(tmp_path))


BAD_OPTIONS = [
    (["--iso-level", "nan"], "--iso-level"),
    (["--iso-level", "1e9"], "--iso-level"),
    (["--init-threshold", "abc"], "--init-threshold"),
    (["--n-gaussians", "0"], "--n-gaussians"),
    (["--n-gaussians", "-5"], "--n-gaussians"),
    (["--max-gaussians", "0"], "--max-gaussians"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--densify-until", "-1"], "--densify-until"),
    (["--views", "0"], "--views"),
    (["--detector-binning", "zero"], "--detector-binning"),
    (["--snapshot-every", "-1"], "--snapshot-every"),
]


@pytest.mark.parametrize("args, option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_reconstruct_option_names_the_option(tiny_case, tmp_path, capsys, args, option):
    code = cli.main(["reconstruct", str(tiny_case), "--out", str(tmp_path / "r"), "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and option in err and "what to do" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def test_output_folders_that_would_mix_with_the_inputs_are_refused(tiny_case, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    for out, word in ((f, "existing file"), (tiny_case, "inside the case folder"),
                      (f"{tiny_case}/truth", "inside the case folder")):
        code = cli.main(["reconstruct", str(tiny_case), "--out", str(out), "--preset", "tiny"])
        err = capsys.readouterr().err
        assert code == 2 and word in err, err
    assert f.read_text() == "keep me"
    code = cli.main(["fdk", str(tiny_case), "--out", str(f)])
    assert code == 2 and "existing file" in capsys.readouterr().err


def test_case_plus_fill_is_refused(tiny_case, tmp_path, capsys):
    code = cli.main(["reconstruct", str(tiny_case), "--fill", str(tiny_case), "--out", str(tmp_path / "r")])
    assert code == 2 and "both" in capsys.readouterr().err


def test_phantom_frames_zero_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["phantom", str(tmp_path / "p"), "--frames", "0"])
    assert exc.value.code == 2 and "--frames" in capsys.readouterr().err


def test_phantom_beyond_the_machine_memory_is_refused(tmp_path, capsys):
    code = cli.main(["phantom", str(tmp_path / "p"), "--volume", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and "GiB" in err and not (tmp_path / "p").exists()


def test_numpy_numbers_are_accepted_from_python_callers(tmp_path):
    import numpy as np

    cfg = ReconstructConfig(out=str(tmp_path), case="c", views=np.int64(8), iso_level=np.float32(0.5))
    assert cfg.views == 8 and type(cfg.views) is int


def test_evaluate_a_corrupt_metrics_file(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text('{"cut off')
    code = cli.main(["evaluate", str(tmp_path), "--truth", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "damaged" in err and "Traceback" not in err


def test_every_reconstruct_option_is_a_configuration_field():
    """The CLI's keys come from the dataclass: an option without a field would be silently dropped."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["reconstruct"]
    fields = set(ReconstructConfig.__dataclass_fields__)
    extra = {"help", "quiet", *cli.INVERTED_FLAGS}
    dests = {a.dest for a in sub._actions} - extra
    assert dests <= fields, dests - fields
    assert set(cli.INVERTED_FLAGS.values()) <= fields


def test_the_panel_request_keys_are_configuration_fields():
    """The panel keeps its own list (it may run in a Python without drgs_core): it must stay a subset."""
    import ast
    from pathlib import Path

    source = (Path(__file__).parents[2] / "DRGS4DSlicer" / "DRGS4DSlicerLib" / "job.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.Assign) and n.targets[0].id == "REQUEST_KEYS")
    REQUEST_KEYS = ast.literal_eval(node.value)
    assert len(REQUEST_KEYS) > 10 and set(REQUEST_KEYS) <= set(ReconstructConfig.__dataclass_fields__)


def test_the_validator_covers_fields_added_later():
    """A field another module adds (with a default) is checked by type without touching the validator."""
    @dataclass
    class Extended(ReconstructConfig):
        speck_radius_mm: float = field(default=1.0, metadata={"min": 0.0})
        register_mask: bool = False

    for bad in ({"speck_radius_mm": "big"}, {"speck_radius_mm": -1.0}, {"speck_radius_mm": math.inf},
                {"register_mask": "yes"}):
        with pytest.raises(DRGSInputError, match=next(iter(bad))):
            check_values(bad, cls=Extended)
    check_values({"speck_radius_mm": 2, "register_mask": True}, cls=Extended)


def test_request_keys_round_trip_through_json(tiny_case, tmp_path):
    cfg = ReconstructConfig.from_dict(request(tiny_case, tmp_path / "r"))
    again = ReconstructConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()
