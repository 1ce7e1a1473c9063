"""Where an encoder's network runs: OpenVINO when it can, Keras otherwise.

An encoder that hands over its Keras model (:meth:`Encoder.build_model`) is
exported once to OpenVINO's format and cached on disk, keyed by everything
that shapes its output: the encoder's name, dimension, preprocessing, weights
fingerprint, the precision and, for int8, the calibration images.  Later
processes load the cached model without importing TensorFlow, which is what
lets a query start in a fraction of a second.

Keras stays the reference: every export is checked against the Keras model
on probe images (natural-looking pictures at the encoder's own input scale,
see probes.py) before it is cached, and every int8 model against its fp32
model on calibration images, within a looser bound (INT8_MIN_COSINE).
Whenever OpenVINO is missing, fails, or the encoder offers no Keras model,
the encoder's own ``load`` and ``embed_batch`` run instead
(``runtime="keras"`` asks for that directly).

Precisions:
  fp32  the same embeddings as Keras (cosine >= 0.9999)
  bf16  the same exported model run with bfloat16 arithmetic, on CPUs that
        have it (AVX512-BF16 or AMX); elsewhere fp32 runs, with a warning
  int8  weights and activations quantized by NNCF, calibrated on the user's
        own images
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import ImgsearchError, UsageError, first_line
from .paths import cache_dir

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "openvino", "keras")
PRECISIONS = ("fp32", "bf16", "int8")
# Bumped whenever the export steps change what a cached model contains (3:
# models checked on natural-looking probes, int8 ones against fp32).
EXPORT_VERSION = 3
# Export is refused below this cosine between OpenVINO fp32 and Keras, on
# any probe image (see probes.py: natural-looking pictures at the encoder's
# own input scale).
FP32_MIN_COSINE = 0.9999
# An int8 model is refused below this cosine to its fp32 model on any of the
# calibration images checked: the user's own pictures, what the model was
# calibrated on and will embed.  (Not on the synthetic probes: a model
# calibrated on one kind of picture may rightly clip what lies outside its
# ranges.)  8-bit steps move vectors a little (efficientnet-lite0 on the
# 3,925 imagenette val photos: min 0.979, mean 0.998; calibrated on the ten
# tench sample photos, on them: min 0.998); a broken quantization moves them
# much further (the same model reading its channels reversed: 0.69).
INT8_MIN_COSINE = 0.95
INT8_CHECKED_IMAGES = 16
# NNCF's default statistics budget; more images barely move the ranges.
CALIBRATION_IMAGES = 300
MODEL_FILE = "model.xml"
# Convolutions (in graph order) that int8 models keep in float.
STEM_IN_FLOAT = 2

Run = Callable[[np.ndarray], np.ndarray]


def check_choice(runtime: str, precision: str | None) -> None:
    """A one-line error for a runtime or precision that cannot be."""
    if runtime not in RUNTIMES:
        raise UsageError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision not in (None, "fp32") and runtime == "keras":
        raise UsageError(f"--precision {precision} needs the OpenVINO runtime, not keras")


@dataclass(frozen=True)
class RuntimeOptions:
    """How the caller wants an encoder run.

    ``calibration`` (int8 only) returns the user's images as normalised
    pixels; it is called only when no calibrated model is cached for
    ``calibration_id``, a digest naming those images.
    """

    runtime: str = "auto"
    precision: str = "fp32"
    calibration: Callable[[], Sequence[np.ndarray]] | None = None
    calibration_id: str | None = None
    # Whether fp32 may stand in when this precision cannot run here: true
    # for reading an index (bf16 and int8 vectors approximate fp32 ones),
    # never for adding to one, whose vectors must all be made the same way.
    fp32_fallback: bool = False

    def __post_init__(self):
        check_choice(self.runtime, self.precision)
        if self.precision == "int8" and not self.calibration_id:
            raise UsageError("int8 needs calibration images (the images being indexed)")


@dataclass(frozen=True)
class Calibration:
    """The user's images that calibrate an int8 model: up to
    :data:`CALIBRATION_IMAGES`, spread evenly over the files found (sorted,
    so folders of different classes all contribute)."""

    paths: tuple[Path, ...]
    hashes: tuple[str, ...]
    preprocessing: object

    @classmethod
    def from_paths(cls, paths, preprocessing, limit: int = CALIBRATION_IMAGES) -> "Calibration":
        from . import images as imgs
        from .hashing import sha256_file

        files, _ = imgs.discover(paths)
        if not files:
            raise UsageError("int8 needs calibration images, and none were found in "
                             + ", ".join(str(p) for p in paths))
        step = max(1, len(files) / limit)
        chosen = [files[int(i * step)].path for i in range(min(limit, len(files)))]
        kept, hashes = [], []
        for path in chosen:
            try:
                hashes.append(sha256_file(path))
                kept.append(path)
            except OSError:
                continue  # unreadable files are the indexer's to report
        return cls(tuple(kept), tuple(hashes), preprocessing)

    @property
    def id(self) -> str:
        """A digest of the images' content hashes, in order."""
        return hashlib.sha256("\n".join(self.hashes).encode()).hexdigest()[:24]

    def pixels(self) -> list[np.ndarray]:
        """The images as the encoder's normalised input; bad files are left out."""
        from . import images as imgs

        out = []
        for path in self.paths:
            try:
                pixels, _ = imgs.to_pixels(imgs.read_bytes(path), self.preprocessing)
            except imgs.DecodeError:
                continue
            out.append(self.preprocessing.normalize(pixels))
        return out

    def options(self, runtime: str = "auto") -> "RuntimeOptions":
        return RuntimeOptions(runtime, "int8", calibration=self.pixels, calibration_id=self.id)


def effective_precision(runtime_name: str) -> str:
    """The precision behind a runtime name, i.e. what actually runs
    (``openvino-bf16`` -> bf16; bf16 asked on a CPU without it runs as
    ``openvino-fp32``; Keras and an encoder's own code run fp32)."""
    return runtime_name.rpartition("-")[2] if runtime_name.startswith("openvino-") else "fp32"


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def openvino_version() -> str:
    """The installed OpenVINO's release, without its build suffix: what a
    cached model is keyed by, and what every node of a cluster must share
    for an int8 model."""
    import openvino

    return openvino.get_version().split("-")[0]


def exportable(encoder) -> bool:
    """Whether the encoder offers a Keras model that can be exported."""
    return encoder.offers_model()


def check_offered(encoder, precision: str, runtime: str = "auto") -> None:
    """A one-line error, before any work, when the encoder cannot run so."""
    if not exportable(encoder) and (precision != "fp32" or runtime == "openvino"):
        raise UsageError(f"encoder {encoder.name!r} offers no Keras model to export, so it runs "
                         f"only on its own code in fp32 (not --runtime openvino or --precision {precision})")
    if precision not in encoder.precisions:
        note = encoder.precision_notes.get(precision)
        raise UsageError(f"encoder {encoder.name!r} offers --precision {', '.join(encoder.precisions)}, "
                         f"not {precision}" + (f": {note}" if note else ""))


def load(encoder, options: RuntimeOptions) -> tuple[Run, str]:
    """A callable from normalised pixels to raw embeddings, and the name of
    the runtime and precision behind it (``"openvino-int8"``, ``"keras"``)."""
    check_offered(encoder, options.precision, options.runtime)
    note = encoder.precision_notes.get(options.precision)
    if note:
        logger.warning("%s %s: %s", encoder.name, options.precision, note)
    wants_openvino = options.runtime == "openvino" or options.precision != "fp32"
    if not exportable(encoder):
        # An encoder without a Keras model runs its own code; that is normal.
        encoder.load()
        return encoder.embed_batch, "native"
    if options.runtime != "keras":
        problem = None
        if not openvino_available():
            problem = "OpenVINO is not installed (pip install openvino)"
        else:
            try:
                return _OpenVINO(encoder, options).load()
            except ExportError as exc:
                problem = str(exc)
        if wants_openvino and not (options.fp32_fallback and options.runtime == "auto"):
            raise UsageError(f"cannot run {encoder.name} with OpenVINO {options.precision}: {problem}")
        logger.warning("running %s with Keras in fp32: %s", encoder.name, problem)
    encoder.load()
    return encoder.embed_batch, "keras"


def calibrated_model(encoder) -> dict[str, bytes]:
    """The files of the int8 model ``encoder`` (loaded, at int8) runs: what
    another machine needs to embed exactly as this one, since calibrating
    there would make other vectors."""
    folder = _OpenVINO(encoder, encoder.options())._path("int8").parent
    try:
        return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
    except OSError as exc:
        raise UsageError(f"cannot read the calibrated int8 model in {folder} ({exc.strerror or exc})") from None


def install_calibrated_model(encoder, options: RuntimeOptions, files: dict[str, bytes]) -> None:
    """Put another machine's calibrated int8 model (:func:`calibrated_model`)
    where loading ``encoder`` with ``options`` looks for it, unless one is
    there already."""
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / Path(name).name).write_bytes(data)

    try:
        exporter = _OpenVINO(encoder, options)
        path = exporter._path("int8")
        if not path.is_file():
            exporter._install(path.parent, write)
    except ExportError as exc:
        raise UsageError(f"cannot install the calibrated int8 model: {exc}") from None


class ExportError(Exception):
    """The OpenVINO path cannot be used; Keras takes over (or the user is told)."""


class _OpenVINO:
    """Find, or make and cache, the OpenVINO model of one encoder."""

    def __init__(self, encoder, options: RuntimeOptions):
        self.encoder = encoder
        self.options = options
        try:
            import openvino
        except Exception as exc:  # a broken install is a reason to use Keras
            raise ExportError(f"OpenVINO does not import ({first_line(exc)})") from None
        self.ov = openvino
        self._bf16: bool | None = None
        self._keys: dict[str, str] = {}  # the fingerprint may hash a weights file: once is enough

    # -- cache keys ------------------------------------------------------
    def _key(self, kind: str) -> str:
        if kind not in self._keys:
            self._keys[kind] = self._make_key(kind)
        return self._keys[kind]

    def _make_key(self, kind: str) -> str:
        encoder = self.encoder
        facts = {
            "export_version": EXPORT_VERSION,
            "openvino": openvino_version(),
            "encoder": encoder.name,
            "dim": encoder.dim,
            "preprocessing": encoder.preprocessing.to_dict(),
            "weights_fingerprint": encoder.weights_fingerprint(),
            "kind": kind,
            "calibration": self.options.calibration_id if kind == "int8" else None,
        }
        digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]
        return f"{encoder.name}-{kind}-{digest}"

    def _path(self, kind: str) -> Path:
        return cache_dir() / "openvino" / self._key(kind) / MODEL_FILE

    # -- loading ---------------------------------------------------------
    def load(self) -> tuple[Run, str]:
        precision = self.options.precision
        kind = "int8" if precision == "int8" else "fp32"
        self._keras_model = None
        if not self.encoder.weights_status().available:
            # Weights not fetched yet (resnet50's first use): building the
            # Keras model downloads them, or says in one line why it cannot.
            self._keras_model = self.encoder.build_model()
        path = self._path(kind)
        if path.is_file():
            try:
                return self._compile(path), f"openvino-{self._effective(precision)}"
            except Exception as exc:  # a damaged cache entry is rebuilt, never fatal
                logger.warning("rebuilding the cached OpenVINO model %s (%s)", path.parent, first_line(exc))
                shutil.rmtree(path.parent, ignore_errors=True)
        if kind == "int8" and self.options.calibration is None:
            # An int8 index used where its calibrated model is not cached
            # (another machine, a cleared cache, another OpenVINO version).
            if not self.options.fp32_fallback:
                raise UsageError(
                    "the int8 model calibrated for this index is not cached here (another machine, "
                    "a cleared cache or another OpenVINO version); its images cannot be embedded the "
                    "same way again, so build a new index (queries still work, in fp32)"
                )
            logger.warning("the int8 model calibrated for this index is not cached here; "
                           "embedding in fp32 instead")
            self.options = RuntimeOptions(self.options.runtime, "fp32")
            return self.load()
        try:
            self._make(kind, path)
        except (ExportError, ImgsearchError):  # one-line reasons already (weights, NNCF missing)
            raise
        except Exception as exc:  # whatever OpenVINO or NNCF raise: Keras can still run
            raise ExportError(f"the export failed ({type(exc).__name__}: {first_line(exc)})") from None
        try:
            return self._compile(path), f"openvino-{self._effective(precision)}"
        except Exception as exc:
            raise ExportError(f"the exported model does not load ({first_line(exc)})") from None

    def _effective(self, precision: str) -> str:
        if precision == "bf16" and not self._cpu_has_bf16():
            return "fp32"
        return precision

    def _cpu_has_bf16(self) -> bool:
        if self._bf16 is None:
            try:
                self._bf16 = "BF16" in self.ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            except Exception:
                self._bf16 = False
        return self._bf16

    def _compile(self, path: Path) -> Run:
        precision = self.options.precision
        if precision == "bf16" and not self._cpu_has_bf16():
            logger.warning("this CPU has no bfloat16 instructions; running fp32 instead of bf16")
        core = self.ov.Core()
        # fp32 must be asked for: on CPUs with bf16 units OpenVINO may pick
        # bf16 on its own, and fp32 promises Keras' embeddings.  int8 models
        # carry their precision in the graph; what is left runs in fp32.
        hint = "bf16" if precision == "bf16" else "f32"
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint})
        request = compiled.create_infer_request()
        lock = threading.Lock()

        def run(pixels: np.ndarray) -> np.ndarray:
            batch = np.ascontiguousarray(pixels, dtype=np.float32)
            with lock:
                # The result views the request's own buffer, which the next
                # call overwrites: copy it out while still holding the lock.
                return np.array(request.infer({0: batch})[0], dtype=np.float32, copy=True)

        return run

    # -- making ----------------------------------------------------------
    def _make(self, kind: str, path: Path) -> None:
        # Tens of seconds with nothing to show otherwise: say what is happening.
        if kind == "int8":
            logger.warning("calibrating %s int8 on your images (first use of this calibration; "
                           "cached for later runs) ...", self.encoder.name)
            fp32_path = self._path("fp32")
            if not fp32_path.is_file():
                self._make("fp32", fp32_path)
            model, samples = self._quantize(fp32_path)
            self._check_int8(model, fp32_path, samples)
        else:
            logger.warning("exporting %s to OpenVINO (first use of these weights; cached for later "
                           "runs) ...", self.encoder.name)
            model = self._export()
        self._save(model, path)

    def _export(self):
        """Convert the Keras model and check it against Keras itself."""
        from .keras_support import import_keras

        import_keras()
        keras_model = self._keras_model or self.encoder.build_model()
        size = self.encoder.preprocessing.input_size
        try:
            with warnings.catch_warnings():
                # Keras complains about the input structure OpenVINO traces with.
                warnings.simplefilter("ignore")
                model = self.ov.convert_model(keras_model, input=[(-1, size, size, 3)])
        except Exception as exc:
            raise ExportError(f"OpenVINO could not convert the model ({first_line(exc)})") from None
        self._check_against_keras(model, keras_model, size)
        return model

    def _probes(self) -> np.ndarray:
        """Natural-looking images through the encoder's own preprocessing."""
        from .probes import probe_pixels

        prep = self.encoder.preprocessing
        return np.ascontiguousarray(prep.normalize(probe_pixels(prep.input_size)), dtype=np.float32)

    def _check_against_keras(self, model, keras_model, size: int) -> None:
        probe = self._probes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = np.asarray(keras_model(probe, training=False), dtype=np.float32)
        compiled = self.ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = np.asarray(compiled(probe)[0], dtype=np.float32)
        if got.shape != expected.shape:
            raise ExportError(f"the exported model gives shape {got.shape}, Keras {expected.shape}")
        cosine = _cosines(got, expected).min()
        if not cosine >= FP32_MIN_COSINE:
            raise ExportError(f"the exported model disagrees with Keras (cosine {cosine:.6f})")

    def _check_int8(self, model, fp32_path: Path, samples: list[np.ndarray]) -> None:
        """The quantized model against its fp32 model, on calibration images
        spread over all of them (see INT8_MIN_COSINE)."""
        step = max(1, len(samples) // INT8_CHECKED_IMAGES)
        probe = np.concatenate(samples[::step][:INT8_CHECKED_IMAGES])
        core = self.ov.Core()
        expected = core.compile_model(str(fp32_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(probe)[0]
        got = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(probe)[0]
        cosines = _cosines(np.asarray(got, np.float32), np.asarray(expected, np.float32))
        logger.debug("int8 against fp32 on %d images: min cosine %.4f, mean %.4f",
                     len(probe), cosines.min(), cosines.mean())
        if not cosines.min() >= INT8_MIN_COSINE:
            raise ExportError(f"the int8 model disagrees with the fp32 model (cosine {cosines.min():.4f} on "
                              f"one of {len(probe)} images, below {INT8_MIN_COSINE}); nothing was cached")

    def _quantize(self, fp32_path: Path) -> tuple[object, list[np.ndarray]]:
        calibrate = self.options.calibration
        if calibrate is None:
            raise ExportError("no calibration images were given for int8")
        try:
            import nncf
        except ImportError:
            raise UsageError("--precision int8 needs NNCF: pip install nncf") from None
        samples = [np.ascontiguousarray(pixels[None], dtype=np.float32) for pixels in calibrate()]
        if not samples:
            raise UsageError("int8 needs calibration images, and none could be read")
        logging.getLogger("nncf").setLevel(logging.ERROR)
        model = self.ov.Core().read_model(str(fp32_path))
        # The first layers see the raw image, where 8-bit steps cost the most:
        # keeping the first two convolutions in float raised efficientnet-lite0's
        # top-10 neighbour overlap with fp32 from 0.886 to 0.943 on imagenette
        # (1,500 indexed, 500 queries) for a small part of the speed.
        convolutions = [op.get_friendly_name() for op in model.get_ordered_ops()
                        if op.get_type_name() in ("Convolution", "GroupConvolution")]
        # NNCF draws progress bars on stdout, which belongs to results.
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples),
                                      preset=nncf.QuantizationPreset.PERFORMANCE,
                                      ignored_scope=nncf.IgnoredScope(names=convolutions[:STEM_IN_FLOAT]))
        return quantized, samples

    def _save(self, model, path: Path) -> None:
        # Weights stay fp32: OpenVINO's default halves them to fp16, which
        # would break the promise of Keras' embeddings.
        self._install(path.parent, lambda tmp: self.ov.save_model(model, str(tmp / MODEL_FILE),
                                                                  compress_to_fp16=False))

    def _install(self, folder: Path, write: Callable[[Path], None]) -> None:
        """Write a cache entry in a temporary folder (``write`` puts the
        files into the folder it is given) and rename it into place, so a
        reader sees a complete entry or none."""
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_exports(folder.parent)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        except OSError as exc:
            raise ExportError(f"cannot write the model cache in {folder.parent} ({exc.strerror or exc})") from None
        try:
            write(tmp)
            try:
                os.replace(tmp, folder)
            except OSError:
                if not (folder / MODEL_FILE).is_file():  # not a twin process having won the race
                    raise
        except Exception as exc:
            raise ExportError(f"cannot write the model cache in {folder.parent} ({first_line(exc)})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_exports(folder: Path, older_than_s: float = 6 * 3600) -> None:
    """Remove temporary folders of exports whose process was killed.  Only
    old ones: a young one may belong to a twin process still writing."""
    import time

    for leftover in folder.glob(".*"):
        try:
            if leftover.is_dir() and time.time() - leftover.stat().st_mtime > older_than_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)
