"""classify and evaluate on an index where only some images carry a label:
the k nearest *labelled* images vote, in every evaluate mode, as brute-force
numpy over the labelled vectors says."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from imgsearch.evaluation import stratified_folds
from imgsearch.index import Index
from imgsearch.knn import vote

from conftest import PLUGINS_DIR, SAMPLE_DATA, run

QUERY = SAMPLE_DATA / "queries" / "tench.jpg"


def _near_copy(source, target, shift):
    """The same picture with one pixel changed: other bytes, nearly the same vector."""
    with Image.open(source) as image:
        pixels = np.asarray(image.convert("RGB")).copy()
    pixels[0, 0] = (pixels[0, 0].astype(int) + shift) % 256
    Image.fromarray(pixels).save(target)


@pytest.fixture
def partly_labelled(tmp_path):
    """sample_data/labelled (labelled by folder), plus unlabelled near-copies
    of the tench query and of one labelled photo of each class."""
    labelled = tmp_path / "labelled"
    shutil.copytree(SAMPLE_DATA / "labelled", labelled)
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(3):
        _near_copy(QUERY, loose / f"tench-copy-{i}.png", i + 1)
    for folder in sorted(labelled.iterdir()):
        _near_copy(sorted(folder.iterdir())[0], loose / f"{folder.name}-copy.png", 1)
    index = tmp_path / "ix"
    run("index", labelled, loose, "--index", index, "--encoder", "tiny-color")
    return index


def _labelled(index_dir):
    with Index.open(index_dir, plugins_dir=PLUGINS_DIR) as index:
        entries, vectors = index.labelled_vectors()
        assert index.store.count == len(entries) + 8  # the near-copies have no label
        query = index.embed_files([QUERY])[0]
    return entries, vectors, query


def test_classify_votes_among_the_nearest_labelled_images(partly_labelled):
    found = json.loads(run("classify", QUERY, "--index", partly_labelled, "-k", "3", "--vote", "majority",
                           "--format", "json").stdout)
    entries, vectors, query = _labelled(partly_labelled)
    scores = (vectors @ query[0])
    nearest = np.argsort(-scores)[:3]
    assert [n["path"] for n in found["neighbors"]] == [entries[i].path for i in nearest]
    assert [n["score"] for n in found["neighbors"]] == pytest.approx(scores[nearest].tolist(), abs=1e-5)
    expected = vote([(entries[i].label, scores[i]) for i in nearest], "majority")
    assert found["label"] == expected.label is not None
    assert found["confidence"] == pytest.approx(expected.confidence)
    # The near-copies are still the nearest images of all.
    hits = json.loads(run("query", QUERY, "--index", partly_labelled, "-k", "3", "--format", "json").stdout)
    assert [h["label"] for h in hits["results"]] == [None, None, None]


def _top1(neighbour_rows, similarity, labels, truth, k, vote_name):
    correct = 0
    for row, candidates in enumerate(neighbour_rows):
        order = candidates[np.argsort(-similarity[row, candidates], kind="stable")][:k]
        decision = vote([(labels[j], similarity[row, j]) for j in order], vote_name)
        correct += decision.label == truth[row]
    return correct / len(neighbour_rows)


def _records(*args):
    out = run("evaluate", *args, "-k", "1,3", "--vote", "both", "--format", "json").stdout
    return [json.loads(line) for line in out.splitlines()]


def test_every_evaluate_mode_votes_among_labelled_images(partly_labelled, tmp_path):
    entries, vectors, _ = _labelled(partly_labelled)
    labels = [e.label for e in entries]
    everyone = np.arange(len(entries))
    similarity = vectors @ vectors.T

    # Leave-one-out: every other labelled image.
    for record in _records("--index", partly_labelled, "--leave-one-out"):
        rows = [everyone[everyone != row] for row in everyone]
        assert record["top1"] == pytest.approx(_top1(rows, similarity, labels, labels, record["k"], record["vote"]))
        assert record["near_duplicates"] == 0  # the near-copies carry no label

    # Cross-validation: the labelled images of the other folds.
    folds = stratified_folds(labels, 5, seed=0)
    rows = [None] * len(entries)
    for test in folds:
        for row in test:
            rows[row] = np.setdiff1d(everyone, test)
    for record in _records("--index", partly_labelled, "--cv", "5"):
        assert record["top1"] == pytest.approx(_top1(rows, similarity, labels, labels, record["k"], record["vote"]))

    # Held-out: near-copies of each class's photos, labelled by folder.
    held_out = tmp_path / "held-out"
    for folder in sorted((SAMPLE_DATA / "labelled").iterdir()):
        (held_out / folder.name).mkdir(parents=True)
        for i, photo in enumerate(sorted(folder.iterdir())[:3]):
            _near_copy(photo, held_out / folder.name / f"{i}.png", 7)
    with Index.open(partly_labelled, plugins_dir=PLUGINS_DIR) as index:
        tests = sorted(held_out.rglob("*.png"))
        queries = index.embed_files(tests)[0]
    truth = [p.parent.name for p in tests]
    test_similarity = queries @ vectors.T
    for record in _records("--index", partly_labelled, "--test", held_out):
        expected = _top1([everyone] * len(tests), test_similarity, labels, truth, record["k"], record["vote"])
        assert record["top1"] == pytest.approx(expected)
