import os
import shutil
from pathlib import Path

import pytest

# Set before anything imports gRPC (pymilvus, Ray): its fork handlers can
# abort a child that a test forks while gRPC threads run in this process.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "sample_data"
PLUGINS_DIR = Path(__file__).resolve().parent / "plugins"

_ENV_VARS = ("IMGSEARCH_INDEX", "IMGSEARCH_PLUGINS_DIR", "IMGSEARCH_ENCODER", "IMGSEARCH_RESNET50_WEIGHTS")


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    # Shared by all tests so converted weights are made once per run, but
    # never the user's own cache.
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path, _session_cache):
    """Keep tests away from the user's caches, indexes and settings."""
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IMGSEARCH_CACHE_DIR", str(_session_cache))
    monkeypatch.setenv("IMGSEARCH_DATA_DIR", str(tmp_path / "user-data"))  # where the default index lives
    keras_home = tmp_path / "keras-home"
    keras_home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture
def labelled_copy(tmp_path):
    """A writable copy of sample_data/labelled."""
    target = tmp_path / "labelled"
    shutil.copytree(SAMPLE_DATA / "labelled", target)
    return target


@pytest.fixture
def index_dir(tmp_path):
    """An index of sample_data/labelled made with the tiny-color test encoder."""
    target = tmp_path / "ix"
    run("index", SAMPLE_DATA / "labelled", "--index", target, "--encoder", "tiny-color")
    return target


@pytest.fixture
def registry():
    from imgsearch.encoders import load_registry

    return load_registry(PLUGINS_DIR)


def run(*args, code=0):
    """Invoke the CLI in-process (test plugins loaded) and check the exit
    code; a failure must be one 'Error:' line and never a traceback."""
    from click.testing import CliRunner

    from imgsearch.cli import main

    result = CliRunner().invoke(main, ["--plugins-dir", str(PLUGINS_DIR), *map(str, args)])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    if code:
        lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1, result.stderr
    return result


def run_process(*args, timeout=120):
    """Run the installed `imgsearch` command with the test plugins; fail the
    test if it does not finish in time."""
    import subprocess
    import sys

    exe = shutil.which("imgsearch", path=os.path.dirname(sys.executable)) or shutil.which("imgsearch")
    try:
        return subprocess.run([exe, "--plugins-dir", str(PLUGINS_DIR), *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"imgsearch {args[0]} did not finish within {exc.timeout} s")


def kill_when(process, condition, deadline=120.0):
    """SIGKILL the process as soon as condition() holds; False if it ended first.
    Polls without sleeping: some moments (a commit's temporary file) last
    only milliseconds."""
    import signal
    import time

    end = time.monotonic() + deadline
    while process.poll() is None and time.monotonic() < end:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
    process.wait()
    return False


def sqlite_writing(index_dir):
    """A condition for kill_when: SQLite is writing a commit, i.e. its
    write-ahead log (metadata.sqlite-wal) changed since the last look."""
    wal = Path(index_dir) / "metadata.sqlite-wal"
    last = [None]

    def check():
        try:
            stat = wal.stat()
            now = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            now = None
        changed = now is not None and last[0] is not None and now != last[0]
        last[0] = now
        return changed

    return check


@pytest.fixture(scope="session")
def resnet50_spread(tmp_path_factory):
    """``(model, weights file)``: a Keras ResNet50 base (no top, average
    pooling) with random weights whose vectors differ between images.

    Plain random initialisation gives nearly one vector for every picture
    (mean cosine 0.99 between different photos, 0.9998 between a photo and
    its channels reversed), so a check that two ways of running it agree
    could hardly fail.  Here every batch normalisation takes the statistics
    of the sample photos (one forward pass in training mode with momentum
    0), which keeps activations centred all the way up: mean cosine 0.94
    between photos, 0.88 for a photo against its channels reversed."""
    import keras
    import numpy as np

    from imgsearch import images as imgs
    from imgsearch_resnet50 import ResNet50Encoder

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(include_top=False, weights=None, pooling="avg", input_shape=(224, 224, 3))
    prep = ResNet50Encoder.preprocessing
    photos = sorted((SAMPLE_DATA / "labelled").rglob("*.jpg"))[::3]
    pixels = prep.normalize(np.stack([imgs.to_pixels(imgs.read_bytes(p), prep)[0] for p in photos]))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(pixels.astype("float32"), training=True)
    path = tmp_path_factory.mktemp("weights") / "resnet50-spread.weights.h5"
    model.save_weights(path)
    return model, path


def store_of(path, vectors, per_commit=None):
    """A store of ``vectors`` (ids from 1), committed ``per_commit`` at a
    time (default: all at once)."""
    from imgsearch.store import Changes, Entry, Store

    store = Store.create(path, encoder={"name": "test"}, dim=vectors.shape[1])
    per_commit = per_commit or len(vectors)
    for start in range(0, len(vectors), per_commit):
        chunk = vectors[start:start + per_commit]
        entries = [Entry(start + i + 1, f"/v/{start + i}.jpg", f"sha{start + i}", 1, 1.0, None, 1, 1)
                   for i in range(len(chunk))]
        store.commit(Changes(added=entries, vectors=list(chunk)))
    return store
