"""A test encoder whose model never loads, as when its weights can be
neither found nor downloaded: for the checks that must come before a
model loads, and for what happens when it cannot."""

from imgsearch import Encoder, Preprocessing
from imgsearch.errors import WeightsError


class Broken(Encoder):
    name = "broken"
    dim = 3
    preprocessing = Preprocessing(input_size=8, resize="stretch")
    default_weights = "builtin"

    def weights_fingerprint(self):
        return "broken-v1"

    def load(self):
        raise WeightsError("weights of broken cannot be downloaded here")

    def embed_batch(self, pixels):
        return pixels.mean(axis=(1, 2))


def register_encoders(register):
    register(Broken)
