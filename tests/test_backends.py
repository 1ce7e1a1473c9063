"""Every command on every vector backend: the local store (faiss), Milvus
Lite, and a real Milvus standalone server started here on loopback.

The backend-independent behaviour is one set of tests parametrized over the
three; Milvus-only behaviour (repair, interrupted commits, the collection
checks, recall at 100,000 vectors) follows.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import PLUGINS_DIR, SAMPLE_DATA, run

pytestmark = pytest.mark.slow

QUERY = str(SAMPLE_DATA / "queries" / "church.jpg")
SERVER_START_TIMEOUT = 120
SERVER_PORTS = ("etcd-port", "root-coord-port", "proxy-port", "proxy-internal-port", "query-coord-port",
                "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port")
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A Milvus standalone server (PyPI ``milvus``) on loopback, with its own
    ports and a temporary data folder, stopped at the end of the session."""
    pytest.importorskip("pymilvus")
    exe = shutil.which("milvus-server", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.fail("milvus-server is not installed (pip install 'imgsearch[milvus]')")
    data = tmp_path_factory.mktemp("milvus")
    ports = {name: _free_port() for name in SERVER_PORTS}
    # Its embedded etcd listens on 2379 and 2380 unless told otherwise (a
    # second server on the machine would fail): a config file of its own.
    client, peer = ports["etcd-port"], _free_port()
    etcd = data / "embedded-etcd.yaml"
    etcd.write_text(f"listen-client-urls: http://127.0.0.1:{client}\n"
                    f"advertise-client-urls: http://127.0.0.1:{client}\n"
                    f"listen-peer-urls: http://127.0.0.1:{peer}\n"
                    f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
                    f"initial-cluster: default=http://127.0.0.1:{peer}\n")
    command = [exe, "--data", str(data)]
    for name, port in ports.items():
        command += [f"--{name}", str(port)]
    for component in COMPONENTS:  # not the first network address: loopback only
        command += ["--extra-config", f"{component}.ip=127.0.0.1"]
    log = open(data / "server.log", "w")
    # Its own process group: the wrapper starts the milvus binary as a child,
    # and both must go however the session ends.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, env=dict(os.environ, ETCD_CONFIG_PATH=str(etcd)))
    uri = f"http://127.0.0.1:{ports['proxy-port']}"
    try:
        _wait_until_serving(process, uri, data / "server.log")
        yield uri
    finally:
        _stop(process)
        log.close()


def _wait_until_serving(process, uri, log_path):
    from pymilvus import MilvusClient

    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        # The wrapper keeps running when the server it started has failed.
        said = log_path.read_text()
        if process.poll() is not None or "already stopped" in said or "timeout" in said:
            _stop(process)
            server_log = log_path.parent / "logs" / "milvus-stdout.log"
            errors = [line for line in server_log.read_text().splitlines() if "[ERROR]" in line][:3] \
                if server_log.exists() else []
            pytest.fail(f"milvus-server failed to start: {said[-500:]} {' '.join(errors)[:1500]}")
        try:
            client = MilvusClient(uri=uri, timeout=2)
            client.list_collections()
            client.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                _stop(process)
                pytest.fail(f"milvus-server did not answer within {SERVER_START_TIMEOUT} s")
            time.sleep(0.5)


def _stop(process):
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            # The wrapper may be gone while its milvus child still runs.
            os.killpg(process.pid, 0)
        except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
            if process.poll() is not None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return


_collections = iter(range(1, 1_000_000))


@pytest.fixture(params=["faiss", "milvus-lite", "milvus-standalone"])
def backend(request, tmp_path):
    """The index options for a new index on each backend (each test its own
    collection)."""
    if request.param == "faiss":
        return []
    pytest.importorskip("pymilvus")
    if request.param == "milvus-lite":
        return ["--backend", "milvus", "--milvus-uri", tmp_path / "vectors.db"]
    uri = request.getfixturevalue("milvus_server")
    return ["--backend", "milvus", "--milvus-uri", uri,
            "--milvus-collection", f"t{os.getpid()}_{next(_collections)}"]


def _index(target, folder, backend, *extra):
    return run("index", folder, "--index", target, "--encoder", "tiny-color", *backend, *extra)


def _stored(target):
    """Every row's id with its stored vector, as the backend returns them."""
    from imgsearch.store import Store

    with Store.open(target) as store:
        entries = store.entries()
        return entries, store.vectors([e.id for e in entries])


def test_index_query_classify_and_info(backend, tmp_path, labelled_copy):
    target = tmp_path / "ix"
    first = _index(target, labelled_copy, backend)
    assert first.stdout.startswith("added 50, updated 0, moved 0, unchanged 0, duplicates 0, skipped 0 ")
    assert _index(target, labelled_copy, []).stdout.startswith("added 0, updated 0, moved 0, unchanged 50,")

    entries, vectors = _stored(target)
    assert len(entries) == 50 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    # The answer equals exact search over the stored vectors.
    from imgsearch.index import Index

    with Index.open(target, plugins_dir=PLUGINS_DIR) as index:
        query_vector, _ = index.embed_files([QUERY])
    scores = vectors @ query_vector[0]
    expected = [entries[i].path for i in np.argsort(-scores, kind="stable")[:5]]
    lines = run("query", QUERY, "--index", target, "-k", "5", "--format", "json").stdout.splitlines()
    neighbours = json.loads(lines[0])["results"]
    assert [n["path"] for n in neighbours] == expected
    assert [n["score"] for n in neighbours] == pytest.approx(sorted(scores, reverse=True)[:5], abs=1e-4)

    classified = json.loads(run("classify", QUERY, "--index", target, "--format", "json").stdout)
    assert classified["label"] in {"church", "english_springer", "garbage_truck", "parachute", "tench"}

    # The local store builds its index when optimized; Milvus had its own at the first run.
    optimized = run("optimize", "--index", target).stdout
    assert "flat" in optimized
    info = json.loads(run("info", "--index", target, "--format", "json").stdout)
    assert info["count"] == 50 and info["index_type"] == "flat" and info["recall_at_10"] == 1.0
    assert info["backend"] == ("milvus" if backend else "faiss")
    if backend:
        assert info["backend_collection"] and info["backend_uri"]
        table = run("info", "--index", target).stdout
        assert "backend:             milvus" in table and "index_type:          flat" in table
    assert run("verify", "--index", target).stdout.startswith("ok: 50 images")


def test_changes_moves_removals_and_prune(backend, tmp_path, labelled_copy):
    from PIL import Image

    target = tmp_path / "ix"
    _index(target, labelled_copy, backend)
    church = sorted((labelled_copy / "church").iterdir())
    with Image.open(church[0]) as image:                                   # changed content
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(church[0], "JPEG")
    os.rename(church[1], labelled_copy / "church" / "moved.jpg")            # a move
    result = _index(target, labelled_copy, [])
    assert result.stdout.startswith("added 0, updated 1, moved 1, unchanged 48,")

    run("remove", church[2], "--index", target)                            # a removal
    shutil.move(church[2], tmp_path / "kept-elsewhere.jpg")                # (not indexed again)
    os.remove(church[3])                                                   # gone from disk: pruned
    pruned = _index(target, labelled_copy, [], "--prune").stdout
    assert "pruned 1 image and 0 identical copies" in pruned
    entries, vectors = _stored(target)
    assert len(entries) == 48 and len(vectors) == 48
    assert run("verify", "--index", target).stdout.startswith("ok: 48 images")

    # The changed image's stored vector is that of its new content.
    from imgsearch.index import Index

    with Index.open(target, plugins_dir=PLUGINS_DIR) as index:
        fresh, _ = index.embed_files([church[0]])
    stored = vectors[[e.path for e in entries].index(str(church[0]))]
    assert np.allclose(stored, fresh[0], atol=1e-5)


def test_evaluate_and_train_classifier(backend, tmp_path):
    target = tmp_path / "ix"
    _index(target, SAMPLE_DATA / "labelled", backend)
    record = json.loads(run("evaluate", "--index", target, "--leave-one-out", "-k", "3",
                            "--format", "json").stdout)
    assert record["n"] == 50 and 0 <= record["top1"] <= 1
    # The same on the local store: the vectors, not the backend, decide.
    reference = tmp_path / "reference"
    _index(reference, SAMPLE_DATA / "labelled", [])
    expected = json.loads(run("evaluate", "--index", reference, "--leave-one-out", "-k", "3",
                              "--format", "json").stdout)
    assert record["top1"] == pytest.approx(expected["top1"])

    assert run("train-classifier", "--index", target).stdout.startswith("trained logreg on 5 labels")
    linear = json.loads(run("classify", QUERY, "--index", target, "--method", "linear", "--format", "json").stdout)
    assert 0 < linear["confidence"] <= 1


# -- Milvus only ------------------------------------------------------------------
@pytest.fixture(params=["milvus-lite", "milvus-standalone"])
def milvus(request, tmp_path):
    pytest.importorskip("pymilvus")
    if request.param == "milvus-lite":
        return str(tmp_path / "vectors.db"), f"c{next(_collections)}"
    return request.getfixturevalue("milvus_server"), f"t{os.getpid()}_{next(_collections)}"


def _client(uri):
    from pymilvus import MilvusClient

    return MilvusClient(uri=uri)


def test_verify_finds_and_repair_mends_missing_and_stray_vectors(milvus, tmp_path):
    uri, collection = milvus
    target = tmp_path / "ix"
    _index(target, SAMPLE_DATA / "labelled", ["--backend", "milvus", "--milvus-uri", uri,
                                               "--milvus-collection", collection])
    entries, vectors = _stored(target)
    gone, lost = entries[0], entries[1]
    run("remove", gone.path, "--index", target)
    client = _client(uri)
    client.load_collection(collection)
    client.delete(collection, ids=[lost.id])                             # a vector missing
    client.upsert(collection, [{"id": gone.id, "vector": vectors[0]}])   # one no image names
    client.close()

    out = run("verify", "--index", target, code=1).stdout
    assert f"1 images have no vector in Milvus collection {collection} (first id {lost.id})" in out
    assert f"1 vectors in Milvus collection {collection} belong to no image (first id {gone.id})" in out

    repaired = run("verify", "--index", target, "--repair").stdout
    assert "repaired: deleted 1 vectors that belong to no image" in repaired
    assert "repaired: forgot 1 images" in repaired
    assert repaired.splitlines()[-1].startswith("ok: 48 images")
    # The next index run embeds both files again.
    again = run("index", SAMPLE_DATA / "labelled", "--index", target).stdout
    assert again.startswith("added 2, updated 0, moved 0, unchanged 48,")
    assert run("verify", "--index", target).stdout.startswith("ok: 50 images")


def _milvus_count(uri, collection) -> int:
    client = _client(uri)
    client.load_collection(collection)
    try:
        return client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"]
    finally:
        client.close()


def test_an_interrupted_commit_is_mended_by_the_next_writer(milvus, tmp_path, monkeypatch):
    """Vectors upserted for a commit that never stood, and deletions a commit
    still owed, are both put right when the index is next opened to write."""
    import sqlite3

    import imgsearch_milvus
    from imgsearch.store import Changes, Entry, Store

    uri, collection = milvus
    target = tmp_path / "ix"
    _index(target, SAMPLE_DATA / "labelled", ["--backend", "milvus", "--milvus-uri", uri,
                                               "--milvus-collection", collection])
    # The metadata transaction fails right after the upsert (a crash there).
    real_stage = imgsearch_milvus.MilvusBackend.stage

    def stage_then_crash(self, staged, vectors):
        real_stage(self, staged, vectors)
        raise KeyboardInterrupt

    monkeypatch.setattr(imgsearch_milvus.MilvusBackend, "stage", stage_then_crash)
    monkeypatch.setattr(imgsearch_milvus.MilvusBackend, "abandon", lambda self, staged: None)
    with Store.open(target, writable=True) as store:
        entry = Entry(store.next_id, "/nowhere/new.jpg", "0" * 64, 1, 1.0, None, 1, 1)
        with pytest.raises(KeyboardInterrupt):
            store.commit(Changes(added=[entry], vectors=[np.eye(store.dim, dtype=np.float32)[0]]))
    monkeypatch.undo()
    assert _milvus_count(uri, collection) == 51
    with Store.open(target) as reader:  # a reader never sees the stray
        assert reader.count == 50 and all(h.entry.id != entry.id for h in reader.search(
            np.eye(reader.dim, dtype=np.float32)[:1], 50)[0])

    # A removal whose deletions never reach Milvus; it opens the index to
    # write, so it deletes the stray first.
    monkeypatch.setattr(imgsearch_milvus.MilvusBackend, "finish", lambda self, staged: None)
    run("remove", SAMPLE_DATA / "labelled" / "church", "--index", target)
    monkeypatch.undo()
    with sqlite3.connect(target / "metadata.sqlite") as db:
        assert db.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 10
    assert _milvus_count(uri, collection) == 50

    with Store.open(target, writable=True):  # the next writer
        pass
    assert _milvus_count(uri, collection) == 40
    assert run("verify", "--index", target).stdout.startswith("ok: 40 images")


def test_another_uri_for_an_existing_index_is_refused(tmp_path):
    pytest.importorskip("pymilvus")
    folder, target = SAMPLE_DATA / "labelled", tmp_path / "ix"
    uri = tmp_path / "vectors.db"
    _index(target, folder, ["--backend", "milvus", "--milvus-uri", uri])
    err = run("index", folder, "--index", target, "--backend", "milvus", "--milvus-uri", tmp_path / "other.db",
              code=2).stderr
    assert "keeps its vectors at uri" in err and not (tmp_path / "other.db").exists()
    # The same place, named relative to the working folder, is accepted.
    os.chdir(tmp_path)
    run("index", folder, "--index", target, "--backend", "milvus", "--milvus-uri", "vectors.db")


def test_bad_backend_settings_are_one_line_errors_and_leave_nothing(milvus, tmp_path):
    uri, collection = milvus
    target = tmp_path / "ix"
    folder = SAMPLE_DATA / "labelled"
    err = run("index", folder, "--index", target, "--encoder", "tiny-color", "--backend", "milvus", code=2).stderr
    assert "needs --milvus-uri" in err and not target.exists()
    err = run("index", folder, "--index", target, "--encoder", "tiny-color", "--backend", "qdrant", code=2).stderr
    assert "unknown backend 'qdrant'; registered backends: faiss, milvus" in err and not target.exists()
    err = run("index", folder, "--index", target, "--encoder", "tiny-color", "--backend", "milvus",
              "--milvus-uri", f"http://127.0.0.1:{_free_port()}", code=1).stderr
    assert "cannot reach Milvus at http://127.0.0.1:" in err and not target.exists()

    # A collection of other vectors, or of vectors already, is refused.
    from pymilvus import DataType, MilvusClient

    client = _client(uri)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
    client.create_collection(collection, schema=schema)
    client.close()
    err = run("index", folder, "--index", target, "--encoder", "tiny-color", "--backend", "milvus",
              "--milvus-uri", uri, "--milvus-collection", collection, code=2).stderr
    assert "holds 8-d vectors, not 48-d" in err and not target.exists()

    other = tmp_path / "other"
    _index(other, folder, ["--backend", "milvus", "--milvus-uri", uri, "--milvus-collection", collection + "b"])
    err = run("index", folder, "--index", target, "--encoder", "tiny-color", "--backend", "milvus",
              "--milvus-uri", uri, "--milvus-collection", collection + "b", code=2).stderr
    assert "already holds 50 vectors" in err and not target.exists()
    # An existing index keeps its backend; it is not damaged by asking for another.
    err = run("index", folder, "--index", other, "--backend", "faiss", code=2).stderr
    assert "keeps its vectors in milvus" in err
    assert run("verify", "--index", other).stdout.startswith("ok: 50 images")


def _clustered(rng, count: int, dim: int, clusters: int):
    """Unit vectors scattered around random centres, and the centres."""
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    data = centres[rng.integers(0, clusters, count)] + 0.6 * rng.normal(size=(count, dim)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True), centres


def test_recall_at_100000_vectors_on_a_milvus_server(milvus_server, tmp_path):
    """The automatic index type (ivf-sq8 at this size) tuned to the target
    recall reaches it against exact search, on queries not in the index."""
    from imgsearch.store import Changes, Entry, Store

    rng = np.random.default_rng(7)
    dim, count = 64, 100_000
    data, centres = _clustered(rng, count, dim, 200)
    store = Store.create(tmp_path / "ix", encoder={"name": "synthetic"}, dim=dim, backend="milvus",
                         backend_options={"uri": milvus_server, "collection": f"recall{os.getpid()}"})
    with store:
        for start in range(0, count, 20_000):
            ids = range(start + 1, min(start + 20_000, count) + 1)
            entries = [Entry(i, f"/synthetic/{i}.jpg", f"{i:064x}", 1, 1.0, None, 1, 1) for i in ids]
            store.commit(Changes(added=entries, vectors=list(data[start:start + len(entries)])))
        report = store.backend.optimize()
        assert report.index_type == "ivf-sq8" and report.recall_at_10 >= 0.95
        queries = centres[rng.integers(0, 200, 200)] + 0.6 * rng.normal(size=(200, dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        _, found = store.nearest(queries, 10)
        truth = np.argsort(-(queries @ data.T), axis=1)[:, :10] + 1
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])
        assert recall >= 0.95, recall
        assert store.manifest["ann"]["milvus_index"] == "IVF_SQ8"


@pytest.mark.parametrize("index_type, milvus_index", [("hnsw", "HNSW"), ("ivf-pq", "IVF_PQ")])
def test_hnsw_and_ivf_pq_on_a_milvus_server(milvus_server, tmp_path, index_type, milvus_index):
    """The index types asked for by name are built by the server, tuned, and
    searched to the target recall against exact search."""
    from imgsearch.store import Changes, Entry, Store

    rng = np.random.default_rng(11)
    dim, count = 64, 5_000
    data, _ = _clustered(rng, count, dim, 50)
    store = Store.create(tmp_path / "ix", encoder={"name": "synthetic"}, dim=dim, backend="milvus",
                         backend_options={"uri": milvus_server, "collection": f"{index_type.replace('-', '')}"
                                                                               f"{os.getpid()}"})
    with store:
        entries = [Entry(i, f"/synthetic/{i}.jpg", f"{i:064x}", 1, 1.0, None, 1, 1) for i in range(1, count + 1)]
        store.commit(Changes(added=entries, vectors=list(data)))
        report = store.backend.optimize(index_type=index_type)
        assert report.index_type == index_type and report.recall_at_10 >= 0.95
        assert store.manifest["ann"]["milvus_index"] == milvus_index
        queries = data[rng.integers(0, count, 100)] + 0.05 * rng.normal(size=(100, dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        _, found = store.nearest(queries, 10)
        truth = np.argsort(-(queries @ data.T), axis=1)[:, :10] + 1
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])
        assert recall >= 0.9, recall


def test_classify_and_evaluate_vote_among_labelled_images(backend, tmp_path, monkeypatch):
    """Unlabelled near-copies of the query are its nearest images, yet the
    k nearest labelled ones vote, found by the backend's own restricted
    search (Milvus: a filter, several expressions merged) and equal to
    exact search over the labelled vectors."""
    import imgsearch_milvus
    from test_partly_labelled import _near_copy

    from imgsearch.index import Index

    monkeypatch.setattr(imgsearch_milvus, "FILTER_IDS", 7)  # many filter expressions, merged
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(3):
        _near_copy(QUERY, loose / f"copy-{i}.png", i + 1)
    target = tmp_path / "ix"
    run("index", SAMPLE_DATA / "labelled", loose, "--index", target, "--encoder", "tiny-color", *backend)
    with Index.open(target, plugins_dir=PLUGINS_DIR) as index:
        entries, vectors = index.labelled_vectors()
        query = index.embed_files([QUERY])[0][0]
    scores = vectors @ query
    nearest = np.argsort(-scores, kind="stable")[:5]
    found = json.loads(run("classify", QUERY, "--index", target, "-k", "5", "--format", "json").stdout)
    assert [n["path"] for n in found["neighbors"]] == [entries[i].path for i in nearest]
    assert found["label"] is not None
    record = json.loads(run("evaluate", "--index", target, "--leave-one-out", "-k", "3", "--format", "json").stdout)
    reference = tmp_path / "reference"
    run("index", SAMPLE_DATA / "labelled", "--index", reference, "--encoder", "tiny-color")
    expected = json.loads(run("evaluate", "--index", reference, "--leave-one-out", "-k", "3",
                              "--format", "json").stdout)
    assert record["top1"] == pytest.approx(expected["top1"])
