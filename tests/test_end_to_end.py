"""The whole path with a real pretrained encoder on the real sample photos."""

import json
import os
import subprocess
import sys

import pytest

from imgsearch import Index

from conftest import SAMPLE_DATA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def effnet_index(tmp_path_factory):
    target = tmp_path_factory.mktemp("e2e") / "ix"
    with Index.build(target, encoder="efficientnet-lite0") as index:
        report = index.add([SAMPLE_DATA / "labelled"], batch_size=16)
    assert (report.added, report.skipped, report.duplicates) == (50, [], [])
    return target


def test_leave_one_out_knn_accuracy_on_sample_data(effnet_index):
    photos = sorted((SAMPLE_DATA / "labelled").glob("*/*.jpg"))
    with Index.open(effnet_index) as index:
        # Each labelled photo is classified by the other 49: the index drops
        # the photo itself from its own neighbours.
        results = index.classify(photos, k=10)
    assert all(str(photo) not in [h.entry.path for h in r.neighbours] for photo, r in zip(photos, results))
    correct = sum(r.label == photo.parent.name for photo, r in zip(photos, results))
    assert correct / len(photos) >= 0.9, f"leave-one-out accuracy {correct}/{len(photos)}"


def test_query_photos_find_their_own_class(effnet_index):
    queries = sorted((SAMPLE_DATA / "queries").glob("*.jpg"))
    with Index.open(effnet_index) as index:
        results = index.query(queries, k=5)
        labels = index.classify(queries)
    for query, result, decision in zip(queries, results, labels):
        assert result.hits[0].entry.label == query.stem
        assert decision.label == query.stem


def test_vectors_are_unit_length_and_match_a_fresh_embedding(effnet_index):
    import numpy as np

    with Index.open(effnet_index) as index:
        entries = index.store.entries()[:5]
        stored = index.store.vectors([e.id for e in entries])
        fresh, _ = index.embed_files([e.path for e in entries])
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(stored, fresh, atol=1e-5)


def test_another_encoder_or_other_weights_are_refused(effnet_index, tmp_path):
    from imgsearch.errors import IndexMismatchError

    with Index.open(effnet_index, encoder="resnet50") as index, pytest.raises(IndexMismatchError, match="not 'resnet50'"):
        index.query([SAMPLE_DATA / "queries" / "tench.jpg"])
    with Index.open(effnet_index, weights="none") as index, pytest.raises(IndexMismatchError, match="other efficientnet-lite0 weights"):
        index.query([SAMPLE_DATA / "queries" / "tench.jpg"])


def test_random_weights_warn_in_every_command(tmp_path):
    env = dict(os.environ, IMGSEARCH_INDEX=str(tmp_path / "ix"))
    query = str(SAMPLE_DATA / "queries" / "tench.jpg")
    root = tmp_path / "photos"
    for name in ("tench", "church"):
        (root / name).mkdir(parents=True)
        for photo in sorted((SAMPLE_DATA / "labelled" / name).glob("*.jpg"))[:2]:
            (root / name / photo.name).symlink_to(photo)
    warning = "built with random weights (--weights none); its results are meaningless"
    for args in (["index", root, "--encoder", "resnet50", "--weights", "none"],
                 ["query", query, "-k", "2"], ["classify", query, "-k", "2"], ["info", "--format", "json"]):
        done = subprocess.run([sys.executable, "-m", "imgsearch", *map(str, args)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert warning in done.stderr
    assert json.loads(done.stdout)["random_weights"] is True
