"""The default encoder: Keras' ResNet50 base with global average pooling.

Registered through the ``imgsearch.encoders`` entry point of this project's
``pyproject.toml``, the same way a third-party package would register one.
TensorFlow is imported only in :meth:`ResNet50Encoder.load`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from imgsearch.encoders import Encoder, WeightsStatus, random_fingerprint
from imgsearch.errors import WeightsError, first_line
from imgsearch.hashing import sha256_file
from imgsearch.keras_support import import_keras, inference_function
from imgsearch.preprocessing import Preprocessing

WEIGHTS_ENV = "IMGSEARCH_RESNET50_WEIGHTS"
WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
# Where keras.applications.ResNet50 fetches its no-top ImageNet weights from,
# and the md5 it checks them against.
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + WEIGHTS_FILE
WEIGHTS_MD5 = "4d473c1dd8becc155b73f8504c6f6626"
RANDOM_SEED = 0


def keras_cache_file() -> Path:
    """Where Keras keeps the downloaded file (``$KERAS_HOME/models``), computed
    without importing Keras so that listing encoders stays fast."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()
    return home / "models" / WEIGHTS_FILE


def _seeded_random_init(model, seed: int) -> None:
    """Give every convolution He-normal weights from one seeded generator.

    Random weights must be the same in every process, or an index built with
    them could never be queried consistently; seeding Keras' global state
    instead would change the random numbers of everything else in the process.
    Batch-norm layers keep their deterministic defaults.
    """
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            shape = tuple(layer.kernel.shape)
            fan_in = int(np.prod(shape[:-1]))
            layer.kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32))
            if layer.bias is not None:
                layer.bias.assign(np.zeros(layer.bias.shape, np.float32))


class ResNet50Encoder(Encoder):
    name = "resnet50"
    dim = 2048
    description = "Keras ResNet50 (ImageNet), frozen base with global average pooling"
    # keras.applications.resnet50.preprocess_input ("caffe" mode): RGB to BGR,
    # subtract the ImageNet channel means, no scaling.
    # bf16 and int8 are offered, with a warning, until their neighbour
    # quality has been measured with the ImageNet weights (which could not be
    # downloaded where this encoder was written): with random weights bf16
    # and int8 agree with fp32 to cosine 0.99999 and 0.9998.
    precision_notes = {
        precision: "not yet measured with the ImageNet weights; check neighbour quality with "
                   "benchmarks/precision_quality.py before relying on it"
        for precision in ("bf16", "int8")
    }
    preprocessing = Preprocessing(
        input_size=224,
        resize="shorter-side",
        resize_to=256,
        interpolation="bilinear",
        channel_order="BGR",
        mean=(103.939, 116.779, 123.68),
        std=(1.0, 1.0, 1.0),
    )

    @classmethod
    def default_weights_spec(cls) -> str:
        return os.environ.get(WEIGHTS_ENV) or "imagenet"

    def _weights_file(self) -> Path | None:
        if self.random_weights:
            return None
        if self.weights == "imagenet":
            return keras_cache_file()
        return Path(self.weights).expanduser()

    def weights_status(self) -> WeightsStatus:
        if self.random_weights:
            return super().weights_status()
        path = self._weights_file()
        if path.is_file():
            return WeightsStatus(True, str(path))
        if self.weights == "imagenet":
            return WeightsStatus(False, f"not downloaded ({WEIGHTS_FILE} is fetched on first use)")
        return WeightsStatus(False, f"file not found: {path}")

    def weights_fingerprint(self) -> str:
        if self.random_weights:
            return random_fingerprint(RANDOM_SEED)
        if getattr(self, "_fingerprint", None) is None:
            path = self._weights_file()
            if not path.is_file():
                raise WeightsError(f"resnet50 weights file not found: {path}")
            self._fingerprint = "sha256:" + sha256_file(path)
        return self._fingerprint

    def _fetch_imagenet(self) -> Path:
        keras = import_keras()

        try:
            # Keras reports the download on stdout, which belongs to results.
            with contextlib.redirect_stdout(sys.stderr):
                return Path(
                    keras.utils.get_file(
                        WEIGHTS_FILE, WEIGHTS_URL, cache_subdir="models", file_hash=WEIGHTS_MD5
                    )
                )
        except Exception as exc:
            raise WeightsError(
                f"could not download the ResNet50 ImageNet weights {WEIGHTS_FILE} ({first_line(exc)}); "
                f"put that file in {keras_cache_file().parent}/, or pass --weights PATH "
                f"(or set {WEIGHTS_ENV}) to a local .h5 file, or use --encoder efficientnet-lite0"
            ) from None

    def build_model(self):
        """The Keras model with the chosen weights loaded (also used by tests)."""
        keras = import_keras()

        model = keras.applications.ResNet50(
            include_top=False, weights=None, pooling="avg", input_shape=(224, 224, 3)
        )
        if self.random_weights:
            _seeded_random_init(model, RANDOM_SEED)
            return model
        path = self._fetch_imagenet() if self.weights == "imagenet" else self._weights_file()
        if not path.is_file():
            raise WeightsError(f"resnet50 weights file not found: {path}")
        if not str(path).endswith((".h5", ".hdf5")):
            raise WeightsError(f"resnet50 weights must be a .h5 or .weights.h5 file, not {path}")
        try:
            model.load_weights(str(path))
        except Exception as exc:
            raise WeightsError(f"cannot load resnet50 weights from {path}: {first_line(exc)}") from None
        return model

    def load(self) -> None:
        model = self.build_model()
        model.trainable = False
        self._run = inference_function(model, self.preprocessing.input_size)

    def embed_batch(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(pixels)


def register_encoders(register):
    register(ResNet50Encoder)
