"""Segments and tombstones: commits write only their own vectors, searches
over many segments equal brute force over the live vectors, and removed or
replaced vectors are never returned, before and after merging."""

import numpy as np
import pytest

from imgsearch.encoders import l2_normalize
from imgsearch.store import Changes, Entry, Store, optimize

DIM = 32


def _entry(image_id, tag=""):
    return Entry(image_id, f"/photos/{image_id}{tag}.jpg", f"sha{image_id}{tag}", 10, 1.0, f"c{image_id % 4}", 8, 8)


class Reference:
    """What the index should hold: id -> vector, kept by hand."""

    def __init__(self):
        self.vectors: dict[int, np.ndarray] = {}

    def search(self, queries, k):
        ids = np.array(sorted(self.vectors))
        matrix = np.stack([self.vectors[i] for i in ids])
        scores = queries @ matrix.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return ids[order], np.take_along_axis(scores, order, axis=1)


def _churn(store, rng, commits=6, per_commit=40):
    """Commits that add, replace and remove across segments."""
    reference = Reference()
    for _ in range(commits):
        added = [_entry(store.next_id + i) for i in range(per_commit)]
        live = sorted(reference.vectors)
        replaced_ids = list(rng.choice(live, size=min(5, len(live)), replace=False)) if live else []
        removed = [i for i in (rng.choice(live, size=min(4, len(live)), replace=False) if live else [])
                   if i not in replaced_ids]
        replaced = [_entry(int(i), tag=f"-v{store.manifest['revision']}") for i in replaced_ids]
        vectors = l2_normalize(rng.standard_normal((len(added) + len(replaced), DIM)))
        store.commit(Changes(added=added, replaced=replaced, vectors=list(vectors), removed=[int(i) for i in removed]))
        for entry, vector in zip(added + replaced, vectors):
            reference.vectors[entry.id] = vector
        for i in removed:
            del reference.vectors[int(i)]
    return reference


def _check_against(store, reference, rng, k=15):
    queries = l2_normalize(rng.standard_normal((20, DIM)))
    # Queries equal to stored vectors too: the old vector of a replaced id
    # must not come back even where it would score 1.0.
    expected_ids, expected_scores = reference.search(queries, k)
    hits = store.search(queries, k)
    for row, found in enumerate(hits):
        assert [h.entry.id for h in found] == expected_ids[row].tolist()
        np.testing.assert_allclose([h.score for h in found], expected_scores[row], rtol=1e-5, atol=1e-6)


def test_each_commit_writes_only_its_own_segment(tmp_path):
    rng = np.random.default_rng(0)
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    _churn(store, rng, commits=2)
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "ix").glob("seg-*")}
    _churn(store, rng, commits=3)
    for name, (mtime, data) in first.items():  # written once, never again
        path = tmp_path / "ix" / name
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data
    assert len(list((tmp_path / "ix").glob("seg-*"))) == 5 == store.manifest["segments"]


def test_search_over_segments_with_tombstones_equals_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    reference = _churn(store, rng)
    assert store.tombstones > 0 and store.count == len(reference.vectors)
    _check_against(store, reference, rng)
    store.close()
    with Store.open(tmp_path / "ix") as reader:  # the same after a reopen
        _check_against(reader, reference, rng)
        assert reader.verify(check_files=False) == ([], [])
        ids = sorted(reference.vectors)
        np.testing.assert_allclose(reader.vectors(ids), np.stack([reference.vectors[i] for i in ids]), rtol=1e-6)


def test_removed_and_replaced_vectors_never_come_back(tmp_path):
    rng = np.random.default_rng(2)
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    old = l2_normalize(rng.standard_normal((3, DIM)))
    store.commit(Changes(added=[_entry(1), _entry(2), _entry(3)], vectors=list(old)))
    new = l2_normalize(rng.standard_normal((1, DIM)))
    store.commit(Changes(replaced=[_entry(2, "-new")], vectors=list(new), removed=[3]))
    for s in (store, Store.open(tmp_path / "ix")):
        # Asking with the old vectors themselves: their ids are gone or moved.
        hits = s.search(old, 3)
        assert [[h.entry.id for h in row] for row in hits][2].count(3) == 0
        assert all(h.score < 0.9999 for row in hits[1:] for h in row if h.entry.id == 2)
        assert {h.entry.id for row in hits for h in row} == {1, 2}
    report = optimize(store, index_type="flat")
    assert report.tombstones_dropped == 2 and store.tombstones == 0 and len(store.segments) == 1
    assert sorted(store.search(old, 3)[2][i].entry.id for i in range(2)) == [1, 2]


@pytest.mark.parametrize("kind", ["flat", "ivf-sq8", "ivf-pq", "hnsw"])
def test_after_optimize_tombstones_and_new_segments_still_hold(tmp_path, kind):
    rng = np.random.default_rng(3)
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    reference = _churn(store, rng, commits=8, per_commit=250)
    report = optimize(store, index_type=kind, target_recall=0.99)
    assert len(store.segments) == 1 and store.tombstones == 0 and report.index_type == kind
    # Tuned on held-back vectors to the target (ivf-pq's 4-byte codes of 32-d
    # vectors fall just short of 0.99 even probing every list: recorded as reached).
    assert report.recall_at_10 == store.manifest["ann"]["recall_at_10"] >= 0.98
    # Work after the merge: new segments, tombstones inside the merged part.
    more = _churn_more(store, reference, rng)
    assert more and store.tombstones > 0 and len(store.segments) == 2
    queries = np.stack([reference.vectors[i] for i in sorted(reference.vectors)[:40]])
    hits = store.search(queries, 10)
    live = set(reference.vectors)
    assert all(h.entry.id in live for row in hits for h in row)
    expected, _ = reference.search(queries, 10)
    recall = np.mean([len({h.entry.id for h in row} & set(exp.tolist())) / 10 for row, exp in zip(hits, expected)])
    assert recall >= (1.0 if kind == "flat" else 0.9)
    assert [row[0].entry.id for row in hits] == expected[:, 0].tolist()  # each finds itself first
    store.close()
    with Store.open(tmp_path / "ix", writable=True) as again:
        assert again.verify(check_files=False) == ([], [])
        optimize(again)
        assert again.tombstones == 0 and again.count == len(reference.vectors)


def _churn_more(store, reference, rng):
    merged = sorted(reference.vectors)[:300]
    removed = [int(i) for i in rng.choice(merged, size=20, replace=False)]
    added = [_entry(store.next_id + i) for i in range(30)]
    vectors = l2_normalize(rng.standard_normal((30, DIM)))
    store.commit(Changes(added=added, vectors=list(vectors), removed=removed))
    for entry, vector in zip(added, vectors):
        reference.vectors[entry.id] = vector
    for i in removed:
        del reference.vectors[i]
    return removed


def test_compact_merges_recent_segments_and_leaves_the_merged_part(tmp_path):
    from imgsearch.store import compact, due
    from imgsearch.store import merge

    rng = np.random.default_rng(5)
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    reference = _churn(store, rng, commits=3, per_commit=300)
    optimize(store, index_type="ivf-sq8", target_recall=0.99)
    merged = store.segments[0].path
    before = merged.read_bytes()
    # Small commits that replace and remove among their own images.
    reference.vectors.update(_churn(store, rng, commits=merge.TIER_FACTOR + 2, per_commit=3).vectors)
    live = {e.id for e in store.entries()}
    assert live == set(reference.vectors)
    assert due(store) == ("compact", f"{merge.TIER_FACTOR + 2} segments of under 8,000 vectors")
    report = compact(store)
    assert report.merged and len(store.segments) == 2 and store.segments[0].path == merged
    assert merged.read_bytes() == before and store.manifest["ann"]["type"] == "ivf-sq8"
    assert store.segments[1].dead.sum() == 0 and due(store) is None
    ids = sorted(live)
    np.testing.assert_allclose(store.vectors(ids), np.stack([reference.vectors[i] for i in ids]), rtol=1e-6)
    assert store.verify(check_files=False) == ([], [])


def test_small_segments_merge_by_tiers_and_a_full_merge_comes_due(tmp_path, monkeypatch):
    from imgsearch.store import compact, compaction_due, due
    from imgsearch.store import merge

    # Tiers of 10, 40, 160 ... vectors with 4 segments a tier, to keep it small.
    monkeypatch.setattr(merge, "TIER_BASE", 10)
    monkeypatch.setattr(merge, "TIER_FACTOR", 4)
    monkeypatch.setattr(merge, "MERGE_MIN_VECTORS", 300)
    rng = np.random.default_rng(6)
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    counts = []
    for _ in range(40):
        added = [_entry(store.next_id + i) for i in range(10)]
        store.commit(Changes(added=added, vectors=list(l2_normalize(rng.standard_normal((10, DIM))))))
        while compaction_due(store):
            compact(store)
        counts.append(sorted(s.count for s in store.segments))
    # Never 4 segments of one tier, so at most 3 a tier: 40 commits of 10
    # leave 2 x 160 and 2 x 40 (each vector rewritten twice, not 40 times).
    assert all(len(c) <= 3 * 3 for c in counts)
    assert counts[-1] == [40, 40, 160, 160]
    assert due(store) == ("optimize", "400 vectors not merged")
    optimize(store)
    assert len(store.segments) == 1 and due(store) is None


def test_a_reader_keeps_its_state_while_a_merge_removes_its_files(tmp_path):
    rng = np.random.default_rng(7)
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    reference = _churn(store, rng, commits=4)
    reader = Store.open(tmp_path / "ix")
    old_files = [s.path for s in reader.segments]
    optimize(store, index_type="flat")
    assert not any(path.exists() for path in old_files)
    queries = l2_normalize(rng.standard_normal((5, DIM)))
    expected, _ = reference.search(queries, 10)
    _, ids = reader.nearest(queries, 10)  # the state it loaded, read from the files it holds open
    assert ids.tolist() == expected.tolist()
    hits = reader.search(queries, 10)  # a search first catches up with the merge
    assert len(reader.segments) == 1 and [[h.entry.id for h in row] for row in hits] == expected.tolist()
    reader.close()


@pytest.mark.parametrize("kind", ["ivf-sq8", "hnsw"])
def test_removals_next_to_the_query_leave_k_results_and_recall(tmp_path, kind):
    """Removed vectors are skipped inside FAISS: where many near a query are
    gone, the search reaches further instead of coming back short or poor."""
    rng = np.random.default_rng(8)
    centres = l2_normalize(rng.standard_normal((40, DIM)))
    labels = np.repeat(np.arange(40), 100)
    data = l2_normalize(centres[labels] + 0.15 * rng.standard_normal((4000, DIM)))
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    store.commit(Changes(added=[_entry(i + 1) for i in range(4000)], vectors=list(data)))
    optimize(store, index_type=kind)
    queries = l2_normalize(centres[:2] + 0.1 * rng.standard_normal((2, DIM)))
    # Cluster 0 loses every member, cluster 1 the 80 nearest its centre.
    doomed = list(np.nonzero(labels == 0)[0]) + list(100 + np.argsort(-(data[100:200] @ centres[1]))[:80])
    store.commit(Changes(removed=[int(i) + 1 for i in doomed]))
    live = np.setdiff1d(np.arange(4000), doomed)
    expected = live[np.argsort(-(queries @ data[live].T), axis=1)[:, :20]] + 1
    hits = store.search(queries, 20)
    assert all(len(row) == 20 for row in hits)
    assert not {h.entry.id - 1 for row in hits for h in row} & set(doomed)
    # Near cluster 1 its 20 survivors are the answer, and they are found.
    assert len({h.entry.id for h in hits[1]} & set(expected[1])) >= 18
