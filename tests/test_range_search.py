"""Range search (every vector above a cosine threshold) over the real
store: exact over segments with tombstones, through an approximate index
after optimize, and by the default every backend inherits; each checked
against brute-force numpy over the live vectors."""

import numpy as np
import pytest

from conftest import store_of
from imgsearch.encoders import l2_normalize
from imgsearch.store import Changes, Entry, optimize
from imgsearch.store.backend import VectorBackend

DIM = 48


def _planted(rng, originals=400, copies=120):
    """Unrelated unit vectors plus close copies of some of them (cosine
    about 0.95 to 0.99), so that every threshold has neighbours to find."""
    base = l2_normalize(rng.standard_normal((originals, DIM)))
    sources = rng.choice(originals, size=copies)
    noise = rng.uniform(0.02, 0.05, (copies, 1)) * rng.standard_normal((copies, DIM))
    return np.vstack([base, l2_normalize(base[sources] + noise)])


def _pairs(found, query_ids):
    return {(int(q), int(i)) for q, (_, ids) in zip(query_ids, found) for i in ids}


def _brute_force(vectors, ids, threshold):
    rows, cols = np.nonzero(vectors @ vectors.T >= threshold)
    return {(int(ids[r]), int(ids[c])) for r, c in zip(rows, cols)}


@pytest.mark.parametrize("threshold", [0.9, 0.97])
def test_exact_range_search_over_segments_with_tombstones(tmp_path, threshold):
    rng = np.random.default_rng(0)
    vectors = _planted(rng)
    store = store_of(tmp_path / "ix", vectors, per_commit=100)
    removed = [int(i) for i in rng.choice(np.arange(1, len(vectors) + 1), 40, replace=False)]
    store.commit(Changes(removed=removed))
    assert len(store.segments) > 1 and store.tombstones == 40
    ids = store.ids()
    assert len(ids) == len(vectors) - 40 and not set(removed) & set(ids.tolist())
    live = vectors[ids - 1]
    found = store.range_search(live, threshold)
    expected = _brute_force(live, ids, threshold)
    assert _pairs(found, ids) == expected
    assert len(expected) > len(ids)  # not just every vector finding itself
    for (scores, found_ids), row in zip(found, live):
        assert np.all(np.diff(scores) <= 0)  # best first
        np.testing.assert_allclose(scores, vectors[found_ids - 1] @ row, rtol=1e-5)
    # The default every backend inherits (k nearest with a growing k)
    # agrees with the exact answer.
    assert _pairs(VectorBackend.range_search(store.backend, live, threshold), ids) == expected
    store.close()


def test_range_search_groups_larger_than_the_first_k(tmp_path):
    # 50 copies of one vector: the default must widen k past its first 16.
    rng = np.random.default_rng(1)
    one = l2_normalize(rng.standard_normal((1, DIM)))
    vectors = np.vstack([l2_normalize(one + 0.01 * rng.standard_normal((50, DIM))),
                         l2_normalize(rng.standard_normal((200, DIM)))])
    store = store_of(tmp_path / "ix", vectors, per_commit=100)
    found = VectorBackend.range_search(store.backend, vectors[:1], 0.95)
    assert sorted(found[0][1].tolist()) == list(range(1, 51))
    store.close()


@pytest.mark.parametrize("kind", ["ivf-sq8", "ivf-pq", "hnsw"])
def test_range_search_through_an_approximate_index(tmp_path, kind):
    # IVF types answer with FAISS's range search (coded scores, then exact
    # ones), HNSW through its k-nearest search; a later segment, searched
    # exactly, and removed vectors take part as in any search.
    rng = np.random.default_rng(2)
    vectors = _planted(rng, originals=6000, copies=600)
    vectors = vectors[rng.permutation(len(vectors))]  # copies in both parts
    store = store_of(tmp_path / "ix", vectors[:6000], per_commit=2000)
    optimize(store, index_type=kind, target_recall=0.95)
    assert store.ann is not None and store.ann.type == kind
    tail = _store_rest(store, vectors, 6000)
    removed = [int(i) for i in rng.choice(np.arange(1, 6001), 300, replace=False)]
    store.commit(Changes(removed=removed))
    ids = store.ids()
    assert len(ids) == len(vectors) - 300 and tail
    for threshold in (0.9, 0.96):
        found = store.range_search(vectors[ids - 1], threshold)
        expected = _brute_force(vectors[ids - 1], ids, threshold)
        got = _pairs(found, ids)
        assert got <= expected  # scores are exact: nothing below the threshold
        assert len(got) / len(expected) >= 0.98
        for (scores, found_ids), row in zip(found, vectors[ids - 1]):
            np.testing.assert_allclose(scores, vectors[found_ids - 1] @ row, rtol=1e-5)
    store.close()


def _store_rest(store, vectors, start):
    """Commit vectors[start:] as one more (exact) segment."""
    entries = [Entry(start + i + 1, f"/v/{start + i}.jpg", f"sha{start + i}", 1, 1.0, None, 1, 1)
               for i in range(len(vectors) - start)]
    store.commit(Changes(added=entries, vectors=list(vectors[start:])))
    return len(entries)
