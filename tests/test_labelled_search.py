"""Searching among labelled images only (what classify and evaluate vote
with), on every path the store has: exact segments, a segment where few
rows may answer, the approximate index types, removed vectors; and the
backend interface's generic fallback.  Each against brute-force numpy over
the labelled live vectors."""

import numpy as np
import pytest

from imgsearch.encoders import l2_normalize
from imgsearch.store import Changes, Entry, Store, optimize
from imgsearch.store.backend import VectorBackend

DIM = 48


def _clustered(n, seed):
    rng = np.random.default_rng(seed)
    middle = l2_normalize(rng.standard_normal((60, DIM)))
    return l2_normalize(middle[rng.integers(0, 60, n)] + 0.15 * rng.standard_normal((n, DIM)))


def _build(path, data, labelled_share, seed=0, per_commit=1000):
    """An index of ``data`` (ids from 1) where about ``labelled_share`` of
    the images carry a label."""
    rng = np.random.default_rng(seed)
    labelled = rng.random(len(data)) < labelled_share
    store = Store.create(path, encoder={"name": "test"}, dim=DIM)
    for start in range(0, len(data), per_commit):
        chunk = range(start, min(start + per_commit, len(data)))
        entries = [Entry(i + 1, f"/v/{i}.jpg", f"sha{i}", 1, 1.0, f"c{i % 7}" if labelled[i] else None, 1, 1)
                   for i in chunk]
        store.commit(Changes(added=entries, vectors=list(data[start:start + len(entries)])))
    return store, labelled


def _brute_force(queries, data, allowed, k):
    scores = queries @ data.T
    scores[:, ~allowed] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[int(i) + 1 for i in row if np.isfinite(scores[r, i])] for r, row in enumerate(order)]


def _found(store, queries, k):
    hits = store.search(queries, k, labelled=True)
    assert all(h.entry.label is not None for row in hits for h in row)
    return [[h.entry.id for h in row] for row in hits]


def _recall(found, expected):
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, expected)]))


@pytest.mark.parametrize("share", [0.3, 0.05])  # 0.05: few rows may answer, read one by one
def test_exact_labelled_search_equals_brute_force(tmp_path, share):
    data = _clustered(3000, seed=1)
    queries = l2_normalize(data[:40] + 0.05 * np.random.default_rng(2).standard_normal((40, DIM)))
    store, labelled = _build(tmp_path / "ix", data, share)
    # A removed labelled image must not answer either.
    gone = int(np.flatnonzero(labelled)[0])
    store.commit(Changes(removed=[gone + 1]))
    labelled[gone] = False
    expected = _brute_force(queries, data, labelled, 10)
    assert _found(store, queries, 10) == expected
    # The interface's generic fallback (reads the vectors, searches them
    # exactly) gives the same answer as the local store's own.
    ids = store.labelled_ids()
    _, generic = VectorBackend.search_among(store.backend, queries, 10, ids)
    assert [[int(i) for i in row if i >= 0] for row in generic] == expected
    # An unrestricted search still finds unlabelled images.
    assert any(h.entry.label is None for row in store.search(queries, 10) for h in row)
    store.close()


@pytest.mark.parametrize("kind", ["ivf-sq8", "hnsw"])
def test_approximate_labelled_search_reaches_past_the_unlabelled(tmp_path, kind):
    data = _clustered(6000, seed=3)
    rng = np.random.default_rng(4)
    queries = l2_normalize(data[rng.integers(0, 6000, 100)] + 0.05 * rng.standard_normal((100, DIM)))
    store, labelled = _build(tmp_path / "ix", data, 0.2)
    optimize(store, index_type=kind, target_recall=0.95)
    assert store.ann is not None and store.ann.type == kind
    found = _found(store, queries, 10)
    expected = _brute_force(queries, data, labelled, 10)
    assert [len(row) for row in found] == [10] * len(queries)  # never short of labelled neighbours
    assert _recall(found, expected) >= 0.9, _recall(found, expected)
    store.close()


def test_labelled_search_covers_new_segments_beside_the_approximate_index(tmp_path):
    data = _clustered(4000, seed=5)
    store, labelled = _build(tmp_path / "ix", data[:3000], 0.3)
    optimize(store, index_type="ivf-sq8", target_recall=0.95)
    # Newer images, all labelled, in an exact segment of their own.
    entries = [Entry(3001 + i, f"/w/{i}.jpg", f"new{i}", 1, 1.0, "new", 1, 1) for i in range(1000)]
    store.commit(Changes(added=entries, vectors=list(data[3000:])))
    allowed = np.concatenate([labelled, np.ones(1000, bool)])
    queries = l2_normalize(data[2990:3010] + 0.01)
    assert _recall(_found(store, queries, 10), _brute_force(queries, data, allowed, 10)) >= 0.9
    store.close()
