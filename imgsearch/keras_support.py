"""Helpers for encoders built on Keras (imported only by their ``load``)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def inference_function(model, input_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """A numpy-in, numpy-out call of ``model`` in inference mode.

    ``model.predict`` adds tens of milliseconds per call and eager calls
    re-dispatch every layer; one ``tf.function`` with a fixed signature (any
    batch size) is traced once and then runs as a single graph.
    """
    import tensorflow as tf

    model.trainable = False

    @tf.function(
        input_signature=[tf.TensorSpec([None, input_size, input_size, 3], tf.float32)],
        reduce_retracing=True,
    )
    def run(batch):
        return model(batch, training=False)

    def call(pixels: np.ndarray) -> np.ndarray:
        return run(tf.convert_to_tensor(pixels, dtype=tf.float32)).numpy()

    return call
