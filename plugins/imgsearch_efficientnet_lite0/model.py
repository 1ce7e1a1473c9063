"""EfficientNet-Lite0 as a Keras functional model, and the weight conversion.

Each layer that holds weights is named after the PyTorch module it mirrors
(``_blocks.3._expand_conv``), so conversion is a lookup by name rather than a
walk that relies on both frameworks listing layers in the same order.

The Lite variants differ from EfficientNet-B0 in ways that matter to the
weights: no squeeze-and-excitation, ReLU6 instead of swish, and a fixed stem
and head width.  The padding is TensorFlow's "same" (extra row and column at
the bottom and right for even strides), which is what the original TensorFlow
training used and what the PyTorch port emulates.
"""

from __future__ import annotations

from typing import Mapping

import keras
import numpy as np

from imgsearch.errors import WeightsError

INPUT_SIZE = 224
EMBEDDING_DIM = 1280
NUM_CLASSES = 1000
# TensorFlow's value, which the weights were trained with; Keras' default
# (also 1e-3) is named anyway so the model does not depend on a default.
BN_EPSILON = 1e-3

# (expand ratio, kernel, stride of the first repeat, output channels, repeats)
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = EMBEDDING_DIM
POOL_LAYER = "_avg_pooling"
CLASSIFIER_LAYER = "_fc"

# PyTorch tensors of a batch-norm layer, in the order Keras lists its weights
# (gamma, beta, moving mean, moving variance).
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")
# A training counter with no inference meaning; consumed so that it does not
# count as an unused key.
_IGNORED_SUFFIX = ".num_batches_tracked"


class _Initializers:
    """Seeded initialisers, one seed per layer.

    A fixed seed per layer makes random-weights models identical from one
    build to the next without touching the process-wide random state, which
    other code in the same process may rely on.
    """

    def __init__(self, seed: int):
        self._next = seed * 1000

    def kernel(self):
        self._next += 1
        return keras.initializers.HeNormal(seed=self._next)

    def depthwise(self, kernel_size: int):
        # Keras counts a depthwise kernel's fan-in as if every channel fed
        # every output, which shrinks the weights by sqrt(channels) per block;
        # sixteen blocks of that leave random-weights features near 1e-8.
        # Each output sees only kernel_size**2 inputs, so He scaling uses that.
        self._next += 1
        return keras.initializers.RandomNormal(stddev=(2.0 / kernel_size**2) ** 0.5, seed=self._next)


def _bn(x, name):
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=name)(x)


def _relu6(x, name):
    return keras.layers.ReLU(max_value=6.0, name=name)(x)


def _conv(x, filters, kernel, stride, name, init):
    return keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False,
        kernel_initializer=init.kernel(), name=name,
    )(x)


def _mbconv(x, index, expand, kernel, stride, out_channels, init):
    prefix = f"_blocks.{index}"
    in_channels = x.shape[-1]
    inputs = x
    if expand != 1:
        x = _conv(x, in_channels * expand, 1, 1, f"{prefix}._expand_conv", init)
        x = _bn(x, f"{prefix}._bn0")
        x = _relu6(x, f"{prefix}.expand_relu6")
    x = keras.layers.DepthwiseConv2D(
        kernel, strides=stride, padding="same", use_bias=False,
        depthwise_initializer=init.depthwise(kernel), name=f"{prefix}._depthwise_conv",
    )(x)
    x = _bn(x, f"{prefix}._bn1")
    x = _relu6(x, f"{prefix}.depthwise_relu6")
    x = _conv(x, out_channels, 1, 1, f"{prefix}._project_conv", init)
    x = _bn(x, f"{prefix}._bn2")
    # Without an activation after the projection the block stays linear at
    # its output, which is what lets the residual sum carry information.
    if stride == 1 and in_channels == out_channels:
        x = keras.layers.Add(name=f"{prefix}.residual")([inputs, x])
    return x


def build_network(seed: int = 0) -> keras.Model:
    """The whole network, classifier included, with seeded random weights.

    The classifier is always built so that one set of cached weights serves
    both the embedding model and the classifier; the embedding model simply
    stops at the pooling layer.
    """
    init = _Initializers(seed)
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="pixels")
    x = _conv(inputs, STEM_CHANNELS, 3, 2, "_conv_stem", init)
    x = _bn(x, "_bn0")
    x = _relu6(x, "stem_relu6")
    index = 0
    for expand, kernel, stride, out_channels, repeats in STAGES:
        for repeat in range(repeats):
            x = _mbconv(x, index, expand, kernel, stride if repeat == 0 else 1, out_channels, init)
            index += 1
    x = _conv(x, HEAD_CHANNELS, 1, 1, "_conv_head", init)
    x = _bn(x, "_bn1")
    x = _relu6(x, "head_relu6")
    x = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    logits = keras.layers.Dense(
        NUM_CLASSES, kernel_initializer=keras.initializers.GlorotUniform(seed=seed * 1000 + 999),
        name=CLASSIFIER_LAYER,
    )(x)
    return keras.Model(inputs, logits, name="efficientnet_lite0")


def embedding_model(network: keras.Model) -> keras.Model:
    """The pooled 1280-d features of ``network``, sharing its layers."""
    return keras.Model(network.input, network.get_layer(POOL_LAYER).output, name="efficientnet_lite0_features")


def _torch_tensors(layer) -> list[tuple[str, object]]:
    """The state-dict keys feeding ``layer``, each with how to reshape it."""
    name = layer.name
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        return [(f"{name}.weight", lambda t: t.transpose(2, 3, 0, 1))]
    if isinstance(layer, keras.layers.Conv2D):
        # (out, in, kh, kw) -> (kh, kw, in, out)
        return [(f"{name}.weight", lambda t: t.transpose(2, 3, 1, 0))]
    if isinstance(layer, keras.layers.BatchNormalization):
        return [(f"{name}.{key}", None) for key in _BN_KEYS]
    if isinstance(layer, keras.layers.Dense):
        return [(f"{name}.weight", lambda t: t.T), (f"{name}.bias", None)]
    raise WeightsError(f"no conversion rule for layer {name!r} ({type(layer).__name__})")


def conversion_plan(network: keras.Model, state: Mapping[str, np.ndarray]) -> list[tuple[object, list[np.ndarray]]]:
    """Pair every weighted layer with its converted arrays, checking all of it.

    Nothing is assigned here, so a file that does not fit leaves the model as
    it was; every problem is found before the first weight changes.
    """
    plan = []
    used = set()
    for layer in network.layers:
        if not layer.weights:
            continue
        expected = [tuple(w.shape) for w in layer.weights]
        rules = _torch_tensors(layer)
        if len(rules) != len(expected):
            raise WeightsError(f"layer {layer.name!r} has {len(expected)} weights, the rule gives {len(rules)}")
        arrays = []
        for (key, reshape), shape in zip(rules, expected):
            if key not in state:
                raise WeightsError(f"the weights file has no {key!r}")
            array = np.asarray(state[key])
            if reshape is not None:
                array = reshape(array)
            if tuple(array.shape) != shape:
                raise WeightsError(f"{key!r} has shape {tuple(state[key].shape)}, which does not fit {shape}")
            arrays.append(np.ascontiguousarray(array, dtype=np.float32))
            used.add(key)
        plan.append((layer, arrays))
    unused = sorted(k for k in state if k not in used and not k.endswith(_IGNORED_SUFFIX))
    if unused:
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        raise WeightsError(f"the weights file has keys the model does not use: {unused[0]!r}{more}")
    return plan


def load_state_dict(network: keras.Model, state: Mapping[str, np.ndarray]) -> int:
    """Set every weight of ``network`` from a PyTorch state dict.

    Returns the number of layers set.  Raises WeightsError, leaving the
    model untouched, if any key is unused, missing or of the wrong shape.
    """
    plan = conversion_plan(network, state)
    for layer, arrays in plan:
        layer.set_weights(arrays)
    return len(plan)
