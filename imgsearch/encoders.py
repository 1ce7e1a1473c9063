"""The encoder contract, the registry and plugin discovery.

A plugin is a Python module with a ``register_encoders(register)`` function
that calls ``register(SomeEncoderClass)`` once per encoder it provides.  The
module is found either through the ``imgsearch.encoders`` entry-point group
(installed packages, including this project's own built-in encoders) or as a
``*.py`` file in a plugins folder (``--plugins-dir`` / ``IMGSEARCH_PLUGINS_DIR``).

Nothing here imports a deep-learning framework: encoder classes describe
themselves through class attributes, and only :meth:`Encoder.load` may import
TensorFlow or anything else heavy.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, ClassVar, Iterable

import numpy as np

from .errors import PluginError, UnknownEncoderError, first_line
from .preprocessing import Preprocessing

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "imgsearch.encoders"
HOOK_NAME = "register_encoders"
RANDOM_WEIGHTS = "none"


def random_fingerprint(seed: int) -> str:
    """The fingerprint of seeded random weights (``--weights none``)."""
    return f"random:seed{seed}"


@dataclass(frozen=True)
class WeightsStatus:
    """Whether an encoder can run on this machine without fetching anything."""

    available: bool
    detail: str


class Encoder:
    """Base class of every encoder.

    Subclasses set the class attributes and implement :meth:`load`,
    :meth:`embed_batch` and :meth:`weights_status`.  ``weights`` is a string
    the encoder interprets: ``"imagenet"`` (or whatever its default is), a
    local file path, or ``"none"`` for random initialisation (tests and
    benchmarks only; results are meaningless).
    """

    name: ClassVar[str]
    dim: ClassVar[int]
    description: ClassVar[str] = ""
    preprocessing: ClassVar[Preprocessing]
    batch_size: ClassVar[int] = 32
    default_weights: ClassVar[str] = "imagenet"
    # The --precision values offered (bf16 and int8 need build_model).  An
    # encoder should offer only those whose neighbours stay those of fp32.
    # ``precision_notes`` explain a precision: why it is not offered (shown
    # with the refusal) or what is not yet known (a warning when used).
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "int8")
    precision_notes: ClassVar[dict[str, str]] = {}

    def __init__(self, weights: str | None = None):
        weights = weights if weights else self.default_weights_spec()
        path = Path(weights).expanduser()
        if weights.lower() not in (RANDOM_WEIGHTS, self.default_weights) and path.exists():
            # Recorded in the manifest: it must still name the file when the
            # index is used from another working directory.
            weights = str(path.resolve())
        self.weights = weights
        self._loaded = False
        self._forward = None  # set by ensure_loaded: normalised pixels to raw vectors
        self.runtime_options = None  # RuntimeOptions; None means the defaults
        self.runtime_name: str | None = None  # what actually runs, once loaded

    # -- description, cheap ---------------------------------------------
    @classmethod
    def default_weights_spec(cls) -> str:
        """The weights used when the user names none (may read the environment)."""
        return cls.default_weights

    @property
    def random_weights(self) -> bool:
        return self.weights.lower() == RANDOM_WEIGHTS

    def weights_status(self) -> WeightsStatus:
        """Whether the weights are on this machine; must not import heavy modules.
        (While it says no, a Keras encoder is built before the OpenVINO cache
        is consulted, to fetch them; encoders whose default weights are not a
        file path should override it.)"""
        if self.random_weights:
            return WeightsStatus(True, "random initialisation (tests only)")
        path = Path(self.weights).expanduser()
        if path.is_file():
            return WeightsStatus(True, f"file {path}")
        return WeightsStatus(False, f"weights {self.weights!r} not found")

    def weights_fingerprint(self) -> str:
        """A string that changes whenever the weights do.  It must work before
        :meth:`load` whenever :meth:`weights_status` says the weights are
        here, and stay cheap: the OpenVINO cache is looked up by it, and a
        cache hit must not build the model."""
        raise NotImplementedError

    @property
    def precision(self) -> str:
        """The precision the vectors are made at: once loaded, what actually
        runs (bf16 asked on a CPU without it runs fp32), before that what
        was asked for."""
        if self.runtime_name is None:
            return self.options().precision
        from .runtime import effective_precision

        return effective_precision(self.runtime_name)

    def describe(self) -> dict:
        """What the manifest records about how vectors were made."""
        options = self.options()
        return {
            "name": self.name,
            "dim": self.dim,
            "preprocessing": self.preprocessing.to_dict(),
            "weights": self.weights,
            "weights_fingerprint": self.weights_fingerprint(),
            "random_weights": self.random_weights,
            "precision": self.precision,
            "calibration": options.calibration_id,
        }

    # -- how it runs -----------------------------------------------------
    def use_runtime(self, options) -> "Encoder":
        """Choose the runtime and precision (a :class:`RuntimeOptions`);
        only before the encoder is loaded."""
        if self._loaded:
            raise RuntimeError("choose the runtime before the encoder is loaded")
        self.runtime_options = options
        return self

    def options(self):
        from .runtime import RuntimeOptions

        return self.runtime_options or RuntimeOptions()

    # -- work, heavy -----------------------------------------------------
    def build_model(self):
        """Optional: the Keras model from normalised pixels ``(n, H, W, 3)``
        to ``(n, dim)``, weights loaded.  An encoder that offers it can run
        through OpenVINO (exported once and cached); one that does not
        always runs through :meth:`load` and :meth:`embed_batch`."""
        raise NotImplementedError

    @classmethod
    def offers_model(cls) -> bool:
        """Whether :meth:`build_model` is implemented (so that the encoder
        can run through OpenVINO and at other precisions)."""
        return cls.build_model is not Encoder.build_model

    def load(self) -> None:
        """Build the model and load the weights; raise WeightsError with a
        one-line message when that is impossible."""
        raise NotImplementedError

    def embed_batch(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels``: float32 ``(n, H, W, 3)`` already prepared as declared in
        :attr:`preprocessing`.  Returns float32 ``(n, dim)``, not normalised."""
        raise NotImplementedError

    def ensure_loaded(self) -> "Encoder":
        if not self._loaded:
            from . import runtime

            self._forward, self.runtime_name = runtime.load(self, self.options())
            self._loaded = True
        return self

    def embed_images(self, images: Iterable) -> np.ndarray:
        """Decoded PIL images to raw ``(n, dim)`` embeddings, in batches."""
        arrays = [self.preprocessing.resize_image(image) for image in images]
        return self.embed_pixels(np.stack(arrays) if arrays else np.empty((0, 0, 0, 3), np.uint8))

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Resized uint8 RGB pixels ``(n, H, W, 3)`` to raw ``(n, dim)`` embeddings."""
        self.ensure_loaded()
        if len(pixels) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(pixels), self.batch_size):
            batch = self.preprocessing.normalize(pixels[start : start + self.batch_size])
            vectors = np.asarray(self._forward(batch), dtype=np.float32)
            if vectors.shape != (len(batch), self.dim):
                raise PluginError(
                    f"encoder {self.name!r} returned shape {vectors.shape}, "
                    f"expected {(len(batch), self.dim)}"
                )
            out.append(vectors)
        return np.concatenate(out)


Register = Callable[[type], None]


@dataclass(frozen=True)
class Registration:
    encoder: type
    source: str


class Registry:
    """Encoder classes by name, each with where it came from."""

    def __init__(self):
        self._by_name: dict[str, Registration] = {}
        self.plugins_dir: Path | None = None  # the folder plugin files came from, if any

    def register(self, encoder_cls: type, source: str) -> None:
        name = getattr(encoder_cls, "name", None)
        if not isinstance(encoder_cls, type) or not issubclass(encoder_cls, Encoder):
            raise PluginError(f"{source} registered {encoder_cls!r}, which is not an Encoder subclass")
        for attribute in ("name", "dim", "preprocessing"):
            if not hasattr(encoder_cls, attribute):
                raise PluginError(f"{source}: encoder {encoder_cls.__name__} has no {attribute!r}")
        if not isinstance(encoder_cls.preprocessing, Preprocessing):
            raise PluginError(f"{source}: encoder {name!r} must declare a Preprocessing")
        if name in self._by_name:
            first = self._by_name[name].source
            raise PluginError(f"encoder name {name!r} is claimed by two plugins: {first} and {source}")
        self._by_name[name] = Registration(encoder_cls, source)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> type:
        try:
            return self._by_name[name].encoder
        except KeyError:
            raise UnknownEncoderError(name, self._by_name) from None

    def source(self, name: str) -> str:
        self.get(name)
        return self._by_name[name].source

    def from_plugins_dir(self, name: str) -> bool:
        """Whether ``name`` came from a plugin file rather than a package."""
        return self.source(name).startswith("plugin file ")

    def create(self, name: str, weights: str | None = None) -> Encoder:
        return self.get(name)(weights)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)


def _call_hook(module, source: str, registry: Registry) -> None:
    hook = getattr(module, HOOK_NAME, None)
    if not callable(hook):
        raise PluginError(f"{source} has no {HOOK_NAME}(register) function")
    hook(lambda encoder_cls: registry.register(encoder_cls, source))


def _load_entry_points(registry: Registry) -> None:
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "unknown package"
        source = f"{dist} ({ep.value})"
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not hide the others' names
            raise PluginError(f"plugin {source} failed to load: {exc}") from exc
        _call_hook(module, source, registry)


def _load_plugins_dir(registry: Registry, folder: Path) -> None:
    if not folder.is_dir():
        raise PluginError(f"plugins folder {folder} does not exist or is not a folder")
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module_name = f"imgsearch_plugins_dir.{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        # Registered before it runs, as a normal import does: dataclasses and
        # pickling look their module up in sys.modules while it executes.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise PluginError(f"plugin file {path} failed to load: {first_line(exc)}") from exc
        _call_hook(module, f"plugin file {path}", registry)


def load_registry(plugins_dir: str | Path | None = None) -> Registry:
    """Discover every encoder: installed entry points, then a plugins folder."""
    registry = Registry()
    _load_entry_points(registry)
    if plugins_dir:
        registry.plugins_dir = Path(plugins_dir).expanduser().resolve()
        _load_plugins_dir(registry, registry.plugins_dir)
    logger.debug("encoders: %s", ", ".join(registry.names()))
    return registry


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero instead of NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))
