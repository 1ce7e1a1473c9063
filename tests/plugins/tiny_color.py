"""A deterministic test encoder, loaded through --plugins-dir like any
one-off plugin: the mean colour of each cell of a 4x4 grid (48-d).

It stands in for a neural network in tests of the CLI and the store, where
building a real model for every test would make the suite slow; the real
encoders have tests of their own.
"""

import numpy as np

from imgsearch import Encoder, Preprocessing, WeightsStatus


class TinyColorEncoder(Encoder):
    name = "tiny-color"
    dim = 48
    description = "4x4 grid of mean colours (tests only)"
    preprocessing = Preprocessing(input_size=32, resize="stretch", mean=(128, 128, 128), std=(64, 64, 64))
    batch_size = 8
    default_weights = "builtin"

    def weights_status(self):
        return WeightsStatus(True, "no weights needed")

    def weights_fingerprint(self):
        return "tiny-color-v1"

    def load(self):
        self.calls = 0

    def embed_batch(self, pixels):
        self.calls += 1
        n = len(pixels)
        cells = pixels.reshape(n, 4, 8, 4, 8, 3).mean(axis=(2, 4))
        return cells.reshape(n, 48).astype(np.float32)


def register_encoders(register):
    register(TinyColorEncoder)
