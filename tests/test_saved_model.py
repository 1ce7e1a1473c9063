"""The saved-model encoder: a small real Keras model saved in each format,
indexed through imgsearch, and its vectors checked against the model run
directly on the same photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from imgsearch import Index
from imgsearch import images as imgs
from imgsearch.errors import IndexMismatchError, UsageError, WeightsError

from conftest import SAMPLE_DATA, run

pytestmark = pytest.mark.slow

SIZE = 32
DIM = 12
PHOTOS = sorted((SAMPLE_DATA / "labelled").glob("*/*.jpg"))[::6]
# What every spec below declares, and what the reference applies by hand.
SPEC = {"input_size": SIZE, "resize": "stretch", "channel_order": "BGR", "range": "-1..1"}
FORMATS = ("keras", "export", "hub", "signature")


def _tiny_model(seed: int):
    """Convolutions with tanh and random biases: neither linear nor
    scale-invariant, so a preprocessing mistake changes its output's direction."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="tanh", bias_initializer="random_normal")(inputs)
    x = keras.layers.Conv2D(16, 3, activation="tanh", bias_initializer="random_normal")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(DIM, bias_initializer="random_normal")(x))


def _save_hub_format(model, path):
    """A TF2 Hub module as the hub's own exporters write one (a "reusable
    SavedModel"): a restored object with ``__call__(inputs, training)`` and
    its variable lists, and no signature."""
    import tensorflow as tf

    module = tf.train.Checkpoint()
    module.variables = list(model.variables)
    module.trainable_variables = list(model.trainable_variables)
    module.regularization_losses = []

    @tf.function
    def call(inputs, training=False):
        return model(inputs, training=training)

    for training in (False, True):
        call.get_concrete_function(tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32), training)
    module.__call__ = call
    tf.saved_model.save(module, str(path))


def _save_with_signature(model, path):
    """A plain TensorFlow SavedModel whose default signature returns two
    outputs; its spec names the one that holds the features."""
    import tensorflow as tf

    module = tf.Module()
    module.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="images")])
    def serve(images):
        features = model(images, training=False)
        return {"features": features, "scores": tf.nn.softmax(features)}

    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same model in each format, a spec for each, and the model itself."""
    folder = tmp_path_factory.mktemp("models")
    model = _tiny_model(seed=1)
    model.save(folder / "model.keras")
    model.export(str(folder / "export"), verbose=False)
    _save_hub_format(model, folder / "hub")
    _save_with_signature(model, folder / "signature")
    specs = {}
    for name, target in (("keras", "model.keras"), ("export", "export"), ("hub", "hub"), ("signature", "signature")):
        extra = {"output": "features"} if name == "signature" else {}
        specs[name] = folder / f"{name}.json"
        specs[name].write_text(json.dumps({"model": target, **SPEC, **extra}))
    return {"folder": folder, "specs": specs, "model": model}


def _pixels(photos):
    """Decoded and resized by imgsearch (tested elsewhere); normalised below
    by hand, as the spec says, independently of the core's code."""
    from imgsearch.preprocessing import Preprocessing

    geometry = Preprocessing(input_size=SIZE, resize="stretch")
    return np.stack([imgs.to_pixels(imgs.read_bytes(p), geometry)[0] for p in photos]).astype(np.float32)


def _reference(model, pixels, channel_order="BGR", scale=(127.5, 127.5)):
    x = pixels[..., ::-1] if channel_order == "BGR" else pixels
    x = (x - scale[0]) / scale[1]
    return np.asarray(model(x, training=False))


def _cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.mark.parametrize("runtime", ["openvino", "keras"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_indexed_vectors_equal_the_models_own_output(models, fmt, runtime, tmp_path):
    with Index.build(tmp_path / "ix", encoder="saved-model", weights=str(models["specs"][fmt]),
                     runtime=runtime) as index:
        report = index.add(PHOTOS)
        assert report.added == len(PHOTOS) and index.encoder.runtime_name.startswith(runtime)
        by_path = {e.path: e.id for e in index.store.entries()}
        stored = index.store.vectors([by_path[str(p)] for p in PHOTOS])
    pixels = _pixels(PHOTOS)
    assert _cosines(stored, _reference(models["model"], pixels)).min() >= 0.9999
    # The check can fail: the same photos with a channel-order or a range
    # mistake give other directions.
    assert _cosines(stored, _reference(models["model"], pixels, channel_order="RGB")).min() < 0.9999
    assert _cosines(stored, _reference(models["model"], pixels, scale=(0.0, 255.0))).min() < 0.9999


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_other_precisions_run_as_for_the_built_in_encoders(models, precision, tmp_path):
    with Index.build(tmp_path / "ix", encoder="saved-model", weights=str(models["specs"]["keras"]),
                     precision=precision, calibration=PHOTOS) as index:
        index.add(PHOTOS)
        # bf16 runs only on CPUs that have it; elsewhere fp32, with a warning.
        assert index.encoder.runtime_name in (f"openvino-{precision}", "openvino-fp32" if precision == "bf16" else "")
        by_path = {e.path: e.id for e in index.store.entries()}
        stored = index.store.vectors([by_path[str(p)] for p in PHOTOS])
        assert index.info()["precision"] == precision
    # Approximations of the model's output (a 12-d toy loses more to int8
    # than a real network's features do), and int8 is really another model.
    cosines = _cosines(stored, _reference(models["model"], _pixels(PHOTOS)))
    assert cosines.mean() >= 0.98 and cosines.min() >= 0.9, cosines
    if precision == "int8":
        assert cosines.min() < 0.99999


def test_the_manifest_records_the_model_and_query_refuses_another(models, tmp_path):
    ix = tmp_path / "ix"
    run("index", *PHOTOS, "--index", ix, "--encoder", "saved-model", "--weights", models["folder"] / "export")
    info = json.loads(run("info", "--index", ix, "--format", "json").stdout)
    assert info["encoder"] == "saved-model" and info["dim"] == DIM
    assert info["weights"] == str(models["folder"] / "export")
    # The fingerprint is what the README says it is, checked with the shell's own tools.
    tree = subprocess.run("find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum", shell=True,
                          cwd=models["folder"] / "export", capture_output=True, text=True, check=True)
    assert info["weights_fingerprint"] == "sha256-tree:" + tree.stdout.split()[0]
    # Without --weights a query uses the recorded model folder.
    hits = json.loads(run("query", PHOTOS[0], "--index", ix, "--include-self", "--format", "json").stdout)
    assert hits["results"][0]["path"] == str(PHOTOS[0]) and hits["results"][0]["score"] > 0.9999
    # Another model of the same shape is refused, however it is named.
    other = tmp_path / "other.keras"
    _tiny_model(seed=2).save(other)
    with Index.open(ix, weights=str(other)) as index, pytest.raises(IndexMismatchError, match="other saved-model"):
        index.query([PHOTOS[0]])
    result = run("query", PHOTOS[0], "--index", ix, "--weights", other, code=2)
    assert "other saved-model weights" in result.stderr


def test_a_bare_model_takes_its_own_size_and_the_format_convention(models):
    from imgsearch.encoders import load_registry

    registry = load_registry()
    keras_encoder = registry.create("saved-model", str(models["folder"] / "model.keras"))
    hub_encoder = registry.create("saved-model", str(models["folder"] / "hub"))
    assert keras_encoder.dim == hub_encoder.dim == DIM
    assert keras_encoder.preprocessing.input_size == hub_encoder.preprocessing.input_size == SIZE
    assert keras_encoder.preprocessing.std == (1.0,) * 3  # Keras: 0..255, scaling inside the model
    assert hub_encoder.preprocessing.std == (255.0,) * 3  # TF-Hub: 0..1


def test_queries_on_a_cached_model_do_not_import_tensorflow(models, tmp_path):
    ix = tmp_path / "ix"
    run("index", *PHOTOS, "--index", ix, "--encoder", "saved-model", "--weights", models["specs"]["hub"])
    code = (
        "import sys\n"
        "from imgsearch import Index\n"
        f"with Index.open({str(ix)!r}) as index:\n"
        f"    hits = index.query([{str(PHOTOS[1])!r}], k=1, include_self=True)[0].hits\n"
        "    print(index.encoder.runtime_name, hits[0].entry.path, 'tensorflow' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["openvino-fp32", str(PHOTOS[1]), "False"]


def _save(folder, name, shape, layers):
    import keras

    inputs = keras.Input(shape)
    keras.Model(inputs, layers(keras.layers, inputs)).save(folder / name)
    return folder / name


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    image = (SIZE, SIZE, 3)
    paths = {
        "lambda": _save(folder, "lambda.keras", image,
                        lambda L, x: L.GlobalAveragePooling2D()(L.Lambda(lambda t: t * 2)(x))),
        "vector input": _save(folder, "vector.keras", (10,), lambda L, x: L.Dense(4)(x)),
        "feature map": _save(folder, "map.keras", image, lambda L, x: L.Conv2D(4, 3)(x)),
        "channels first": _save(folder, "first.keras", (3, SIZE, SIZE), lambda L, x: L.Flatten()(x)),
    }
    paths["not a model"] = folder / "notes.keras"
    paths["not a model"].write_text("hello")
    paths["empty folder"] = folder / "empty"
    paths["empty folder"].mkdir()
    paths["two outputs"] = folder / "two.json"
    _save_with_signature(_tiny_model(seed=3), folder / "two")
    paths["two outputs"].write_text(json.dumps({"model": "two"}))
    paths["bad range"] = folder / "range.json"
    paths["bad range"].write_text(json.dumps({"model": "lambda.keras", "range": "0..2"}))
    paths["unknown key"] = folder / "typo.json"
    paths["unknown key"].write_text(json.dumps({"modle": "lambda.keras"}))
    paths["missing"] = folder / "missing.keras"
    return paths


@pytest.mark.parametrize("case, message", [
    ("lambda", "cannot load model .*lambda.keras: Requested the deserialization of a `Lambda` layer"),
    ("vector input", r"has no image input: it takes \(batch, 10\)"),
    ("feature map", r"gives outputs of shape \(batch, 30, 30, 4\), not one vector per image \(add global pooling\)"),
    ("channels first", r"has no image input: it takes \(batch, 3, 32, 32\)"),
    ("not a model", "not a .keras file"),
    ("empty folder", "not a SavedModel"),
    ("two outputs", r"several outputs \(features, scores\); name one"),
    ("bad range", "\"range\" must be one of"),
    ("unknown key", "unknown key 'modle'"),
    ("missing", "model not found"),
])
def test_unusable_models_get_one_line_errors_and_leave_no_index(bad_models, case, message, tmp_path):
    from imgsearch.encoders import load_registry

    with pytest.raises((WeightsError, UsageError), match=message):
        load_registry().create("saved-model", str(bad_models[case]))
    result = run("index", PHOTOS[0], "--index", tmp_path / "ix", "--encoder", "saved-model",
                 "--weights", bad_models[case], code=2 if case in ("bad range", "unknown key") else 1)
    assert "\n" not in result.stderr.strip().split("Error: ", 1)[1]
    assert not (tmp_path / "ix").exists()


def test_no_model_named_is_one_line(tmp_path):
    result = run("index", PHOTOS[0], "--index", tmp_path / "ix", "--encoder", "saved-model", code=2)
    assert "no model named: pass --weights PATH" in result.stderr
    assert not (tmp_path / "ix").exists()
