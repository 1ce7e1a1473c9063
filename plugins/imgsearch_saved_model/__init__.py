"""The ``saved-model`` encoder: your own feature extractor as the encoder.

``--weights`` names the model: a ``.keras`` file (loaded in Keras' safe
mode), a SavedModel folder (Keras' ``model.export()`` or
``tf.saved_model.save``), a TF2 Hub feature-vector module saved on disk, or a
JSON model spec naming one of these and its preprocessing (see
:mod:`imgsearch.model_spec`).  The vectors are the model's output.

Registered through the ``imgsearch.encoders`` entry point like the built-in
encoders.  Unlike theirs, this encoder's dimension and preprocessing belong
to the model, so they are set per instance.  They are found by loading the
model once per machine (TensorFlow) and cached in the user cache folder by the
model's fingerprint, so that later queries, served from the cached OpenVINO
model, start without importing TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict

import numpy as np

from imgsearch.encoders import Encoder, WeightsStatus
from imgsearch.errors import UsageError
from imgsearch.model_spec import ModelSpec
from imgsearch.paths import cache_dir
from imgsearch.preprocessing import Preprocessing

logger = logging.getLogger(__name__)

NAME = "saved-model"
# Bumped whenever what the facts cache holds, or how it is found, changes.
FACTS_VERSION = 1
NO_MODEL = ("no model named: pass --weights PATH (a .keras file, a SavedModel or "
            "TF-Hub folder, or a model spec .json)")


class SavedModelEncoder(Encoder):
    name = NAME
    dim = 0  # per model: set from the model's output
    description = "your own model: a .keras file, SavedModel or TF-Hub folder, or a model spec (--weights PATH)"
    preprocessing = Preprocessing()  # per model: from its spec, with defaults from the model
    default_weights = ""  # there is no default model
    precision_notes = {
        precision: "how well your model's vectors keep fp32's neighbours at this precision is not "
                   "known; compare with imgsearch evaluate before relying on it"
        for precision in ("bf16", "int8")
    }

    def __init__(self, weights: str | None = None):
        super().__init__(weights)
        self.spec: ModelSpec | None = None
        self._fingerprint: str | None = None
        self._run = None
        if not self.weights:
            return  # listed by `imgsearch encoders` without a model
        if self.random_weights:
            raise UsageError(f"the {NAME} encoder has no random weights; {NO_MODEL}")
        self.spec = ModelSpec.read(self.weights)
        self.spec.kind  # a file that is no model fails here, before anything loads
        self.facts = self._facts()
        self.dim = self.facts["dim"]
        self.preprocessing = self.spec.preprocessing(self.facts["input_size"], self.facts["default_range"])

    def weights_status(self) -> WeightsStatus:
        if self.spec is None:
            return WeightsStatus(False, NO_MODEL)
        return WeightsStatus(True, f"{self.spec.kind} {self.spec.model}")

    def weights_fingerprint(self) -> str:
        if self.spec is None:
            raise UsageError(f"the {NAME} encoder needs a model; {NO_MODEL}")
        if self._fingerprint is None:
            self._fingerprint = self.spec.fingerprint()
        return self._fingerprint

    def _facts(self) -> dict:
        """The model's dimension and own input size, from the cache or by
        loading it once (which also checks that it is a usable encoder)."""
        given_size = self.spec.settings.get("input_size")
        key = json.dumps([FACTS_VERSION, self.weights_fingerprint(), given_size])
        path = cache_dir() / NAME / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
        try:
            facts = json.loads(path.read_text())
            if isinstance(facts, dict) and isinstance(facts.get("dim"), int):
                return facts
        except (OSError, ValueError):
            pass  # not cached yet, or damaged: inspect again
        from .loading import inspect

        facts = asdict(inspect(self.spec, given_size))
        if not {"range", "mean", "std"} & set(self.spec.settings):
            # A wrong range gives plausible-looking but poor vectors: say
            # what was assumed, once per model and machine.
            logger.warning("%s: no pixel range declared; assuming %s, the convention of its format "
                           "(a model spec with \"range\" says otherwise)", self.spec.model, facts["default_range"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
                json.dump(facts, handle)
            os.replace(handle.name, path)
        except OSError as exc:  # a read-only cache only costs the next process a load
            logger.warning("cannot cache facts of %s in %s (%s)", self.spec.model, path.parent, exc)
        return facts

    def build_model(self):
        from .loading import build

        if self.spec is None:
            raise UsageError(f"the {NAME} encoder needs a model; {NO_MODEL}")

        return build(self.spec, self.preprocessing.input_size)

    def load(self) -> None:
        from imgsearch.keras_support import inference_function

        self._run = inference_function(self.build_model(), self.preprocessing.input_size)

    def embed_batch(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(pixels)


def register_encoders(register) -> None:
    register(SavedModelEncoder)


__all__ = ["SavedModelEncoder", "register_encoders"]
