"""Test encoders for the Ray tests, loaded with --plugins-dir on the driver
and, through the same folder, on every Ray node.

``paced-color``: the mean colour of each cell of a 4x4 grid, like the
``tiny-color`` test encoder, but each batch takes IMGSEARCH_TEST_PACE_S
seconds (default 0), so that a test can stop a run part-way.

``driver-only``: registered only where IMGSEARCH_TEST_DRIVER_ONLY is set,
which the test cluster's nodes never have: it stands for a plugin installed
on the driver's machine and missing on the workers.
"""

import os
import time

import numpy as np

from imgsearch import Encoder, Preprocessing, WeightsStatus


class PacedColorEncoder(Encoder):
    name = "paced-color"
    dim = 48
    description = "4x4 grid of mean colours, paced (tests only)"
    preprocessing = Preprocessing(input_size=32, resize="stretch", mean=(128, 128, 128), std=(64, 64, 64))
    batch_size = 8
    default_weights = "builtin"

    def weights_status(self):
        return WeightsStatus(True, "no weights needed")

    def weights_fingerprint(self):
        return "paced-color-v1"

    def load(self):
        self.pace = float(os.environ.get("IMGSEARCH_TEST_PACE_S", "0"))

    def embed_batch(self, pixels):
        time.sleep(self.pace)
        n = len(pixels)
        return pixels.reshape(n, 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(n, 48).astype(np.float32)


class DriverOnlyEncoder(PacedColorEncoder):
    name = "driver-only"
    description = "present only where IMGSEARCH_TEST_DRIVER_ONLY is set (tests only)"

    def weights_fingerprint(self):
        return "driver-only-v1"


def register_encoders(register):
    register(PacedColorEncoder)
    if os.environ.get("IMGSEARCH_TEST_DRIVER_ONLY"):
        register(DriverOnlyEncoder)
