"""Indexing on a Ray cluster (``index --ray``) against a local run.

A real two-node Ray cluster (:class:`ray_nodes.TwoNodes`) runs on loopback
for this module, with token authentication switched on, as a cluster on a
network should have it.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_DATA, kill_when
from ray_nodes import TwoNodes, free_port, wait_for

pytestmark = pytest.mark.slow

RAY_PLUGINS = Path(__file__).resolve().parent / "plugins_ray"
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, _session_cache):
    """``(address, env)``: a two-node cluster and the environment a driver
    needs to join it."""
    with TwoNodes(tmp_path_factory.mktemp("ray"), _session_cache, pace_s=0.15) as nodes:
        yield nodes.address, nodes.env


def imgsearch(*args, env=None, plugins=RAY_PLUGINS, timeout=300, wait=True):
    command = [str(BIN / "imgsearch"), "--plugins-dir", str(plugins), *map(str, args)]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_line_error(result) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def contents(index_dir):
    """Every entry's metadata, and the vectors in id order."""
    from imgsearch.store import Store

    with Store.open(index_dir) as store:
        entries = store.entries()
        rows = [(e.id, e.path, e.sha256, e.size, e.mtime, e.label, e.width, e.height) for e in entries]
        aliases = sorted((a.path, a.image_id) for a in store.aliases())
        return rows, aliases, store.vectors([e.id for e in entries])


def assert_same_index(local, remote):
    rows, aliases, vectors = contents(local)
    remote_rows, remote_aliases, remote_vectors = contents(remote)
    assert remote_rows == rows
    assert remote_aliases == aliases
    cosines = np.sum(vectors * remote_vectors, axis=1)
    assert cosines.min() >= 0.9999, cosines.min()


@pytest.fixture
def photos(tmp_path):
    """The labelled sample photos, a copy of one and a file that is not an image."""
    root = tmp_path / "photos"
    shutil.copytree(SAMPLE_DATA / "labelled", root)
    first = sorted((root / "church").iterdir())[0]
    shutil.copy(first, root / "church" / "zz-copy.jpg")
    (root / "church" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_two_node_run_equals_a_local_run(cluster, photos, tmp_path):
    address, env = cluster
    local = imgsearch("index", photos, "--index", tmp_path / "local", "--encoder", "efficientnet-lite0")
    assert local.returncode == 0, local.stderr
    remote = imgsearch("index", photos, "--index", tmp_path / "remote", "--encoder", "efficientnet-lite0",
                       "--ray", address, env=env)
    assert remote.returncode == 0, remote.stderr
    assert "added 50," in remote.stdout and "duplicates 1," in remote.stdout and "skipped 1 " in remote.stdout
    # The same file is skipped for the same reason, on stderr or stdout alike.
    skipped = [line for line in (remote.stdout + remote.stderr).splitlines() if "broken.jpg" in line]
    assert skipped and skipped == [line for line in (local.stdout + local.stderr).splitlines()
                                   if "broken.jpg" in line]
    assert_same_index(tmp_path / "local", tmp_path / "remote")
    # Negative control: the check fails for vectors made with the channels
    # reversed (efficientnet-lite0's real weights tell images apart).
    from imgsearch import images as imgs
    from imgsearch.encoders import l2_normalize, load_registry

    rows, _, vectors = contents(tmp_path / "local")
    encoder = load_registry().create("efficientnet-lite0").ensure_loaded()
    pixels = np.stack([imgs.to_pixels(imgs.read_bytes(row[1]), encoder.preprocessing)[0] for row in rows])
    swapped = l2_normalize(encoder.embed_pixels(pixels[..., ::-1].copy()))
    assert np.sum(vectors * swapped, axis=1).min() < 0.99
    # Running it again sends out only the file that failed, and says so once.
    again = imgsearch("index", photos, "--index", tmp_path / "remote", "--ray", address, env=env)
    assert again.returncode == 0 and "added 0," in again.stdout and "unchanged 51," in again.stdout
    assert "skipped 1 " in again.stdout and "warn" not in again.stderr.lower(), again.stderr


def test_ray_fills_a_milvus_backed_index_as_a_local_run_does(cluster, photos, tmp_path):
    # The workers only embed; the driver alone writes, here into Milvus Lite.
    address, env = cluster
    remote = imgsearch("index", photos, "--index", tmp_path / "remote", "--encoder", "paced-color",
                       "--backend", "milvus", "--milvus-uri", tmp_path / "vectors.db", "--ray", address, env=env)
    assert remote.returncode == 0, remote.stderr
    local = imgsearch("index", photos, "--index", tmp_path / "local", "--encoder", "paced-color")
    assert local.returncode == 0, local.stderr
    assert_same_index(tmp_path / "local", tmp_path / "remote")
    verified = imgsearch("verify", "--index", tmp_path / "remote")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_an_int8_index_is_embedded_with_the_drivers_calibrated_model(cluster, photos, tmp_path, _session_cache):
    """Workers must not calibrate their own int8 model (other images, other
    vectors): they install the one the driver calibrated for the index."""
    address, env = cluster
    # A picture of this test's own makes a calibration no cache holds yet.
    noise = np.random.default_rng(15).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photos / "church" / "noise.png")
    driver = {**env, "IMGSEARCH_CACHE_DIR": str(tmp_path / "driver-cache")}  # not the nodes' cache
    # efficientnet-lite0 itself does not offer int8 (its neighbours move too
    # much); the test plugin offers every precision.
    int8 = ("--encoder", "lite0-any-precision", "--precision", "int8")
    local = imgsearch("index", photos, "--index", tmp_path / "local", *int8, env=driver, plugins=TEST_PLUGINS)
    assert local.returncode == 0, local.stderr
    calibrated = list((tmp_path / "driver-cache" / "openvino").glob("lite0-any-precision-int8-*"))
    assert len(calibrated) == 1
    assert not (_session_cache / "openvino" / calibrated[0].name).exists()
    remote = imgsearch("index", photos, "--index", tmp_path / "remote", *int8, "--ray", address, env=driver,
                       plugins=TEST_PLUGINS)
    assert remote.returncode == 0, remote.stderr
    installed = _session_cache / "openvino" / calibrated[0].name
    assert sorted(p.name for p in installed.iterdir()) == sorted(p.name for p in calibrated[0].iterdir())
    assert all((installed / p.name).read_bytes() == p.read_bytes() for p in calibrated[0].iterdir())
    assert_same_index(tmp_path / "local", tmp_path / "remote")
    # Negative control: fp32 vectors of the same photos are not within the
    # check's reach of the int8 ones.
    fp32 = imgsearch("index", photos, "--index", tmp_path / "fp32", "--encoder", "lite0-any-precision", env=driver,
                     plugins=TEST_PLUGINS)
    assert fp32.returncode == 0, fp32.stderr
    with pytest.raises(AssertionError):
        assert_same_index(tmp_path / "local", tmp_path / "fp32")


def _many_photos(root: Path, count: int) -> Path:
    rng = np.random.default_rng(7)
    for number in range(count):
        folder = root / ("red" if number % 2 else "blue")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{number:04d}.png")
    return root


def _committed(index: Path) -> int:
    """Images in the index's last commit (0 while it has none)."""
    import sqlite3

    time.sleep(0.05)
    try:
        with sqlite3.connect(f"file:{index / 'metadata.sqlite'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_killed_driver_loses_only_the_uncommitted_step(cluster, tmp_path):
    address, env = cluster
    photos = _many_photos(tmp_path / "many", 240)
    index = tmp_path / "ix"
    # 30 batches at 0.15 s on the nodes: the run takes seconds, commits often.
    run = imgsearch("index", photos, "--index", index, "--encoder", "paced-color", "--commit-every", "16",
                    "--ray", address, env=env, wait=False)
    assert kill_when(run, lambda: _committed(index) >= 16), \
        "the run ended before its first commit: nothing was tested"
    rows, _, _ = contents(index)
    assert 0 < len(rows) < 240
    resumed = imgsearch("index", photos, "--index", index, "--ray", address, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"unchanged {len(rows)}," in resumed.stdout
    verified = imgsearch("verify", "--index", index, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    local = imgsearch("index", photos, "--index", tmp_path / "local", "--encoder", "paced-color")
    assert local.returncode == 0, local.stderr
    assert_same_index(tmp_path / "local", index)


def test_a_lost_node_ends_the_run_and_the_next_run_completes(tmp_path, _session_cache):
    photos = _many_photos(tmp_path / "many", 320)
    index = tmp_path / "ix"
    # 40 batches at 0.5 s, two at a time: the run takes 10 s and more.
    with TwoNodes(tmp_path, _session_cache, pace_s=0.5) as nodes:
        run = imgsearch("index", photos, "--index", index, "--encoder", "paced-color", "--commit-every", "16",
                        "--ray", nodes.address, env=nodes.env, wait=False)
        wait_for(lambda: _committed(index) >= 16 or run.poll() is not None, "a first commit")
        assert run.poll() is None, "the run ended before its first commit: nothing was tested"
        nodes.lose_second_node()
        assert run.poll() is None, "the run ended before the node was gone: nothing was tested"
        try:
            out, err = run.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            run.kill()
            pytest.fail("the run hung after losing a node")
        # Actors are not restarted: the run ends, keeping what came back.
        assert run.returncode == 1, out
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert "a Ray worker or node was lost" in errors[0], errors[0]
        assert "run the same command again to resume" in errors[0], errors[0]
        committed = _committed(index)
        assert committed >= 16
        # The head may still list the lost node (it notices by missed
        # heartbeats): the run goes on with the nodes that answer.
        resumed = imgsearch("index", photos, "--index", index, "--ray", nodes.address, env=nodes.env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"unchanged {committed}," in resumed.stdout and f"added {320 - committed}," in resumed.stdout
    verified = imgsearch("verify", "--index", index)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_local_cluster_started_for_the_run(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    remote = imgsearch("index", SAMPLE_DATA / "labelled", "--index", tmp_path / "remote", "--encoder",
                       "paced-color", "--ray", "local", env=env)
    assert remote.returncode == 0, remote.stderr
    local = imgsearch("index", SAMPLE_DATA / "labelled", "--index", tmp_path / "local", "--encoder",
                      "paced-color")
    assert_same_index(tmp_path / "local", tmp_path / "remote")
    assert local.returncode == 0


def test_auto_starts_a_local_cluster_when_the_recorded_one_is_gone(tmp_path):
    """'ray start' records its cluster's address on the machine; once that
    cluster has died, Ray itself would wait minutes on it."""
    import tempfile

    # A short folder: Ray's socket paths under it must stay short.
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmp)}
        result = imgsearch("index", SAMPLE_DATA / "labelled", "--index", tmp_path / "ix", "--encoder",
                           "paced-color", "--ray", env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "added 50," in result.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_plugin_missing_on_the_nodes_is_named(cluster, tmp_path):
    address, env = cluster
    result = imgsearch("index", SAMPLE_DATA / "labelled", "--index", tmp_path / "ix", "--encoder",
                       "driver-only", "--ray", address, env={**env, "IMGSEARCH_TEST_DRIVER_ONLY": "1"})
    error = one_line_error(result)
    assert error.startswith("Error: Ray node ") and " cannot run the encoder: " in error
    assert "encoder 'driver-only' is not installed there" in error
    assert not (tmp_path / "ix").exists()  # nothing was committed, so no index is left


def test_more_gpus_than_the_cluster_has(cluster, tmp_path):
    address, env = cluster
    error = one_line_error(imgsearch("index", SAMPLE_DATA / "labelled", "--index", tmp_path / "ix",
                                     "--encoder", "paced-color", "--ray", address, "--ray-gpus", "1", env=env))
    assert "the Ray cluster has 0 GPUs, fewer than --ray-gpus 1" in error


def test_a_cluster_that_refuses_the_driver(cluster, tmp_path):
    address, env = cluster
    outsider = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    outsider["RAY_AUTH_MODE"] = "disabled"
    error = one_line_error(imgsearch("index", SAMPLE_DATA / "labelled", "--index", tmp_path / "ix",
                                     "--encoder", "paced-color", "--ray", address, env=outsider))
    assert "cannot connect to the Ray cluster" in error and "RAY_AUTH_TOKEN" in error


def test_no_cluster_at_the_address(tmp_path):
    started = time.monotonic()
    error = one_line_error(imgsearch("index", SAMPLE_DATA / "labelled", "--index", tmp_path / "ix",
                                     "--encoder", "paced-color", "--ray", f"127.0.0.1:{free_port()}"))
    assert "cannot reach the Ray cluster at 127.0.0.1:" in error
    assert time.monotonic() - started < 60  # not Ray's own minutes of retrying
    assert not (tmp_path / "ix").exists()


def test_nothing_to_embed_joins_no_cluster(tmp_path):
    assert imgsearch("index", SAMPLE_DATA / "labelled", "--index", tmp_path / "ix", "--encoder",
                     "paced-color").returncode == 0
    again = imgsearch("index", SAMPLE_DATA / "labelled", "--index", tmp_path / "ix", "--ray",
                      f"127.0.0.1:{free_port()}")  # nothing listens there
    assert again.returncode == 0 and "unchanged 50," in again.stdout, again.stderr


def test_gpus_without_ray_is_a_usage_error(tmp_path):
    result = imgsearch("index", SAMPLE_DATA / "labelled", "--index", tmp_path / "ix", "--ray-gpus", "1")
    assert result.returncode == 2 and "--ray-gpus needs --ray" in result.stderr


# -- what each node checks before work is sent (no cluster needed) -----------

def _spec(**changes):
    from dataclasses import asdict, replace

    from imgsearch import __version__, load_registry
    from imgsearch.cluster import spec_for
    from imgsearch.runtime import RuntimeOptions

    encoder = load_registry(RAY_PLUGINS).create("paced-color")
    encoder.use_runtime(RuntimeOptions()).ensure_loaded()
    spec = spec_for(encoder, plugins_dir=RAY_PLUGINS, max_megapixels=100, formats=("PNG",), batch_size=8)
    assert spec.version == __version__ and spec.ran_as == "fp32"
    return asdict(replace(spec, **changes))


def test_precisions_behind_runtime_names():
    from imgsearch.runtime import effective_precision

    assert [effective_precision(name) for name in ("openvino-bf16", "openvino-int8", "openvino-fp32", "keras",
                                                     "native")] == ["bf16", "int8", "fp32", "fp32", "fp32"]


def test_a_node_that_can_run_the_encoder_says_so():
    from imgsearch.cluster import _probe

    assert _probe(_spec()) is None


@pytest.mark.parametrize("changes, problem", [
    ({"version": "0.0.1"}, "imgsearch 0.1.0 is installed there, 0.0.1 here"),
    ({"plugins_dir": "/nonexistent/plugins"}, "the plugins folder /nonexistent/plugins is not there"),
    ({"encoder": "nope"}, "encoder 'nope' is not installed there"),
    ({"fingerprint": "other"}, "its paced-color weights differ from this machine's"),
    ({"encoder": "resnet50", "weights": "/nonexistent/w.h5", "plugins_dir": None},
     "the resnet50 weights are not there"),
])
def test_a_node_that_cannot_names_the_problem(changes, problem):
    from imgsearch.cluster import _probe

    assert problem in _probe(_spec(**changes))
