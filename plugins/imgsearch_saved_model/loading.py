"""Loading a user's model with TensorFlow, and the checks that make it an encoder.

Imported only when a model is first inspected or built: it imports Keras.
Every failure is a one-line :class:`WeightsError` naming the model and the
problem (cannot load, no image input, not one vector per image).
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass

import numpy as np

from imgsearch.errors import WeightsError, first_line
from imgsearch.keras_support import import_keras
from imgsearch.model_spec import ModelSpec

# Endpoints of a SavedModel tried in turn when the spec names none: Keras'
# model.export(), the plain call of a TF2 Hub module (a "reusable
# SavedModel", which often has no signature), then TensorFlow's default
# signature.
ENDPOINTS = ("serve", "__call__", "serving_default")
HUB_ENDPOINT = "__call__"
PROBE_BATCH = 2


@dataclass(frozen=True)
class ModelFacts:
    """What only the model can tell; cached per model by the encoder."""

    dim: int
    input_size: int | None  # the model's own fixed input size, if any
    default_range: str  # the pixel range its format conventionally takes
    endpoint: str | None  # for SavedModels: the function that runs


def inspect(spec: ModelSpec, input_size: int | None) -> ModelFacts:
    """Load the model, check it takes images and gives one vector per image
    (probed at ``input_size``, else its own size, else 224)."""
    model, own_size, default_range, endpoint = _load(spec)
    size = input_size or own_size or 224
    dim = _probe(spec, model, size)
    return ModelFacts(dim, own_size, default_range, endpoint)


def build(spec: ModelSpec, input_size: int):
    """The Keras model from normalised pixels to ``(n, dim)``."""
    model, _, _, _ = _load(spec)
    _probe(spec, model, input_size)
    return model


def _load(spec: ModelSpec):
    kind = spec.kind
    keras = import_keras()
    if kind == "keras":
        if not zipfile.is_zipfile(spec.model):
            raise WeightsError(f"cannot load model {spec.model}: not a .keras file (a .keras file is a zip archive)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # safe_mode: a .keras file may not run code of its own (Lambda
                # layers, pickled functions) while it loads.
                model = keras.saving.load_model(str(spec.model), compile=False, safe_mode=True)
        except Exception as exc:
            raise WeightsError(f"cannot load model {spec.model}: {first_line(exc)}") from None
        if spec.endpoint:
            raise WeightsError(f"model {spec.model} is a .keras file; \"endpoint\" applies to SavedModels only")
        inputs = getattr(model, "inputs", None) or []
        own_size = _image_size(spec, [tuple(t.shape) for t in inputs])
        if spec.output:
            names = list(getattr(model, "output_names", []) or [])
            if spec.output not in names:
                raise WeightsError(f"model {spec.model} has no output {spec.output!r} "
                                   f"(it has: {', '.join(names) or 'none'})")
            model = keras.Model(model.inputs, model.outputs[names.index(spec.output)])
        return model, own_size, "0..255", None
    return _load_saved_model(spec, keras)


def _load_saved_model(spec: ModelSpec, keras):
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(spec.model))
    except Exception as exc:
        raise WeightsError(f"cannot load SavedModel {spec.model}: {first_line(exc)}") from None
    names = [spec.endpoint] if spec.endpoint else list(ENDPOINTS)
    found = [name for name in names if _endpoint(loaded, name) is not None]
    if not found:
        available = sorted(set(loaded.signatures) | {n for n in ENDPOINTS if _endpoint(loaded, n) is not None})
        wanted = f"endpoint {spec.endpoint!r}" if spec.endpoint else "a serve, __call__ or serving_default function"
        raise WeightsError(f"SavedModel {spec.model} has no {wanted} (it has: {', '.join(available) or 'none'})")
    name = found[0]
    shapes = _input_shapes(_endpoint(loaded, name))
    own_size = _image_size(spec, shapes)
    inputs = keras.Input((own_size, own_size, 3)) if own_size else keras.Input((None, None, 3))
    try:
        layer = _endpoint_layer(keras)(str(spec.model), name, spec.output)
        model = keras.Model(inputs, layer(inputs))
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"cannot run SavedModel {spec.model} ({name}): {first_line(exc)}") from None
    # TF-Hub's image modules take RGB in [0, 1]; Keras exports take what the
    # Keras model took, conventionally 0..255 with scaling inside.
    return model, own_size, "0..1" if name == HUB_ENDPOINT else "0..255", name


def _endpoint(loaded, name: str):
    if name in getattr(loaded, "signatures", {}):
        return loaded.signatures[name]
    fn = getattr(loaded, name, None)
    # A restored object without the function still has Python's own
    # __call__; only a restored tf.function has concrete functions.
    return fn if fn is not None and hasattr(fn, "concrete_functions") else None


def _input_shapes(fn) -> list[tuple]:
    """The shapes of the tensors an endpoint takes (its traced signature)."""
    import tensorflow as tf

    if hasattr(fn, "structured_input_signature"):  # a signature (concrete function)
        signature = fn.structured_input_signature
    else:
        concrete = fn.concrete_functions
        if not concrete:
            return []
        signature = concrete[0].structured_input_signature
    specs = [s for s in tf.nest.flatten(signature) if isinstance(s, tf.TensorSpec)]
    for s in specs:
        if s.dtype != tf.float32:
            raise WeightsError(f"model takes {s.dtype.name} input; imgsearch feeds float32 images")
    return [tuple(s.shape) for s in specs]


def _image_size(spec: ModelSpec, shapes: list[tuple]) -> int | None:
    """The model's own square input size (None: any size), or a one-line
    error when it has no single image input."""
    if len(shapes) != 1 or len(shapes[0]) != 4 or shapes[0][-1] != 3:
        shown = ", ".join(_shown(s) for s in shapes) or "nothing"
        raise WeightsError(f"model {spec.model} has no image input: it takes {shown}, "
                           "not one (batch, height, width, 3) tensor")
    height, width = shapes[0][1], shapes[0][2]
    if height is not None and width is not None and height != width:
        raise WeightsError(f"model {spec.model} takes {height}x{width} images; "
                           "only square inputs are supported")
    size = height if height is not None else width
    given = spec.settings.get("input_size")
    if size is not None and given is not None and given != size:
        raise WeightsError(f"model {spec.model} takes {size}x{size} images, not the "
                           f"{given}x{given} its spec declares")
    return size


def _shown(shape: tuple) -> str:
    return "(" + ", ".join("batch" if i == 0 and d is None else str(d) for i, d in enumerate(shape)) + ")"


def _probe(spec: ModelSpec, model, size: int) -> int:
    """Run the model once; its output must be one finite vector per image."""
    pixels = np.random.default_rng(0).uniform(-1.0, 1.0, (PROBE_BATCH, size, size, 3)).astype(np.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(pixels, training=False)
    except Exception as exc:
        raise WeightsError(f"model {spec.model} fails on a batch of {size}x{size} RGB images: "
                           f"{first_line(exc)}") from None
    if isinstance(out, dict):
        keys = ", ".join(sorted(out))
        raise WeightsError(f"model {spec.model} gives several outputs ({keys}); name one in a model spec: "
                           "\"output\": \"NAME\"")
    if isinstance(out, (list, tuple)):
        raise WeightsError(f"model {spec.model} gives {len(out)} outputs, not one vector per image")
    out = np.asarray(out)
    if out.ndim != 2 or out.shape[0] != PROBE_BATCH or out.shape[1] < 1:
        shape = (None, *out.shape[1:]) if out.ndim and out.shape[0] == PROBE_BATCH else out.shape
        hint = " (add global pooling)" if out.ndim == 4 else ""
        raise WeightsError(f"model {spec.model} gives outputs of shape {_shown(shape)}, "
                           f"not one vector per image{hint}")
    if not np.isfinite(out).all():
        raise WeightsError(f"model {spec.model} gives values that are not finite (NaN or infinity)")
    return int(out.shape[1])


def _endpoint_layer(keras):
    """Keras' TFSMLayer, choosing one output when the endpoint returns several."""

    class SavedModelEndpoint(keras.layers.TFSMLayer):
        def __init__(self, filepath, call_endpoint, output=None, **kwargs):
            super().__init__(filepath, call_endpoint=call_endpoint, trainable=False, **kwargs)
            self.output_name = output

        def call(self, inputs, training=False):
            out = self.call_endpoint_fn(inputs)
            if isinstance(out, dict):
                if self.output_name is not None:
                    if self.output_name not in out:
                        raise WeightsError(f"SavedModel {self.filepath} has no output {self.output_name!r} "
                                           f"(it has: {', '.join(sorted(out))})")
                    return out[self.output_name]
                if len(out) == 1:
                    return next(iter(out.values()))
            return out

    return SavedModelEndpoint
