"""optimize and the approximate index types, end to end: recall against a
flat reference on real embeddings, the CLI, automatic merges, kills during
a merge, and the conversion of a format 1 index."""

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_DATA, kill_when, run, sqlite_writing, store_of
from imgsearch.encoders import l2_normalize
from imgsearch.errors import BadIndexError
from imgsearch.store import Changes, Store, optimize

V1_INDEX = Path(__file__).resolve().parent / "data" / "index-v1"


def _recall(found_ids, expected_ids) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found_ids, expected_ids)]))


def _clustered(n, dim, centres, seed):
    """Unit vectors around random centres, like embeddings of many classes."""
    rng = np.random.default_rng(seed)
    middle = l2_normalize(rng.standard_normal((centres, dim)))
    return l2_normalize(middle[rng.integers(0, centres, n)] + 0.6 / np.sqrt(dim) * rng.standard_normal((n, dim)) * 2)


@pytest.mark.parametrize("kind", ["ivf-sq8", "ivf-pq", "hnsw"])
def test_recall_against_a_flat_reference_on_clustered_vectors(tmp_path, kind):
    data = _clustered(12_000, 96, centres=300, seed=1)
    rng = np.random.default_rng(2)
    queries = l2_normalize(data[rng.integers(0, len(data), 200)] + 0.05 * rng.standard_normal((200, 96)))
    store = store_of(tmp_path / "ix", data, per_commit=3000)
    report = optimize(store, index_type=kind, target_recall=0.95)
    assert report.recall_at_10 >= 0.95 and store.manifest["ann"]["type"] == kind
    expected = np.argsort(-(queries @ data.T), axis=1)[:, :10] + 1  # ids start at 1
    found = [[h.entry.id for h in row] for row in store.search(queries, 10)]
    # Measured on fresh queries, not the held-back vectors it was tuned on.
    assert _recall(found, expected) >= 0.9
    # Scores are exact cosine similarities, re-ranked from the stored vectors.
    for row, hits in zip(queries, store.search(queries[:5], 10)):
        np.testing.assert_allclose([h.score for h in hits], data[[h.entry.id - 1 for h in hits]] @ row, rtol=1e-5)


@pytest.mark.slow
def test_recall_on_real_embeddings_of_the_sample_photos(tmp_path):
    """efficientnet-lite0 (ImageNet weights from its pip package) on crops and
    flips of sample_data/: every type against exact search."""
    from PIL import Image

    from imgsearch.encoders import load_registry
    from imgsearch.runtime import RuntimeOptions

    encoder = load_registry().create("efficientnet-lite0", None).use_runtime(RuntimeOptions("keras")).ensure_loaded()
    photos = sorted((SAMPLE_DATA / "labelled").rglob("*.jpg"))
    size = encoder.preprocessing.input_size

    def views(image, boxes, flip):
        out = []
        for box in boxes:
            view = image.crop(box).resize((size, size))
            out.append(np.asarray(view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else view))
        return out

    index_pixels, query_pixels = [], []
    for path in photos:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        boxes = [(0, 0, w, h), (0, 0, w * 3 // 4, h * 3 // 4), (w // 4, h // 4, w, h),
                 (0, h // 4, w * 3 // 4, h), (w // 4, 0, w, h * 3 // 4)]
        index_pixels += views(image, boxes, False) + views(image, boxes[:3], True)
        query_pixels += views(image, [(w // 8, h // 8, w * 7 // 8, h * 7 // 8)], True)

    def embed(pixels):
        batches = [encoder.embed_pixels(encoder.preprocessing.normalize(np.stack(pixels[i:i + 32])))
                   for i in range(0, len(pixels), 32)]
        return l2_normalize(np.concatenate(batches))

    data, queries = embed(index_pixels), embed(query_pixels)
    expected = np.argsort(-(queries @ data.T), axis=1)[:, :10] + 1
    for kind in ("flat", "ivf-sq8", "ivf-pq", "hnsw"):
        store = store_of(tmp_path / kind, data, per_commit=100)
        report = optimize(store, index_type=kind, target_recall=0.95)
        found = [[h.entry.id for h in row] for row in store.search(queries, 10)]
        recall = _recall(found, expected)
        print(f"{kind}: recall@10 {recall:.3f} on {len(queries)} queries, tuned {report.recall_at_10}")
        assert recall >= (1.0 if kind == "flat" else 0.9), kind


def test_optimize_and_info_through_the_cli(index_dir):
    before = json.loads(run("info", "--index", index_dir, "--format", "json").stdout)
    assert before["segments"] == 1 and before["index_type"].startswith("none yet")
    query = SAMPLE_DATA / "queries" / "tench.jpg"
    exact = run("query", query, "--index", index_dir, "--format", "json").stdout
    out = run("optimize", "--index", index_dir, "--index-type", "ivf-sq8", "--target-recall", "0.99").stdout
    assert out.startswith("optimized: 50 vectors from 1 segment, 0 removed") and "index type ivf-sq8" in out
    facts = json.loads(run("info", "--index", index_dir, "--format", "json").stdout)
    assert facts["index_type"] == "ivf-sq8" and facts["recall_at_10"] >= 0.99 and facts["segments"] == 1
    assert facts["search_params"]["name"] == "nprobe" and facts["memory_bytes"] > 0
    # 50 vectors, nprobe tuned to 0.99: the same answer as the exact search.
    assert run("query", query, "--index", index_dir, "--format", "json").stdout == exact
    assert run("optimize", "--index", index_dir).stdout.startswith("nothing to do")
    # A merge changes no image, label or vector: a trained classifier stays valid.
    run("train-classifier", "--index", index_dir)
    linear = ["classify", query, "--index", index_dir, "--method", "linear", "--format", "json"]
    before = json.loads(run(*linear).stdout)
    run("optimize", "--index", index_dir, "--force")
    assert json.loads(run(*linear).stdout) == before
    table = run("info", "--index", index_dir).stdout
    assert "index_type:          ivf-sq8" in table and "recall_at_10:" in table
    assert run("verify", "--index", index_dir).stdout.startswith("ok: 50 images")
    err = run("optimize", "--index", index_dir, "--max-memory", "lots", code=2).stderr
    assert "not a size" in err


def test_index_merges_small_segments_as_it_goes(tmp_path):
    from imgsearch.store import merge

    index_dir = tmp_path / "ix"
    for extra in ([], ["--no-optimize"]):  # small segments are merged either way
        shutil.rmtree(index_dir, ignore_errors=True)
        result = run("index", SAMPLE_DATA / "labelled", "--index", index_dir, "--encoder", "tiny-color",
                     "--commit-every", "1", "--batch-size", "1", *extra)
        assert "optimizing" not in result.stderr  # 50 images: nothing to build
        with Store.open(index_dir) as store:
            assert store.count == 50 and len(store.segments) < merge.TIER_FACTOR
            assert store.manifest["ann"] is None and store.verify() == ([], [])


def test_a_format_1_index_converts_and_keeps_everything(tmp_path):
    import faiss

    index_dir = tmp_path / "old"
    shutil.copytree(V1_INDEX, index_dir)
    old = faiss.read_index(str(next(index_dir.glob("vectors-*.faiss"))))
    old_ids = faiss.vector_to_array(old.id_map)
    old_vectors = old.index.reconstruct_n(0, old.ntotal)
    with sqlite3.connect(index_dir / "metadata.sqlite") as db:
        rows = db.execute("SELECT id, path, sha256, label FROM images ORDER BY id").fetchall()
        aliases = db.execute("SELECT * FROM aliases").fetchall()
    for args in (["info"], ["query", SAMPLE_DATA / "queries" / "tench.jpg"]):
        err = run(*args, "--index", index_dir, code=1).stderr
        assert "has format version 1" in err and f"imgsearch optimize --index {index_dir}" in err
    out = run("optimize", "--index", index_dir).stdout
    assert out.startswith("optimized: 10 vectors")
    assert not list(index_dir.glob("vectors-*"))
    with Store.open(index_dir) as store:
        assert store.manifest["format_version"] == 2 and store.count == 10
        assert [(e.id, e.path, e.sha256, e.label) for e in store.entries()] == rows
        assert [tuple(a.__dict__.values()) for a in store.aliases()] == aliases
        np.testing.assert_array_equal(store.vectors(old_ids), old_vectors)
        assert store.verify(check_files=False) == ([], [])
        hits = store.search(old_vectors[:1], 1)[0]
        assert hits[0].entry.id == old_ids[0] and hits[0].score == pytest.approx(1.0)


def test_a_damaged_format_1_index_is_refused_and_left_alone(tmp_path):
    index_dir = tmp_path / "old"
    shutil.copytree(V1_INDEX, index_dir)
    vectors = next(index_dir.glob("vectors-*.faiss"))
    data = bytearray(vectors.read_bytes())
    data[-3] ^= 0xFF
    vectors.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in index_dir.iterdir()}
    err = run("optimize", "--index", index_dir, code=1).stderr
    assert "does not match the checksum" in err and "cannot be converted" in err
    after = {p.name: p.read_bytes() for p in index_dir.iterdir() if p.name != "write.lock"}
    assert after == before


def test_a_damaged_segment_is_never_merged(tmp_path, monkeypatch):
    from imgsearch.store import store as store_module

    # As in a large index: opening checks sizes and headers, not checksums.
    monkeypatch.setattr(store_module, "FULL_CHECK_ON_OPEN_BYTES", 0)
    rng = np.random.default_rng(4)
    store = store_of(tmp_path / "ix", l2_normalize(rng.standard_normal((40, 16))), per_commit=10)
    segment = store.segments[1].path
    store.close()
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0x01
    segment.write_bytes(bytes(data))
    before = sorted(p.name for p in (tmp_path / "ix").iterdir())
    with pytest.raises(BadIndexError, match="seg-000002.vec does not match the checksum.*nothing was merged"):
        with Store.open(tmp_path / "ix", writable=True) as writer:
            assert "seg-000002.vec does not match" in writer.verify(check_files=False)[0][0]
            optimize(writer)
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == before


# -- kills during optimize -----------------------------------------------------

@pytest.fixture(scope="module")
def unmerged_index(tmp_path_factory):
    """60,000 vectors of 128-d in 30 segments, with tombstones: a merge and an
    ivf-sq8 build take long enough to be killed in every phase."""
    root = tmp_path_factory.mktemp("unmerged")
    data = _clustered(60_000, 128, centres=500, seed=5)
    store = store_of(root / "ix", data, per_commit=2000)
    store.commit(Changes(removed=list(range(1, 60_001, 97))))
    store.close()
    return root / "ix"


@pytest.mark.slow
def test_sigkill_during_optimize_loses_nothing(unmerged_index, tmp_path):
    queries = _clustered(20, 128, centres=500, seed=6)
    with Store.open(unmerged_index) as store:
        ids_before = sorted(e.id for e in store.entries())
        expected = [[h.entry.id for h in row] for row in store.search(queries, 10)]
    index_dir = tmp_path / "ix"

    def exists(pattern):
        return lambda: any(index_dir.glob(pattern))

    plans = [exists("seg-*.vec.tmp"), exists("ann-*.tmp"), exists("ann-*.faiss"),
             sqlite_writing(index_dir)]
    kills = 0
    for plan in plans:
        shutil.rmtree(index_dir, ignore_errors=True)
        shutil.copytree(unmerged_index, index_dir)
        process = subprocess.Popen([sys.executable, "-m", "imgsearch", "optimize", "--index", str(index_dir),
                                    "--index-type", "ivf-sq8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        kills += kill_when(process, plan)
        with Store.open(index_dir) as store:  # the old state or the new one, whole
            assert sorted(e.id for e in store.entries()) == ids_before
            assert store.verify(check_files=False)[0] == []
            found = [[h.entry.id for h in row] for row in store.search(queries, 10)]
            assert _recall(found, expected) >= (1.0 if len(store.segments) > 1 else 0.9)
        done = subprocess.run([sys.executable, "-m", "imgsearch", "optimize", "--index", str(index_dir),
                               "--index-type", "ivf-sq8"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        with Store.open(index_dir) as store:
            assert len(store.segments) == 1 and store.tombstones == 0
            assert sorted(e.id for e in store.entries()) == ids_before
            assert sorted(p.name for p in index_dir.glob("*-0*")) == [
                store.manifest["ann"]["file"], store.segments[0].info.file]
    assert kills >= 3, kills


@pytest.mark.slow
def test_ctrl_c_during_optimize_leaves_the_index_unchanged(unmerged_index, tmp_path):
    index_dir = tmp_path / "ix"
    shutil.copytree(unmerged_index, index_dir)
    before = sorted(p.name for p in index_dir.iterdir())
    process = subprocess.Popen([sys.executable, "-m", "imgsearch", "optimize", "--index", str(index_dir),
                                "--index-type", "ivf-sq8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    end = time.monotonic() + 60
    while not any(index_dir.glob("seg-*.tmp")) and process.poll() is None and time.monotonic() < end:
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "is unchanged" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in index_dir.iterdir()) == before
