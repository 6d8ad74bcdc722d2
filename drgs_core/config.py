"""ReconstructConfig, the one description of a reconstruction run, and the one validator of its values.

The CLI, the worker's REQUEST.json and Python callers all build a ReconstructConfig, and every value passes
`check_values` first: types come from the dataclass annotations and ranges/choices from each field's
``metadata`` (keys below), so a field added later with a default is checked at least by type without any other
change.  Problems are DRGSInputError naming the option (``--views``) or request key (``'views'``), the value
and what to do, raised before any work starts.

Field metadata keys: ``min`` / ``max`` (inclusive bounds of numbers), ``choices`` (allowed strings),
``path`` (a non-empty file or folder path), ``model`` (False: the setting does not change the trained model;
see drgs_core.fingerprint), ``help`` (one line for messages).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

from .errors import DRGSInputError

# Problem sizes for machines without a GPU; values the user sets explicitly win. The CPU presets use fewer
# hash-grid levels: on their 64^3 grids, levels finer than the voxels add cost and nothing else.
PRESETS = {
    None: {"iterations": None, "n_gaussians": 30_000, "log2_table_size": 19, "n_levels": 12,
           "max_gaussians": 150_000},
    "demo": {"iterations": 1200, "n_gaussians": 3000, "log2_table_size": 15, "n_levels": 8, "max_gaussians": 8_000},
    "tiny": {"iterations": 150, "n_gaussians": 800, "log2_table_size": 12, "n_levels": 6, "max_gaussians": 2_000},
}


def _f(default=None, **meta):
    return field(default=default, metadata=meta)


def path_fields() -> tuple:
    """The input-path fields of ReconstructConfig (case, fill, mask, geometry, dicom; not the output folder)."""
    return tuple(f.name for f in fields(ReconstructConfig) if f.metadata.get("path") and f.name != "out")


@dataclass
class ReconstructConfig:
    """One reconstruction run. Give either `case` (a case folder) or `fill` + `mask` + `geometry` files.

    Paths are strings; iso_level and init_threshold are attenuations in 1/mm; counts are positive integers.
    """

    out: str = _f(MISSING, path=True, model=False, help="the output folder")
    case: str | None = _f(None, path=True, model=False)
    fill: str | None = _f(None, path=True, model=False)
    mask: str | None = _f(None, path=True, model=False)
    geometry: str | None = _f(None, path=True, model=False)
    views: int = _f(30, min=1)
    schedule: str = _f("fast", choices=("fast", "full"))
    iterations: int | None = _f(None, min=1)
    device: str = _f("auto", model=False)
    seed: int = _f(0, min=0)
    preset: str | None = _f(None, choices=("demo", "tiny"))
    n_gaussians: int | None = _f(None, min=1)
    init_threshold: str | float = _f("auto", choices=("auto",), min=0.0)
    log2_table_size: int | None = _f(None, min=8, max=24)
    n_levels: int | None = _f(None, min=1, max=24)
    max_gaussians: int | None = _f(None, min=1)
    static_field: bool = _f(False)
    # a signed static background attenuation added to every rendering, for subtraction residues (METHOD §10.8)
    static_background: bool = _f(False)
    # attenuation in 1/mm: vessels with contrast are ~0.01..1 /mm, so anything above 100 cannot be meant
    iso_level: float | None = _f(None, min=1e-12, max=100.0, model=False)
    times_4d: int = _f(8, min=1, model=False)
    cine_frame: int = _f(0, min=0, model=False)
    snapshot_every: int = _f(0, min=0, model=False)
    checkpoint_every: int = _f(1000, min=0, model=False)
    progress_every: int = _f(50, min=1, model=False)
    resume: bool = _f(False, model=False)
    overwrite: bool = _f(False, model=False, help="replace the results of a different run in `out`")
    densify_until: int | None = _f(None, min=0)
    use_secondary_angle: bool = _f(True)  # False: treat SecondaryAngle as 0, as the reference implementation does
    cuda_graph: bool = _f(True, model=False)  # replay training iterations from a CUDA graph (GPU)
    detector_binning: int | str = _f("auto", choices=("auto",), min=1)  # merge k x k pixels; "auto": ~voxel size
    # mesh/segmentation drop components smaller than this many voxels; "auto": a fraction of the segmented voxels
    min_speck_voxels: int | str = _f("auto", choices=("auto",), min=0, model=False)
    # ... unless they lie within this distance (mm) of a larger component: a thin vessel broken at the iso-level
    speck_gap_mm: float = _f(3.0, min=0.0, max=1000.0, model=False)
    registration: str = _f("auto", choices=("auto", "on", "off"))  # mask-to-fill pixel shift before subtraction
    dicom: str | None = _f(None, path=True, model=False)  # rotational XA DICOM folder (drgs_core.io.dicom)
    fill_uid: str | None = _f(None, model=False)  # with dicom: the fill / mask run ids (default: automatic pairing)
    mask_uid: str | None = _f(None, model=False)

    def __post_init__(self):
        check_values(self.__dict__, text=True, into=self)
        filled = []
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
                filled.append(key)
        self._preset_filled = tuple(filled)  # not a field: which values came from the preset, not the user
        if self.case is None and self.dicom is None and not (self.fill and self.mask and self.geometry):
            raise DRGSInputError("no input given", "neither a case folder, a DICOM folder nor fill + mask + geometry files",
                                 "a case folder, a DICOM folder, or all three of fill, mask and geometry",
                                 "pass CASE (a folder with fill_run, mask_run and transforms.json), --dicom DIR or "
                                 "--fill/--mask/--geometry")
        given = [name for name, on in (("a case folder", self.case is not None), ("a DICOM folder", self.dicom is not None),
                                        ("fill/mask/geometry files", bool(self.fill or self.mask or self.geometry))) if on]
        if len(given) > 1:
            raise DRGSInputError("more than one input was given", "both " + " and ".join(given), "one input",
                                 "pass either CASE, --dicom DIR or --fill/--mask/--geometry")

    @classmethod
    def from_dict(cls, d: dict, *, option_names: bool = False, text: bool = False) -> "ReconstructConfig":
        """Build from a request/CLI dict; every value is checked first (strict JSON types unless `text`).

        option_names: name values as CLI options (--views) instead of request keys ('views') in messages.
        text: values may be strings to parse (command-line text), e.g. "2" for an integer field.
        """
        if not isinstance(d, dict):
            raise DRGSInputError("the configuration is not an object", type(d).__name__, "a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DRGSInputError("unknown configuration keys", ", ".join(unknown),
                                 "keys among " + ", ".join(sorted(names)), "remove or rename these keys")
        if d.get("out") is None:
            raise DRGSInputError(f"no output folder given ({_name('out', option_names)})", "nothing",
                                 "a folder for the results", "pass --out FOLDER (request key 'out')")
        values = dict(d)
        check_values(values, option_names=option_names, text=text, into=values)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_preset(self, name: str) -> "ReconstructConfig":
        """This config with the sizes of preset `name` where the user left them unset."""
        d = self.to_dict()
        for key in self._preset_filled:
            d[key] = None
        d["preset"] = name
        return ReconstructConfig(**d)

    def train_config(self):
        from .train import TrainConfig

        return TrainConfig(schedule=self.schedule, iterations=self.iterations, densify_until=self.densify_until,
                           seed=self.seed, checkpoint_every=self.checkpoint_every,
                           snapshot_every=self.snapshot_every, progress_every=self.progress_every,
                           max_gaussians=self.max_gaussians, min_densify_every=int(self.views),
                           cuda_graph=self.cuda_graph, static_background=self.static_background)


# ---- the validator ---------------------------------------------------------------------------------------------

def _name(key: str, option_names: bool) -> str:
    return "--" + key.replace("_", "-") if option_names else repr(key)


def _kinds(cls=ReconstructConfig) -> dict:
    """field name -> set of accepted Python types (bool, int, float, str, NoneType) from the annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        out[f.name] = set(args)
    return out


def _describe(kinds: set, meta: dict) -> str:
    parts = []
    if bool in kinds:
        parts.append("true or false")
    if int in kinds or float in kinds:
        word = "an integer" if int in kinds else "a finite number"
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and hi is not None:
            word += f" in {lo:g}..{hi:g}"
        elif lo is not None:
            word += f" >= {lo:g}"
        parts.append(word)
    if str in kinds:
        if meta.get("choices"):
            parts.append(" or ".join(repr(c) for c in meta["choices"]))
        else:
            parts.append("a non-empty path" if meta.get("path") else "a string")
    if type(None) in kinds:
        parts.append("null (unset)")
    return ", or ".join(parts)


def _parse_text(text: str, kinds: set):
    """Command-line text -> int/float where the field takes numbers; None when it does not parse."""
    for typ in (int, float):
        if typ in kinds:
            try:
                return typ(text)
            except ValueError:
                pass
    return None


def check_value(key: str, value, *, option_names: bool = False, text: bool = False, cls=ReconstructConfig):
    """One value of field `key`, checked against its annotation and metadata; returns it normalised.

    Raises DRGSInputError naming the option/key, the value and what to pass instead.
    """
    f = {x.name: x for x in fields(cls)}[key]
    kinds, meta = _kinds(cls)[key], dict(f.metadata)
    name = _name(key, option_names)
    expected = _describe(kinds, meta)

    def bad(why: str = "is not valid"):
        shown = "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
        return DRGSInputError(f"{name} {why}", shown, expected, f"pass {name} as {expected}")

    if hasattr(value, "item") and not isinstance(value, (str, bool)):  # numpy / torch scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if value is None:
        if type(None) in kinds:
            return None
        raise bad("must be set")
    if isinstance(value, bool):
        if bool in kinds:
            return value
        raise bad()
    if bool in kinds:
        raise bad("must be true or false")
    if isinstance(value, str):
        if str in kinds and (not meta.get("choices") or value in meta["choices"]):
            if meta.get("path") and not value.strip():
                raise bad("is empty")
            return value
        parsed = _parse_text(value, kinds) if text else None
        if parsed is None:
            raise bad()
        value = parsed
    if isinstance(value, (int, float)):
        if int in kinds and float not in kinds:
            if isinstance(value, float):
                if not value.is_integer():
                    raise bad("must be a whole number")
                value = int(value)
        elif float not in kinds:
            raise bad()
        if isinstance(value, float) and not math.isfinite(value):
            raise bad("must be finite")
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise bad("is out of range")
        return value
    raise bad()


def check_values(values: dict, *, option_names: bool = False, text: bool = False, into=None,
                 cls=ReconstructConfig) -> None:
    """Check every known key of `values`; normalised values are written back into `into` (dict or object)."""
    known = {f.name for f in fields(cls)}
    for key in [k for k in values if k in known]:
        value = check_value(key, values[key], option_names=option_names, text=text, cls=cls)
        if isinstance(into, dict):
            into[key] = value
        elif into is not None:
            setattr(into, key, value)


def model_fields(cls=ReconstructConfig) -> list[str]:
    """Fields that change the trained model (all but those marked ``model=False``): the resume fingerprint."""
    return [f.name for f in fields(cls) if f.metadata.get("model", True)]
