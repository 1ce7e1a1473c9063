"""The OpenVINO runtime against the Keras reference, its cache and fallbacks.

Real components throughout: the Keras models, OpenVINO, NNCF, the sample
photos.  efficientnet-lite0 runs with its packaged ImageNet weights; resnet50
with random weights (its ImageNet weights are not downloadable here),
initialised so that its vectors differ between images where two ways of
running it are compared (conftest's ``resnet50_spread``).  Each such check
has a negative control: it fails for a channel-order mistake.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from imgsearch import images as imgs
from imgsearch import runtime
from imgsearch.encoders import load_registry
from imgsearch.errors import UsageError
from imgsearch.pipeline import prefetch
from imgsearch.runtime import Calibration, RuntimeOptions

from conftest import PLUGINS_DIR, SAMPLE_DATA, run

pytestmark = pytest.mark.slow
LABELLED = SAMPLE_DATA / "labelled"


def _photos():
    files, _ = imgs.discover([LABELLED])
    return [f.path for f in files]


@pytest.fixture(scope="module")
def sample_pixels():
    """The 50 sample photos, decoded and resized as indexing does it."""
    prep = load_registry().get("efficientnet-lite0").preprocessing
    return np.stack([imgs.to_pixels(imgs.read_bytes(p), prep)[0] for p in _photos()])


def _encoder(name, runtime_name="auto", precision="fp32", weights=None, calibration=None):
    encoder = load_registry(PLUGINS_DIR).create(name, weights)
    if calibration is not None:
        encoder.use_runtime(calibration.options(runtime_name))
    else:
        encoder.use_runtime(RuntimeOptions(runtime_name, precision))
    return encoder.ensure_loaded()


def _cosines(a, b):
    return runtime._cosines(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def lite_keras(sample_pixels):
    encoder = _encoder("efficientnet-lite0", "keras")
    assert encoder.runtime_name == "keras"
    return encoder.embed_pixels(sample_pixels)


# -- fp32 is Keras ------------------------------------------------------------


def test_openvino_fp32_equals_keras_on_every_sample_photo(sample_pixels, lite_keras):
    encoder = _encoder("efficientnet-lite0")
    assert encoder.runtime_name == "openvino-fp32"
    vectors = encoder.embed_pixels(sample_pixels)
    assert vectors.shape == lite_keras.shape == (50, 1280)
    assert _cosines(vectors, lite_keras).min() >= 0.9999
    # Negative control: the check fails for the channels reversed.
    swapped = _cosines(encoder.embed_pixels(sample_pixels[..., ::-1].copy()), lite_keras).min()
    print(f"control cosine {swapped:.4f}")
    assert swapped < 0.99, swapped
    # Batch composition must not matter: one image alone gives the same vector.
    alone = encoder.embed_pixels(sample_pixels[7:8])
    assert _cosines(alone, vectors[7:8]).min() >= 0.99999


def test_resnet50_openvino_fp32_equals_keras_resnet50(sample_pixels, resnet50_spread):
    weights = str(resnet50_spread[1])
    ours = _encoder("resnet50", weights=weights)
    assert ours.runtime_name == "openvino-fp32"
    reference = _encoder("resnet50", "keras", weights=weights)
    subset = sample_pixels[::5]
    expected = reference.embed_pixels(subset)
    assert _cosines(ours.embed_pixels(subset), expected).min() >= 0.9999
    # Negative control: the check fails for the channels reversed (with
    # plain random weights this scored 0.9998, almost a pass).
    swapped = _cosines(ours.embed_pixels(subset[..., ::-1].copy()), expected).min()
    print(f"control cosine {swapped:.4f}")
    assert swapped < 0.999, swapped


def _cpu_runs_bf16() -> bool:
    """Asked of OpenVINO itself, not of imgsearch's own check."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_bf16_stays_close_to_fp32_and_is_not_fp32(sample_pixels, lite_keras):
    if not _cpu_runs_bf16():
        pytest.skip("this CPU has no bf16: a bf16 run falls back to fp32, so there is nothing to compare")
    bf16 = _encoder("lite0-any-precision", precision="bf16")
    # Where the CPU has bf16, a silent fall back to fp32 is a failure.
    assert bf16.runtime_name == "openvino-bf16"
    cos = _cosines(bf16.embed_pixels(sample_pixels), lite_keras)
    assert cos.mean() >= 0.99 and cos.min() >= 0.94, (cos.min(), cos.mean())
    # bf16 arithmetic really ran: not the fp32 vectors (cosine 0.9999+ with Keras).
    assert cos.min() < 0.99999, cos.min()


def test_int8_stays_close_to_fp32(sample_pixels, lite_keras):
    encoder = load_registry(PLUGINS_DIR).get("lite0-any-precision")
    calibration = Calibration.from_paths([LABELLED], encoder.preprocessing)
    assert len(calibration.paths) == 50 and len(set(calibration.hashes)) == 50
    int8 = _encoder("lite0-any-precision", calibration=calibration)
    assert int8.runtime_name == "openvino-int8"
    cos = _cosines(int8.embed_pixels(sample_pixels), lite_keras)
    assert cos.mean() >= 0.95 and cos.min() >= 0.90, (cos.min(), cos.mean())
    # int8 really is another model: not a silent fp32.
    assert cos.min() < 0.99999


# -- the cache ----------------------------------------------------------------


def test_cached_model_loads_without_tensorflow_and_gives_the_same_vectors(sample_pixels, tmp_path):
    first = _encoder("efficientnet-lite0")
    expected = first.embed_pixels(sample_pixels[:4])
    np.save(tmp_path / "pixels.npy", sample_pixels[:4])
    code = (
        "import sys, numpy as np\n"
        "from imgsearch.encoders import load_registry\n"
        "e = load_registry().create('efficientnet-lite0').ensure_loaded()\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, e.embed_pixels(np.load({str(tmp_path / 'pixels.npy')!r})))\n"
        "print(e.runtime_name, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["openvino-fp32", "False", "False"]
    assert _cosines(np.load(tmp_path / "out.npy"), expected).min() >= 0.99999


def test_cache_entries_are_keyed_by_what_shapes_the_output(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    _encoder("resnet50", weights="none")
    entries = sorted(p.name for p in (tmp_path / "cache" / "openvino").iterdir())
    assert len(entries) == 1 and entries[0].startswith("resnet50-fp32-")
    # Other weights make another entry, never reuse this one.
    other = tmp_path / "other.weights.h5"
    model = load_registry().create("resnet50", "none").build_model()
    last = [layer for layer in model.layers if layer.weights][-1]
    last.weights[0].assign(last.weights[0] * 0.5)
    model.save_weights(other)
    _encoder("resnet50", weights=str(other))
    after = sorted(p.name for p in (tmp_path / "cache" / "openvino").iterdir())
    assert len(after) == 2 and entries[0] in after
    assert not [p for p in (tmp_path / "cache" / "openvino").iterdir() if p.name.startswith(".")]


def test_leftovers_of_a_killed_export_are_removed_once_old(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "openvino"
    old, young = root / ".resnet50-fp32-abc.old1", root / ".resnet50-fp32-abc.young1"
    for leftover in (old, young):
        leftover.mkdir(parents=True)
        (leftover / "model.bin").write_bytes(b"half a model")
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    _encoder("resnet50", weights="none")
    assert not old.exists() and young.exists()


def test_a_damaged_cache_entry_is_rebuilt(sample_pixels, lite_keras, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("IMGSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    _encoder("efficientnet-lite0")
    (entry,) = (tmp_path / "cache" / "openvino").iterdir()
    (entry / "model.xml").write_text("<net>not a model")
    again = _encoder("efficientnet-lite0")
    assert again.runtime_name == "openvino-fp32"
    assert "rebuilding the cached OpenVINO model" in caplog.text
    assert _cosines(again.embed_pixels(sample_pixels[:5]), lite_keras[:5]).min() >= 0.9999


# -- fallbacks and refusals -----------------------------------------------------


def test_an_export_that_disagrees_with_keras_is_refused(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("IMGSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "FP32_MIN_COSINE", 1.5)  # no export can pass now
    encoder = _encoder("resnet50", weights="none")
    assert encoder.runtime_name == "keras"
    assert "disagrees with Keras" in caplog.text
    assert not list((tmp_path / "cache").rglob("model.xml"))  # nothing wrong was cached
    with pytest.raises(UsageError, match="cannot run resnet50 with OpenVINO"):
        _encoder("resnet50", "openvino", weights="none")


def _wrapped(keras_model, mistake):
    """The Keras model with a mistake in front of it, as a broken export would have."""
    import keras

    inputs = keras.Input(keras_model.input_shape[1:])
    return keras.Model(inputs, keras_model(keras.layers.Lambda(mistake)(inputs)))


BROKEN_EXPORTS = {
    # Channels reversed (RGB taken for BGR).
    "channel order": ("efficientnet-lite0", None, lambda x: x[..., ::-1]),
    # Inputs squeezed into +-3, as an export assuming unit-scale inputs
    # would: ResNet50's own span about +-150, so noise in +-2 never shows it.
    "input scale": ("resnet50", "none", lambda x: __import__("keras").ops.clip(x, -3.0, 3.0)),
}


@pytest.mark.parametrize("mistake", sorted(BROKEN_EXPORTS))
def test_a_broken_export_is_caught_by_the_probe_images(mistake, monkeypatch, tmp_path, caplog):
    import openvino

    name, weights, bug = BROKEN_EXPORTS[mistake]
    monkeypatch.setenv("IMGSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    convert = openvino.convert_model
    monkeypatch.setattr(openvino, "convert_model", lambda model, **kw: convert(_wrapped(model, bug), **kw))
    encoder = _encoder(name, weights=weights)
    assert encoder.runtime_name == "keras"  # the broken export was refused
    assert "disagrees with Keras" in caplog.text
    assert not list((tmp_path / "cache").rglob("model.xml"))


def _reversed_channels(model):
    """An OpenVINO model that reads its input's channels in reverse order."""
    from openvino.preprocess import PrePostProcessor

    steps = PrePostProcessor(model)
    steps.input().tensor().set_layout(__import__("openvino").Layout("NHWC"))
    steps.input().preprocess().reverse_channels()
    return steps.build()


def test_an_int8_model_that_disagrees_with_fp32_is_refused(monkeypatch, tmp_path):
    import nncf

    monkeypatch.setenv("IMGSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    quantize = nncf.quantize
    monkeypatch.setattr(nncf, "quantize", lambda model, *a, **kw: _reversed_channels(quantize(model, *a, **kw)))
    encoder = load_registry(PLUGINS_DIR).get("lite0-any-precision")
    calibration = Calibration.from_paths([LABELLED / "tench", LABELLED / "church"], encoder.preprocessing)
    with pytest.raises(UsageError, match="int8 model disagrees with the fp32 model"):
        _encoder("lite0-any-precision", calibration=calibration)
    assert not list((tmp_path / "cache").glob("*int8*"))  # nothing wrong was cached
    # The real quantization passes the same check.
    monkeypatch.setattr(nncf, "quantize", quantize)
    assert _encoder("lite0-any-precision", calibration=calibration).runtime_name == "openvino-int8"


def test_without_openvino_auto_runs_keras_and_asked_for_openvino_fails(monkeypatch):
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    assert _encoder("resnet50", weights="none").runtime_name == "keras"
    with pytest.raises(UsageError, match="OpenVINO is not installed"):
        _encoder("resnet50", precision="bf16", weights="none")


def test_bad_runtime_choices_are_one_line_errors(index_dir, tmp_path):
    result = run("evaluate", "--index", index_dir, "--leave-one-out", "--precision", "fp32", code=2)
    assert "use the vectors already in the index" in result.stderr
    result = run("query", SAMPLE_DATA / "queries" / "tench.jpg", "--index", index_dir,
                 "--runtime", "keras", "--precision", "bf16", code=2)
    assert "needs the OpenVINO runtime" in result.stderr
    # An encoder without a Keras model runs its own code, fp32 only.
    result = run("index", LABELLED, "--index", tmp_path / "t", "--encoder", "tiny-color",
                 "--precision", "bf16", code=2)
    assert "offers no Keras model" in result.stderr and not (tmp_path / "t").exists()
    result = run("query", SAMPLE_DATA / "queries" / "tench.jpg", "--index", index_dir, "--runtime", "openvino",
                 code=2)
    assert "offers no Keras model" in result.stderr


# -- precisions of an index ------------------------------------------------------


def test_an_int8_index_records_its_calibration_and_keeps_its_precision(tmp_path):
    ix = tmp_path / "ix8"
    built = run("index", LABELLED, "--index", ix, "--encoder", "lite0-any-precision", "--precision", "int8")
    assert "openvino-int8" in built.stderr
    manifest = json.loads((ix / "manifest.json").read_text())
    calibration = Calibration.from_paths([LABELLED], load_registry().get("efficientnet-lite0").preprocessing)
    assert manifest["encoder"]["precision"] == "int8"
    assert manifest["encoder"]["calibration"] == calibration.id
    facts = json.loads(run("info", "--index", ix, "--format", "json").stdout)
    assert (facts["precision"], facts["calibration"]) == ("int8", calibration.id)
    assert "precision:           int8" in run("info", "--index", ix).stdout

    found = json.loads(run("query", SAMPLE_DATA / "queries" / "church.jpg", "--index", ix, "-k", "5",
                           "--format", "json").stdout)
    assert [hit["label"] for hit in found["results"]] == ["church"] * 5
    # An index's vectors are all made one way: adding at another precision is refused...
    refused = run("index", LABELLED, "--index", ix, "--precision", "fp32", code=2)
    assert "built with --precision int8" in refused.stderr
    # ...while a query may use fp32, whose vectors int8 approximates.
    fp32 = json.loads(run("query", SAMPLE_DATA / "queries" / "church.jpg", "--index", ix, "-k", "5",
                          "--precision", "fp32", "--format", "json").stdout)
    assert [hit["label"] for hit in fp32["results"]] == ["church"] * 5
    assert abs(fp32["results"][0]["score"] - found["results"][0]["score"]) < 0.05


def test_an_index_records_the_precision_that_ran_and_refuses_mixing_by_it(tmp_path, monkeypatch):
    has_bf16 = runtime._OpenVINO._cpu_has_bf16
    without_bf16 = lambda self: False  # noqa: E731  (a CPU without bf16, as imgsearch sees it)
    monkeypatch.setattr(runtime._OpenVINO, "_cpu_has_bf16", without_bf16)
    ix = tmp_path / "ix"
    built = run("index", LABELLED / "tench", "--index", ix, "--encoder", "lite0-any-precision",
                "--precision", "bf16")
    assert "openvino-fp32" in built.stderr
    assert json.loads((ix / "manifest.json").read_text())["encoder"]["precision"] == "fp32"
    assert json.loads(run("info", "--index", ix, "--format", "json").stdout)["precision"] == "fp32"
    # The same command resumes on the same machine: fp32 runs again.
    assert run("index", LABELLED / "church", "--index", ix, "--precision", "bf16").stdout.startswith("added 10,")
    if not _cpu_runs_bf16():
        pytest.skip("this CPU has no bf16: the refusal of bf16 vectors for an fp32 index cannot be shown here")
    # On a CPU with bf16, bf16 vectors would join the fp32 ones: refused, index untouched.
    monkeypatch.setattr(runtime._OpenVINO, "_cpu_has_bf16", has_bf16)
    before = (ix / "manifest.json").read_bytes()
    refused = run("index", LABELLED / "parachute", "--index", ix, "--precision", "bf16", code=2)
    assert "holds fp32 vectors" in refused.stderr and "openvino-bf16" in refused.stderr
    assert (ix / "manifest.json").read_bytes() == before
    # And the other way: a bf16 index is refused fp32 vectors from a CPU that falls back.
    ix16 = tmp_path / "ix16"
    run("index", LABELLED / "tench", "--index", ix16, "--encoder", "lite0-any-precision", "--precision", "bf16")
    assert json.loads((ix16 / "manifest.json").read_text())["encoder"]["precision"] == "bf16"
    monkeypatch.setattr(runtime._OpenVINO, "_cpu_has_bf16", without_bf16)
    refused = run("index", LABELLED / "church", "--index", ix16, code=2)
    assert "holds bf16 vectors" in refused.stderr and "openvino-fp32" in refused.stderr


def test_int8_queries_need_an_int8_index_and_survive_a_cleared_cache(tmp_path, monkeypatch, caplog):
    fp32_ix = tmp_path / "ix"
    run("index", LABELLED, "--index", fp32_ix, "--encoder", "lite0-any-precision")
    refused = run("query", SAMPLE_DATA / "queries" / "tench.jpg", "--index", fp32_ix, "--precision", "int8",
                  code=2)
    assert "needs an index built with --precision int8" in refused.stderr

    # The int8 model lives in the cache; elsewhere the index still answers, in fp32.
    monkeypatch.setenv("IMGSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    ix8 = tmp_path / "ix8"
    run("index", LABELLED, "--index", ix8, "--encoder", "lite0-any-precision", "--precision", "int8")
    shutil.rmtree(tmp_path / "cache")
    answered = run("classify", SAMPLE_DATA / "queries" / "tench.jpg", "--index", ix8, "--format", "json")
    assert json.loads(answered.stdout)["label"] == "tench"
    assert "calibrated for this index is not cached here" in caplog.text
    # Adding would mix fp32 vectors into an int8 index: refused, index untouched.
    before = (ix8 / "manifest.json").read_bytes()
    refused = run("index", SAMPLE_DATA / "queries", "--index", ix8, code=2)
    assert "build a new index" in refused.stderr
    assert (ix8 / "manifest.json").read_bytes() == before
    # Asking for int8 explicitly gets no silent fp32 either.
    run("query", SAMPLE_DATA / "queries" / "tench.jpg", "--index", ix8, "--precision", "int8", code=2)


def test_a_prefetch_worker_error_reaches_the_consumer_in_order():
    def work(item):
        if item == 3:
            raise ValueError("bad item")
        return item

    seen = []
    with pytest.raises(ValueError, match="bad item"):
        for result in prefetch(work, range(10), ahead=4, workers=2):
            seen.append(result)
    assert seen == [0, 1, 2]


def test_int8_models_are_cached_per_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    prep = load_registry().get("efficientnet-lite0").preprocessing
    first = Calibration.from_paths([LABELLED / "tench"], prep)
    second = Calibration.from_paths([LABELLED / "church"], prep)
    assert first.id != second.id
    a = _encoder("lite0-any-precision", calibration=first)
    b = _encoder("lite0-any-precision", calibration=second)
    assert a.runtime_name == b.runtime_name == "openvino-int8"
    names = sorted(p.name for p in (tmp_path / "cache" / "openvino").iterdir())
    assert [n.split("-")[-2] for n in names].count("int8") == 2 and len(names) == 3  # + the fp32 export


def test_query_on_a_cached_model_does_not_import_tensorflow(tmp_path):
    ix = tmp_path / "ix"
    run("index", LABELLED, "--index", ix, "--encoder", "efficientnet-lite0")
    code = (
        "import sys\n"
        "from imgsearch.cli import main\n"
        f"try:\n    main([{'query'!r}, {str(SAMPLE_DATA / 'queries' / 'parachute.jpg')!r}, '--index', {str(ix)!r},"
        " '-k', '1', '--format', 'json'])\n"
        "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('tensorflow' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["results"][0]["label"] == "parachute"
    assert done.stderr.strip().splitlines()[-1] == "False"


def test_efficientnet_classifier_still_works_when_the_encoder_runs_openvino(sample_pixels):
    encoder = _encoder("efficientnet-lite0")
    assert encoder.runtime_name == "openvino-fp32"
    logits = encoder.classifier()(encoder.preprocessing.normalize(sample_pixels[:2]))
    assert logits.shape == (2, 1000)


# -- the pipeline ------------------------------------------------------------------


def test_every_encoder_call_gets_a_full_batch(tmp_path, labelled_copy, monkeypatch):
    from imgsearch import Index
    from imgsearch.encoders import Encoder

    sizes = []
    original = Encoder.embed_pixels

    def spy(self, pixels):
        sizes.append(len(pixels))
        return original(self, pixels)

    monkeypatch.setattr(Encoder, "embed_pixels", spy)
    files = sorted(p for p in labelled_copy.rglob("*") if p.is_file())
    with Index.build(tmp_path / "ix", encoder="tiny-color", plugins_dir=PLUGINS_DIR) as index:
        index.add(files[::2], batch_size=8)  # 25 new
    sizes.clear()
    (files[1].parent / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with Index.build(tmp_path / "ix", plugins_dir=PLUGINS_DIR) as index:
        # 25 unchanged, 25 new and one unreadable file, interleaved
        report = index.add([labelled_copy], batch_size=8)
    assert report.added == 25 and report.unchanged == 25 and len(report.skipped) == 1
    assert sizes == [8, 8, 8, 1]


def test_prefetch_keeps_order_and_holds_only_a_few_results():
    made, consumed, most_ahead = [], [], [0]
    lock = threading.Lock()

    def work(item):
        with lock:
            made.append(item)
            most_ahead[0] = max(most_ahead[0], len(made) - len(consumed))
        return item * 2

    for result in prefetch(work, range(200), ahead=6, workers=3):
        time.sleep(0.0005)  # a consumer slower than the workers
        consumed.append(result)
    assert consumed == [i * 2 for i in range(200)]
    assert most_ahead[0] <= 7  # the results waiting plus the one being handed over


def test_closing_prefetch_early_stops_the_work():
    made = []

    def work(item):
        time.sleep(0.01)
        made.append(item)
        return item

    results = prefetch(work, range(1000), ahead=50, workers=1)
    assert next(results) == 0
    results.close()
    # Closing waits for the one running item and cancels the 48 queued.
    assert len(made) <= 3



def test_serving_int8_needs_calibration_images():
    result = run("serve-vectorizer", "--encoder", "lite0-any-precision", "--precision", "int8", code=2)
    assert "needs --calibration" in result.stderr
    result = run("serve-vectorizer", "--encoder", "efficientnet-lite0", "--calibration", LABELLED, code=2)
    assert "calibrates --precision int8 only" in result.stderr


def test_a_precision_an_encoder_does_not_offer_is_refused_with_its_reason(tmp_path):
    result = run("index", LABELLED, "--index", tmp_path / "ix", "--encoder", "efficientnet-lite0",
                 "--precision", "int8", code=2)
    assert "offers --precision fp32, not int8" in result.stderr
    assert "top-10" in result.stderr  # the measured reason
    assert not (tmp_path / "ix").exists()


def test_serving_a_precision_the_encoder_does_not_offer_is_refused_at_start():
    result = run("serve-vectorizer", "--encoder", "efficientnet-lite0", "--precision", "bf16", code=2)
    assert "offers --precision fp32, not bf16" in result.stderr
    result = run("serve-vectorizer", "--encoder", "tiny-color", "--runtime", "openvino", code=2)
    assert "offers no Keras model" in result.stderr
