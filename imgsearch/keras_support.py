"""Helpers for encoders built on Keras (imported only by their ``load``)."""

from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np


def import_keras():
    """``import keras`` (with TensorFlow), with TensorFlow's native logs off.

    The library never prints, and TensorFlow's C++ logs (oneDNN and CPU
    notices, "failed call to cuInit") bypass Python's logging: they are
    silenced with TF_CPP_MIN_LOG_LEVEL=3 unless the user set the variable.
    Its start-up notices are written to the stderr file descriptor before
    that setting takes effect, so at level 3 the descriptor is silenced for
    the import alone.  Python exceptions still propagate after it is restored.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "keras" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
        import keras

        return keras
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401  (the noisy part)
        import keras
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras


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
