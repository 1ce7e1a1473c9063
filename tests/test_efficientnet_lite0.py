"""The EfficientNet-Lite0 encoder: the torch-free reader, the conversion and
the converted model's answers on real photos."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsearch.encoders import Registry
from imgsearch.errors import WeightsError
from imgsearch.runtime import RuntimeOptions
from imgsearch_efficientnet_lite0 import EfficientNetLite0Encoder, register_encoders
from imgsearch_efficientnet_lite0 import weights as lite_weights
from imgsearch_efficientnet_lite0.torch_state import (
    LEGACY_MAGIC,
    LEGACY_VERSION,
    UnsafePickleError,
    read_state_dict,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_LABELLED = REPO / "sample_data" / "labelled"
IMAGENET_IDS = {
    "tench": 0,
    "english_springer": 217,
    "cassette_player": 482,
    "chain_saw": 491,
    "church": 497,
    "french_horn": 566,
    "garbage_truck": 569,
    "gas_pump": 571,
    "golf_ball": 574,
    "parachute": 701,
}
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("lite0-cache")


def _load(weights: str, cache: Path) -> EfficientNetLite0Encoder:
    # The cache location is read when the model loads, so it is set around
    # each load: module-scoped models outlive any per-test environment, and
    # the cache tests need one folder they alone write to.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGSEARCH_CACHE_DIR", str(cache))
        # Keras, the reference path these tests pin down (tests/test_runtime.py
        # compares OpenVINO with it).
        return EfficientNetLite0Encoder(weights).use_runtime(RuntimeOptions("keras")).ensure_loaded()


@pytest.fixture(scope="module")
def imagenet_encoder(cache_folder):
    encoder = _load("imagenet", cache_folder)
    # The folder is new, so this load must have converted the .pth file.
    assert encoder.weights_origin == "converted"
    return encoder


@pytest.fixture(scope="module")
def state():
    return read_state_dict(lite_weights.packaged_weights_path(), lite_weights.WEIGHTS_SHA256)


@pytest.fixture(scope="module")
def pixels():
    """A small deterministic batch: noise over gradients, already resized."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, 224, dtype=np.float32)
    base = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1)
    noise = rng.normal(0, 40, size=(4, 224, 224, 3))
    batch = np.clip(base + noise, 0, 255).astype(np.uint8)
    return EfficientNetLite0Encoder.preprocessing.normalize(batch)


# -- a writer of tiny legacy files, by pickle opcodes --------------------------
# Written by hand because pickling real torch globals needs torch itself; the
# opcodes are those torch.save (protocol 2) emits for a state dict.


def _op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _op_tensor(key: str, storage: str, numel: int, offset: int, size, stride) -> bytes:
    persistent_id = _op_tuple(
        _op_str("storage"), _op_global("torch", storage), _op_str(key), _op_str("cpu"), _op_int(numel), b"N"
    ) + b"Q"
    args = _op_tuple(
        persistent_id,
        _op_int(offset),
        _op_tuple(*map(_op_int, size)),
        _op_tuple(*map(_op_int, stride)),
        b"\x89",  # requires_grad=False
        _op_global("collections", "OrderedDict") + b")R",  # no backward hooks
    )
    return _op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _legacy_file(path: Path, main_pickle: bytes, storages: dict[str, np.ndarray], magic_pickle: bytes | None = None):
    parts = [
        magic_pickle or pickle.dumps(LEGACY_MAGIC, protocol=2),
        pickle.dumps(LEGACY_VERSION, protocol=2),
        pickle.dumps({"protocol_version": LEGACY_VERSION, "little_endian": True}, protocol=2),
        main_pickle,
        pickle.dumps(list(storages), protocol=2),
    ]
    for array in storages.values():
        parts.append(struct.pack("<q", array.size) + array.tobytes())
    path.write_bytes(b"".join(parts))
    return path


def _state_pickle(entries: dict[str, bytes]) -> bytes:
    body = b"".join(_op_str(name) + tensor for name, tensor in entries.items())
    return b"\x80\x02" + _op_global("collections", "OrderedDict") + b")R(" + body + b"u."


def _os_system_pickle(marker: Path) -> bytes:
    return b"\x80\x02" + _op_global("os", "system") + _op_tuple(_op_str(f"touch {marker}")) + b"R."


# -- the restricted reader ------------------------------------------------------


def test_reader_rebuilds_strided_tensors(tmp_path):
    floats = np.arange(6, dtype="<f4")
    longs = np.array([41], dtype="<i8")
    main = _state_pickle({
        # a 2x3 tensor stored column-major, as the shipped kernels are
        "w": _op_tensor("0", "FloatStorage", 6, 0, (2, 3), (1, 2)),
        "n": _op_tensor("1", "LongStorage", 1, 0, (), ()),
    })
    path = _legacy_file(tmp_path / "small.pth", main, {"0": floats, "1": longs})
    state = read_state_dict(path)
    assert state["w"].dtype == np.float32 and state["n"].dtype == np.int64
    np.testing.assert_array_equal(state["w"], floats.reshape(3, 2).T)
    assert state["n"].shape == () and int(state["n"]) == 41


@pytest.mark.parametrize("slot", ["state dict", "magic number"])
def test_reader_refuses_foreign_globals(tmp_path, slot):
    marker = tmp_path / "ran"
    evil = _os_system_pickle(marker)
    floats = np.zeros(1, dtype="<f4")
    if slot == "state dict":
        path = _legacy_file(tmp_path / "evil.pth", evil, {"0": floats})
    else:
        main = _state_pickle({"w": _op_tensor("0", "FloatStorage", 1, 0, (1,), (1,))})
        path = _legacy_file(tmp_path / "evil.pth", main, {"0": floats}, magic_pickle=evil)
    with pytest.raises(UnsafePickleError, match="os.system"):
        read_state_dict(path)
    assert not marker.exists()


def test_reader_refuses_tensor_reaching_past_its_storage(tmp_path):
    main = _state_pickle({"w": _op_tensor("0", "FloatStorage", 4, 0, (2, 3), (3, 1))})
    path = _legacy_file(tmp_path / "long.pth", main, {"0": np.zeros(4, dtype="<f4")})
    with pytest.raises(WeightsError, match="past the end"):
        read_state_dict(path)


def test_reader_refuses_packaged_weights_with_wrong_digest(tmp_path):
    damaged = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copyfile(lite_weights.packaged_weights_path(), damaged)
    with open(damaged, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(WeightsError) as caught:
        read_state_dict(damaged, lite_weights.WEIGHTS_SHA256)
    assert "\n" not in str(caught.value) and "sha256" in str(caught.value)
    # The loader checks the pin itself too, before building anything.
    source = lite_weights.WeightsSource("imagenet", damaged, lite_weights.WEIGHTS_SHA256)
    with pytest.raises(WeightsError, match="sha256"):
        lite_weights.load_network(source)


# -- conversion -------------------------------------------------------------------


def test_conversion_uses_every_key(imagenet_encoder, state):
    from imgsearch_efficientnet_lite0.model import conversion_plan

    plan = conversion_plan(imagenet_encoder._network, state)
    layers = {layer.name for layer, _ in plan}
    prefixes = {key.rsplit(".", 1)[0] for key in state}
    assert layers == prefixes
    weighted = [layer for layer in imagenet_encoder._network.layers if layer.weights]
    assert len(plan) == len(weighted)
    assert imagenet_encoder._network.count_params() == sum(
        v.size for k, v in state.items() if not k.endswith("num_batches_tracked")
    )
    # The loaded kernels are the torch ones in Keras' layout.
    network = imagenet_encoder._network
    np.testing.assert_array_equal(
        network.get_layer("_conv_stem").get_weights()[0], state["_conv_stem.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        network.get_layer("_blocks.5._depthwise_conv").get_weights()[0],
        state["_blocks.5._depthwise_conv.weight"].transpose(2, 3, 0, 1),
    )
    np.testing.assert_array_equal(network.get_layer("_fc").get_weights()[0], state["_fc.weight"].T)


@pytest.mark.parametrize("damage", ["extra key", "missing key", "wrong shape"])
def test_conversion_refuses_a_state_dict_that_does_not_fit(imagenet_encoder, state, damage):
    from imgsearch_efficientnet_lite0.model import load_state_dict

    broken = dict(state)
    if damage == "extra key":
        broken["_blocks.0._se_reduce.weight"] = np.zeros((8, 32, 1, 1), np.float32)
    elif damage == "missing key":
        del broken["_blocks.7._bn1.running_var"]
    else:
        broken["_conv_head.weight"] = np.zeros((1280, 321, 1, 1), np.float32)
    network = imagenet_encoder._network
    before = network.get_layer("_conv_head").get_weights()[0].copy()
    with pytest.raises(WeightsError):
        load_state_dict(network, broken)
    # Checking happens before assigning, so the shared model is untouched.
    np.testing.assert_array_equal(network.get_layer("_conv_head").get_weights()[0], before)


# -- the converted model on real photos ----------------------------------------------


def _labelled_photos():
    if not SAMPLE_LABELLED.is_dir():
        return []
    photos = []
    for folder in sorted(SAMPLE_LABELLED.iterdir()):
        if folder.name in IMAGENET_IDS:
            photos += [(p, IMAGENET_IDS[folder.name]) for p in sorted(folder.iterdir())
                       if p.suffix.lower() in PHOTO_SUFFIXES]
    return photos


def test_imagenet_classes_of_real_photos_are_in_top5(imagenet_encoder):
    photos = _labelled_photos()
    assert len(photos) >= 50, f"expected the sample photos under {SAMPLE_LABELLED}"
    preprocessing = imagenet_encoder.preprocessing
    arrays = []
    for path, _ in photos:
        with Image.open(path) as image:
            arrays.append(preprocessing.resize_image(image.convert("RGB")))
    logits = imagenet_encoder.classifier()(preprocessing.normalize(np.stack(arrays)))
    assert logits.shape == (len(photos), 1000)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    hits = [label in row for (_, label), row in zip(photos, top5)]
    assert np.mean(hits) >= 0.8, f"top-5 hit rate {np.mean(hits):.2f} over {len(photos)} photos"


# -- determinism and the cache --------------------------------------------------------


def test_random_weights_are_the_same_on_every_load(pixels, tmp_path):
    cache = tmp_path / "cache"
    first = _load("none", cache)
    second = _load("none", cache)
    a, b = first.embed_batch(pixels), second.embed_batch(pixels)
    assert a.shape == (len(pixels), 1280)
    np.testing.assert_array_equal(a, b)
    assert np.std(a) > 1e-3  # features that vanished would make this vacuous
    assert first.weights_fingerprint() == "random:seed0"
    assert not cache.exists()  # random weights are never cached


def test_second_imagenet_load_reads_the_cache(imagenet_encoder, pixels, cache_folder):
    cached = cache_folder / f"efficientnet-lite0-{lite_weights.WEIGHTS_SHA256[:12]}.weights.h5"
    assert cached.is_file()
    again = _load("imagenet", cache_folder)
    assert again.weights_origin == "cache"
    expected = imagenet_encoder.embed_batch(pixels)
    np.testing.assert_array_equal(again.embed_batch(pixels), expected)
    assert again.weights_fingerprint() == f"sha256:{lite_weights.WEIGHTS_SHA256}"

    # A damaged cache is converted again and replaced, never trusted.
    cached.write_bytes(b"not an HDF5 file")
    repaired = _load("imagenet", cache_folder)
    assert repaired.weights_origin == "converted"
    np.testing.assert_array_equal(repaired.embed_batch(pixels), expected)
    assert cached.stat().st_size > 1_000_000
    assert not [p for p in cache_folder.iterdir() if p.name.startswith(".")]  # no temp files left


# -- the cheap side: import, status, registration -----------------------------------


def test_import_and_status_do_not_load_tensorflow():
    code = (
        "import sys, imgsearch_efficientnet_lite0 as m\n"
        "e = m.EfficientNetLite0Encoder()\n"
        "assert e.weights_status().available\n"
        "assert e.weights_fingerprint().startswith('sha256:5793442')\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_weights_status_of_a_missing_file(tmp_path):
    status = EfficientNetLite0Encoder(str(tmp_path / "absent.pth")).weights_status()
    assert not status.available and "absent.pth" in status.detail


def test_registers_the_encoder():
    registry = Registry()
    register_encoders(lambda cls: registry.register(cls, "test"))
    assert registry.names() == ["efficientnet-lite0"]
    encoder = registry.create("efficientnet-lite0")
    assert encoder.dim == 1280 and encoder.weights == "imagenet"
