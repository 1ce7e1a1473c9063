"""The resnet50 encoder against keras.applications.ResNet50 itself.

Random weights stand in for the ImageNet ones, which cannot be downloaded
here; parity with the same weights is what these tests prove.  The weights
are initialised so that vectors differ between images (conftest's
``resnet50_spread``): with plain random weights every photo gets nearly
the same vector, and a wrong channel order would still agree to 0.9998.
"""

import numpy as np
import pytest

from imgsearch.errors import WeightsError
from imgsearch.images import decode

from conftest import SAMPLE_DATA

pytestmark = pytest.mark.slow


def _photos(n=6):
    paths = sorted((SAMPLE_DATA / "labelled").glob("*/*.jpg"))[::9][:n]
    return [decode(p.read_bytes()) for p in paths]


@pytest.fixture(scope="module")
def reference_weights(resnet50_spread):
    """A Keras ResNet50 base with its own random weights, saved to a file."""
    return resnet50_spread


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_preprocessing_equals_keras_preprocess_input():
    from keras.applications.resnet50 import preprocess_input

    from imgsearch_resnet50 import ResNet50Encoder

    pixels = np.stack([ResNet50Encoder.preprocessing.resize_image(im) for im in _photos()])
    ours = ResNet50Encoder.preprocessing.normalize(pixels)
    theirs = preprocess_input(pixels.astype(np.float32))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_embeddings_equal_keras_resnet50_with_the_same_weights(reference_weights):
    from keras.applications.resnet50 import preprocess_input

    from imgsearch_resnet50 import ResNet50Encoder

    model, path = reference_weights
    encoder = ResNet50Encoder(str(path))
    photos = _photos()
    ours = encoder.embed_images(photos)
    pixels = np.stack([encoder.preprocessing.resize_image(im) for im in photos]).astype(np.float32)
    theirs = model.predict(preprocess_input(pixels), verbose=0)
    assert ours.shape == (len(photos), 2048) and ours.dtype == np.float32
    assert _cosines(ours, theirs).min() >= 0.99999
    assert encoder.weights_fingerprint().startswith("sha256:")
    # Negative controls: the same check fails for a channel-order mistake
    # (RGB given where Keras expects it to make BGR) and a preprocessing one
    # (scaling to -1..1 instead of subtracting the ImageNet mean).
    swapped = model.predict(preprocess_input(pixels[..., ::-1].copy()), verbose=0)
    rescaled = model.predict(pixels / 127.5 - 1, verbose=0)
    for control in (swapped, rescaled):
        cosine = _cosines(ours, control).min()
        print(f"control cosine {cosine:.4f}")
        assert cosine < 0.999, cosine


def test_legacy_h5_weights_file_loads_too(reference_weights, tmp_path):
    from imgsearch_resnet50 import ResNet50Encoder

    model, path = reference_weights
    legacy = tmp_path / "resnet50.h5"
    # Keras 3 writes the legacy HDF5 layout only as a whole-model .h5 file
    model.save(legacy)
    encoder = ResNet50Encoder(str(legacy))
    photo = _photos(1)
    np.testing.assert_allclose(encoder.embed_images(photo), ResNet50Encoder(str(path)).embed_images(photo),
                               rtol=1e-4, atol=1e-5)


def test_random_weights_are_the_same_in_every_load():
    from imgsearch_resnet50 import ResNet50Encoder

    photo = _photos(2)
    first = ResNet50Encoder("none").embed_images(photo)
    second = ResNet50Encoder("none").embed_images(photo)
    np.testing.assert_array_equal(first, second)
    assert ResNet50Encoder("none").weights_fingerprint() == "random:seed0"


def test_weights_from_the_environment(monkeypatch, reference_weights):
    from imgsearch_resnet50 import ResNet50Encoder

    monkeypatch.setenv("IMGSEARCH_RESNET50_WEIGHTS", str(reference_weights[1]))
    encoder = ResNet50Encoder()
    assert encoder.weights == str(reference_weights[1])
    assert encoder.weights_status().available


def test_offline_download_failure_is_one_clear_line(monkeypatch):
    import imgsearch_resnet50

    # An address on this machine where nothing listens: a real failed
    # download, without sending traffic anywhere.
    monkeypatch.setattr(imgsearch_resnet50, "WEIGHTS_URL", "http://127.0.0.1:9/" + imgsearch_resnet50.WEIGHTS_FILE)
    encoder = imgsearch_resnet50.ResNet50Encoder()
    assert not encoder.weights_status().available
    with pytest.raises(WeightsError) as info:
        encoder.load()
    message = str(info.value)
    assert "\n" not in message
    assert imgsearch_resnet50.WEIGHTS_FILE in message
    assert str(imgsearch_resnet50.keras_cache_file().parent) in message
    assert "--weights" in message and "IMGSEARCH_RESNET50_WEIGHTS" in message and "efficientnet-lite0" in message


def test_bad_weights_files(tmp_path):
    from imgsearch_resnet50 import ResNet50Encoder

    with pytest.raises(WeightsError, match="not found"):
        ResNet50Encoder(str(tmp_path / "missing.h5")).load()
    broken = tmp_path / "broken.weights.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(WeightsError, match="cannot load resnet50 weights"):
        ResNet50Encoder(str(broken)).load()
    with pytest.raises(WeightsError, match=r"\.h5"):
        (tmp_path / "w.bin").write_bytes(b"x")
        ResNet50Encoder(str(tmp_path / "w.bin")).load()
