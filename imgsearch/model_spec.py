"""A model on disk and how to feed it: the input of the ``saved-model`` encoder.

A user names either the model itself (a ``.keras`` file, a SavedModel folder
or a TF-Hub-format folder) or a small JSON *model spec* that names the model
and its preprocessing::

    {"model": "feature_extractor.keras", "input_size": 224, "range": "0..1"}

The spec lives in the core, not in the plugin, because ``finetune`` writes
one and the ``saved-model`` encoder reads it: one format, one place.  Reading
a spec is cheap (no TensorFlow); what only the model can tell (its input size,
its output dimension) is found by :mod:`imgsearch_saved_model`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError, WeightsError
from .hashing import sha256_file
from .preprocessing import Preprocessing

SPEC_SUFFIX = ".json"
KERAS_SUFFIX = ".keras"
# What pixels the model takes, as (mean, std) on the 0..255 scale of decoded
# pixels: out = (pixel - mean) / std.
RANGES = {
    "0..255": (0.0, 1.0),
    "0..1": (0.0, 255.0),
    "-1..1": (127.5, 127.5),
}
_PREPROCESSING_KEYS = ("input_size", "resize", "resize_to", "interpolation", "channel_order")
_KEYS = ("model", *_PREPROCESSING_KEYS, "range", "mean", "std", "endpoint", "output", "description")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model is and what the user said about feeding it; keys left
    out take defaults that depend on the model (see :meth:`preprocessing`)."""

    model: Path
    source: Path  # the spec file, or the model itself when named directly
    settings: dict = field(default_factory=dict)  # preprocessing keys given
    endpoint: str | None = None
    output: str | None = None
    description: str | None = None

    @classmethod
    def read(cls, weights: str) -> "ModelSpec":
        """The spec named by ``--weights``: a ``.json`` spec or the model itself."""
        path = Path(weights).expanduser()
        if not path.exists():
            raise WeightsError(f"model not found: {path}")
        if not (path.is_file() and path.suffix.lower() == SPEC_SUFFIX):
            return cls(model=path.resolve(), source=path.resolve())
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise WeightsError(f"cannot read model spec {path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"model spec {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(data, dict):
            raise UsageError(f"model spec {path} must be a JSON object")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise UsageError(f"model spec {path}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
        if not isinstance(data.get("model"), str) or not data["model"]:
            raise UsageError(f"model spec {path} must name the model: \"model\": \"PATH\"")
        for key in ("endpoint", "output", "description"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise UsageError(f"model spec {path}: {key!r} must be a string")
        model = (path.parent / data["model"]).expanduser()
        if not model.exists():
            raise WeightsError(f"model spec {path} names {data['model']!r}, which is not there ({model})")
        settings = {key: data[key] for key in (*_PREPROCESSING_KEYS, "range", "mean", "std") if key in data}
        spec = cls(model=model.resolve(), source=path.resolve(), settings=settings,
                   endpoint=data.get("endpoint"), output=data.get("output"),
                   description=data.get("description"))
        spec.preprocessing(224, "0..255")  # a bad value fails now, not after the model loads
        return spec

    @property
    def kind(self) -> str:
        """``"keras"`` or ``"saved-model"`` (which covers the TF-Hub format);
        a one-line error for anything else."""
        model = self.model
        if model.is_file():
            if model.suffix.lower() == KERAS_SUFFIX:
                return "keras"
            if model.suffix.lower() in (".h5", ".hdf5"):
                raise WeightsError(f"{model} is a legacy HDF5 model, which Keras cannot load in safe mode; "
                                   "save it as .keras (model.save('model.keras')) and name that")
            raise WeightsError(f"{model} is not a .keras file, a SavedModel folder or a model spec (.json)")
        if (model / "saved_model.pb").is_file():
            return "saved-model"
        if (model / "tfhub_module.pb").is_file():
            raise WeightsError(f"{model} is in the TF1 Hub format, which TensorFlow 2 cannot load as a "
                               "feature extractor; use the module's TF2 SavedModel version")
        raise WeightsError(f"{model} is a folder but not a SavedModel (no saved_model.pb in it)")

    def preprocessing(self, model_input_size: int | None, default_range: str) -> Preprocessing:
        """The declared preprocessing, with defaults for what was left out:
        the model's own input size (else 224), the ImageNet evaluation crop
        (shorter side scaled to 256/224 of it, centre crop), RGB, and
        ``default_range`` (the convention of the model's format)."""
        given = dict(self.settings)
        where = f"model spec {self.source}"
        if "range" in given and ("mean" in given or "std" in given):
            raise UsageError(f"{where}: give either \"range\" or \"mean\"/\"std\", not both")
        value_range = given.pop("range", None if ("mean" in given or "std" in given) else default_range)
        if value_range is not None:
            if value_range not in RANGES:
                raise UsageError(f"{where}: \"range\" must be one of {', '.join(RANGES)}, not {value_range!r}")
            mean, std = RANGES[value_range]
            given["mean"], given["std"] = (mean,) * 3, (std,) * 3
        size = given.get("input_size", model_input_size or 224)
        if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
            raise UsageError(f"{where}: \"input_size\" must be a whole number of pixels from 8 to 4096")
        given["input_size"] = size
        given.setdefault("resize_to", round(size * 256 / 224))
        for key in ("mean", "std"):
            values = given.get(key, (0.0, 0.0, 0.0) if key == "mean" else (1.0, 1.0, 1.0))
            if (not isinstance(values, (list, tuple)) or len(values) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                raise UsageError(f"{where}: {key!r} must be three numbers (per channel, 0..255 scale)")
            if key == "std" and any(v <= 0 for v in values):
                raise UsageError(f"{where}: \"std\" values must be positive")
            given[key] = tuple(values)
        try:
            return Preprocessing(**given)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{where}: {exc}") from None

    def fingerprint(self) -> str:
        """``sha256:`` of a ``.keras`` file; for a folder ``sha256-tree:`` of
        the lines ``<sha256>  ./<relative path>`` of its files in byte order
        (what ``find . -type f | LC_ALL=C sort | xargs sha256sum`` prints
        in the folder).
        A chosen endpoint or output is part of it: another one gives other
        vectors from the same files."""
        model = self.model
        if model.is_file():
            text = "sha256:" + sha256_file(model)
        else:
            names = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
            lines = [f"{sha256_file(model / name)}  ./{name}\n" for name in names]
            text = "sha256-tree:" + hashlib.sha256("".join(lines).encode()).hexdigest()
        for key in ("endpoint", "output"):
            if getattr(self, key):
                text += f";{key}={getattr(self, key)}"
        return text


def write_spec(path: Path, model: Path, preprocessing: Preprocessing, description: str | None = None) -> Path:
    """Write a model spec naming ``model`` (relative to the spec's folder when
    it is inside it) with every preprocessing setting spelled out."""
    path = Path(path)
    try:
        model_name = Path(model).resolve().relative_to(path.parent.resolve()).as_posix()
    except ValueError:
        model_name = str(Path(model).resolve())
    data = {"model": model_name, **{key: getattr(preprocessing, key) for key in _PREPROCESSING_KEYS},
            "mean": list(preprocessing.mean), "std": list(preprocessing.std)}
    if description:
        data["description"] = description
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
