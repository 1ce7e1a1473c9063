"""The store against a brute-force reference, and its commit and error rules."""

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from imgsearch.encoders import l2_normalize
from imgsearch.errors import BadIndexError, IndexLockedError
from imgsearch.store import MANIFEST_FILE, Alias, Changes, Entry, Store

DIM = 64


def _entries(store, n, start=0):
    """``n`` new entries with the next free ids."""
    return [Entry(store.next_id + i, f"/photos/{start + i}.jpg", f"sha{start + i}", 1000 + i, 1.5 * i,
                  f"class{(start + i) % 3}", 224, 224) for i in range(n)]


def _add(store, vectors, start=0):
    store.commit(Changes(added=_entries(store, len(vectors), start), vectors=list(vectors)))


def _store(tmp_path, vectors):
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    _add(store, vectors)
    return store


def test_search_equals_brute_force_numpy(tmp_path):
    rng = np.random.default_rng(7)
    data = l2_normalize(rng.standard_normal((500, DIM)))
    queries = l2_normalize(rng.standard_normal((25, DIM)))
    store = _store(tmp_path, data)
    results = store.search(queries, 10)

    scores = queries @ data.T
    expected = np.argsort(-scores, axis=1)[:, :10]
    for row, hits in enumerate(results):
        # ids start at 1, rows of `data` at 0
        assert [hit.entry.id - 1 for hit in hits] == expected[row].tolist()
        np.testing.assert_allclose([hit.score for hit in hits], scores[row, expected[row]], rtol=1e-5)


def test_k_larger_than_index_returns_only_real_neighbours(tmp_path):
    rng = np.random.default_rng(1)
    store = _store(tmp_path, l2_normalize(rng.standard_normal((4, DIM))))
    hits = store.search(l2_normalize(rng.standard_normal((2, DIM))), 50)
    assert [len(h) for h in hits] == [4, 4]
    assert all(hit.entry.id > 0 for row in hits for hit in row)


def test_empty_index_search_returns_nothing(tmp_path):
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    assert store.search(np.ones((1, DIM), np.float32), 5) == [[]]


def test_commit_persists_ids_metadata_and_manifest(tmp_path):
    rng = np.random.default_rng(2)
    vectors = l2_normalize(rng.standard_normal((6, DIM)))
    store = _store(tmp_path, vectors)
    store.close()

    reopened = Store.open(tmp_path / "ix")
    assert reopened.count == 6
    assert [e.id for e in reopened.entries()] == [1, 2, 3, 4, 5, 6]
    assert reopened.labels() == {"class0": 2, "class1": 2, "class2": 2}
    np.testing.assert_allclose(reopened.vectors([3]), vectors[2:3], rtol=1e-6)
    manifest = json.loads((tmp_path / "ix" / MANIFEST_FILE).read_text())
    assert manifest["count"] == 6 and manifest["dim"] == DIM and manifest["metric"] == "inner_product"
    # One commit, one segment file, recorded with its checksum.
    assert sorted(p.name for p in (tmp_path / "ix").glob("seg-*")) == ["seg-000001.vec"]
    assert manifest["segments"] == 1 and manifest["format_version"] == 2


def test_replacing_an_entry_keeps_its_id_and_never_renumbers(tmp_path):
    rng = np.random.default_rng(3)
    store = _store(tmp_path, l2_normalize(rng.standard_normal((3, DIM))))
    old = store.entries()[1]
    new_vector = l2_normalize(rng.standard_normal((1, DIM)))
    changed = Entry(old.id, old.path, "newsha", 5, 9.0, "relabelled", 10, 10)
    more = _entries(store, 1, start=10)
    store.commit(Changes(added=more, replaced=[changed],
                         vectors=[*l2_normalize(rng.standard_normal((1, DIM))), *new_vector]))
    assert more[0].id == 4
    assert store.count == 4
    assert [e.id for e in store.entries()] == [1, 2, 3, 4]
    assert store.by_path()[old.path].sha256 == "newsha"
    np.testing.assert_allclose(store.vectors([old.id]), new_vector, rtol=1e-6)


def test_failed_commit_leaves_the_previous_state(tmp_path):
    rng = np.random.default_rng(4)
    store = _store(tmp_path, l2_normalize(rng.standard_normal((3, DIM))))
    before = sorted(p.name for p in (tmp_path / "ix").iterdir())
    clash = Entry(store.next_id, store.entries()[0].path, "x", 1, 1.0, None, 1, 1)  # path taken by id 1
    with pytest.raises(BadIndexError, match="inconsistent"):
        store.commit(Changes(added=[clash], vectors=list(l2_normalize(rng.standard_normal((1, DIM))))))
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == before
    store.close()
    assert Store.open(tmp_path / "ix").count == 3


def test_second_writer_is_refused(tmp_path):
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    with pytest.raises(IndexLockedError, match="another process"):
        Store.open(tmp_path / "ix", writable=True)
    assert Store.open(tmp_path / "ix").count == 0  # readers still work
    store.close()
    Store.open(tmp_path / "ix", writable=True).close()


def test_not_an_index(tmp_path):
    with pytest.raises(BadIndexError, match="no index at"):
        Store.open(tmp_path / "missing")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(BadIndexError, match="not an imgsearch index"):
        Store.open(tmp_path / "photos")
    with pytest.raises(BadIndexError, match="not empty"):
        Store.create(tmp_path / "photos", encoder={"name": "test"}, dim=DIM)
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["a.jpg"]


def test_damaged_vectors_file_is_reported(tmp_path):
    rng = np.random.default_rng(5)
    store = _store(tmp_path, l2_normalize(rng.standard_normal((3, DIM))))
    segment = store.segments[0].path
    store.close()
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF  # same size, one vector changed: a small index checks checksums on open
    segment.write_bytes(bytes(data))
    with pytest.raises(BadIndexError, match="does not match the checksum"):
        Store.open(tmp_path / "ix")
    segment.write_bytes(b"garbage")
    with pytest.raises(BadIndexError, match="seg-000001.vec has 7 bytes"):
        Store.open(tmp_path / "ix")
    segment.unlink()
    with pytest.raises(BadIndexError, match="missing"):
        Store.open(tmp_path / "ix")


def test_damaged_metadata_is_reported(tmp_path):
    store = Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM)
    store.close()
    (tmp_path / "ix" / "metadata.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(BadIndexError, match="damaged"):
        Store.open(tmp_path / "ix")


def test_l2_normalize_guards_zero_vectors():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    assert out.dtype == np.float32


def test_a_failed_vectors_write_leaves_the_index_as_it_was(tmp_path, monkeypatch):
    from imgsearch.store import segments

    rng = np.random.default_rng(6)
    store = _store(tmp_path, l2_normalize(rng.standard_normal((3, DIM))))
    before = sorted(p.name for p in (tmp_path / "ix").iterdir())

    def full_disk(self, vectors):
        self._out.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segments.SegmentWriter, "add", full_disk)
    with pytest.raises(BadIndexError, match="No space left on device.*the index is unchanged"):
        _add(store, l2_normalize(rng.standard_normal((2, DIM))), start=50)
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == before
    store.close()
    monkeypatch.undo()
    assert Store.open(tmp_path / "ix").count == 3


def test_a_writer_removes_what_unfinished_commits_left(tmp_path):
    store = _store(tmp_path, l2_normalize(np.random.default_rng(8).standard_normal((2, DIM))))
    store.close()
    strays = ("seg-000099.vec", "seg-000100.vec.tmp", "ann-000099.faiss", "manifest.json.tmp")
    for name in strays:
        (tmp_path / "ix" / name).write_bytes(b"left by a crash")
    with Store.open(tmp_path / "ix") as reader:  # readers never delete, verify names them
        assert "seg-000099.vec" in reader.verify(check_files=False)[1][0]
    assert all((tmp_path / "ix" / name).exists() for name in strays)
    Store.open(tmp_path / "ix", writable=True).close()
    assert sorted(p.name for p in (tmp_path / "ix").glob("*-0*")) == ["seg-000001.vec"]
    assert not list((tmp_path / "ix").glob("*.tmp"))


def test_a_reader_retries_when_a_commit_replaced_its_files(tmp_path, monkeypatch):
    store = _store(tmp_path, l2_normalize(np.random.default_rng(9).standard_normal((2, DIM))))
    store.close()
    calls = []
    real = Store._open_view

    def vanished_once(self, infos, tombstones):
        calls.append(len(infos))
        if len(calls) == 1:
            raise FileNotFoundError(2, "gone", str(tmp_path / "ix" / "seg-000001.vec"))
        return real(self, infos, tombstones)

    monkeypatch.setattr(Store, "_open_view", vanished_once)
    assert Store.open(tmp_path / "ix").count == 2
    assert calls == [1, 1]


def test_removing_entries(tmp_path):
    rng = np.random.default_rng(10)
    store = _store(tmp_path, l2_normalize(rng.standard_normal((4, DIM))))
    store.commit(Changes(removed=[2, 3]))
    assert [e.id for e in store.entries()] == [1, 4] and store.count == 2
    _add(store, l2_normalize(rng.standard_normal((1, DIM))), start=20)
    assert [e.id for e in store.entries()] == [1, 4, 5]  # removed ids are never reused
    with pytest.raises(ValueError, match="unused ids"):
        store.commit(Changes(added=[Entry(2, "/x.jpg", "shax", 1, 1.0, None, 1, 1)],
                             vectors=list(l2_normalize(rng.standard_normal((1, DIM))))))


def test_aliases_follow_their_image_and_are_returned_with_it(tmp_path):
    rng = np.random.default_rng(11)
    vectors = l2_normalize(rng.standard_normal((3, DIM)))
    store = _store(tmp_path, vectors)
    store.commit(Changes(aliases=[Alias("/copies/a.jpg", 2, 1, 1.0, None), Alias("/copies/b.jpg", 2, 1, 1.0, "x")]))
    hits = store.search(vectors[1:2], 1)[0]
    assert hits[0].entry.id == 2 and hits[0].also_at == ("/copies/a.jpg", "/copies/b.jpg")
    assert store.search(vectors[0:1], 1)[0][0].also_at == ()
    with pytest.raises(BadIndexError, match="inconsistent"):
        store.commit(Changes(aliases=[Alias("/copies/c.jpg", 99, 1, 1.0, None)]))  # no image 99
    with pytest.raises(BadIndexError, match="inconsistent"):
        store.commit(Changes(aliases=[Alias(store.entries()[0].path, 2, 1, 1.0, None)]))  # a primary path
    store.commit(Changes(removed=[2]))
    assert store.aliases() == [] and store.count == 2


def test_metadata_only_changes_write_no_new_vectors_file(tmp_path):
    store = _store(tmp_path, l2_normalize(np.random.default_rng(12).standard_normal((2, DIM))))
    before = sorted(p.name for p in (tmp_path / "ix").iterdir())
    generation = store.manifest["generation"]
    moved = Entry(**{**store.entries()[0].__dict__, "path": "/elsewhere/0.jpg", "label": "new"})
    store.commit(Changes(updated=[moved]))
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == before
    assert store.manifest["generation"] == generation
    store.close()
    reopened = Store.open(tmp_path / "ix")
    assert reopened.by_path()["/elsewhere/0.jpg"].label == "new"


@pytest.mark.parametrize("leftovers", [
    {"write.lock": b"", "manifest.json.tmp": b""},  # killed before the copy's first byte
    {"write.lock": b"", "metadata.sqlite.new": b"SQLite format 3\x00"},
])
def test_a_creation_killed_part_way_leaves_a_folder_the_next_run_takes(tmp_path, leftovers):
    target = tmp_path / "ix"
    target.mkdir()
    for name, data in leftovers.items():
        (target / name).write_bytes(data)
    Store.check_creatable(target)
    with Store.create(target, encoder={"name": "synthetic"}, dim=4) as store:
        assert store.count == 0
    assert not (target / "manifest.json.tmp").exists() and not (target / "metadata.sqlite.new").exists()


def test_the_loser_of_two_creations_is_told_another_process_made_the_index(tmp_path):
    # Both found the folder empty; the other process created the index while
    # this one was still loading its model.
    target = tmp_path / "ix"
    winner = Store.create(target, encoder={"name": "synthetic"}, dim=4)
    with pytest.raises(IndexLockedError, match="being written by another process"):
        Store.create(target, encoder={"name": "synthetic"}, dim=4)
    winner.close()  # its whole run is over before the loser gets there
    with pytest.raises(IndexLockedError, match="was just created by another process; run the command again"):
        Store.create(target, encoder={"name": "synthetic"}, dim=4)
    assert Store.open(target).count == 0  # and it is left as it was


def test_a_folder_of_other_files_is_still_refused(tmp_path):
    target = tmp_path / "ix"
    target.mkdir()
    (target / "manifest.json.tmp").write_text("not ours")
    with pytest.raises(BadIndexError, match="not an imgsearch index and not empty"):
        Store.check_creatable(target)


def test_a_long_search_does_not_hold_up_a_commit(tmp_path, monkeypatch):
    """A reader's search that takes long (a large index, a slow disk) while
    a writer commits: the commit lands during the search, and the search
    answers from the new state."""
    import threading

    from imgsearch.store.store import LocalBackend

    rng = np.random.default_rng(11)
    data = l2_normalize(rng.standard_normal((50, DIM)))
    writer = _store(tmp_path, data)
    reader = Store.open(tmp_path / "ix")
    searching, committed = threading.Event(), threading.Event()
    waited = []
    original = LocalBackend.search

    def slow_search(self, queries, k):
        if not searching.is_set():
            searching.set()
            # The search goes on until the writer's commit is through (or
            # gives up after a while, as a reader holding the writer back would).
            waited.append(committed.wait(timeout=10))
        return original(self, queries, k)

    monkeypatch.setattr(LocalBackend, "search", slow_search)
    fresh = l2_normalize(rng.standard_normal((1, DIM)))
    answer = []
    thread = threading.Thread(target=lambda: answer.append(reader.search(fresh, 3)))
    thread.start()
    assert searching.wait(timeout=10)
    _add(writer, fresh, start=50)
    committed.set()
    thread.join(timeout=30)
    assert waited == [True], "the commit waited for the reader's search to end"
    # The commit landed while the search ran: it was searched again, on the new state.
    assert answer[0][0][0].entry.id == 51 and answer[0][0][0].score == pytest.approx(1.0, abs=1e-5)
    reader.close()
    writer.close()


class _FailingConnection:
    """The metadata connection with one read failing the way SQLite fails on
    an I/O error: it rolls the transaction back itself, then raises.  (An I/O
    error cannot be caused on purpose here; SQLite's own behaviour is what
    this stands in for.)"""

    def __init__(self, db, failing_sql):
        self._db, self._failing_sql = db, failing_sql

    def execute(self, sql, *args):
        if sql.startswith(self._failing_sql):
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def test_an_error_while_a_search_reloads_the_state_is_reported_as_itself(tmp_path):
    rng = np.random.default_rng(12)
    writer = _store(tmp_path, l2_normalize(rng.standard_normal((10, DIM))))
    reader = Store.open(tmp_path / "ix")
    _add(writer, l2_normalize(rng.standard_normal((5, DIM))), start=10)  # the reader must reload
    reader._db = _FailingConnection(reader._db, "SELECT count(*) FROM images")
    with pytest.raises(BadIndexError) as info:
        reader.search(l2_normalize(rng.standard_normal((1, DIM))), 3)
    assert "disk I/O error" in str(info.value) and "no transaction" not in str(info.value)
    reader._db = reader._db._db
    reader.close()
    writer.close()


def test_the_metadata_is_written_ahead_and_readers_leave_no_files(tmp_path):
    rng = np.random.default_rng(13)
    store = _store(tmp_path, l2_normalize(rng.standard_normal((10, DIM))))
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    files = sorted(p.name for p in (tmp_path / "ix").iterdir())
    with Store.open(tmp_path / "ix") as reader:
        reader.search(l2_normalize(rng.standard_normal((1, DIM))), 3)
    # SQLite's log and shared-memory files go with the last connection.
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == files


def _read_as_another_user(directory, ids):
    """Open the index read-only from a process that cannot write its
    folder: as root (who writes through any file mode) a forked child
    that drops to user nobody, else this process, the folder made
    read-only by its mode.  The rows and vectors, or the error message."""
    import os
    import pickle

    def read():
        try:
            with Store.open(directory) as store:
                return [e.path for e in store.entries()], store.vectors(ids)
        except BadIndexError as exc:
            return str(exc)

    if os.geteuid() != 0:
        return read()
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # only SQLite and numpy run here: nothing that forking could have left locked
        try:
            os.close(reading)
            os.setgid(65534)
            os.setuid(65534)
            answer = read()
        except BaseException as exc:  # reported to the parent, which fails the test
            answer = f"child failed: {exc!r}"
        with os.fdopen(writing, "wb") as out:
            pickle.dump(answer, out)
        os._exit(0)
    os.close(writing)
    with os.fdopen(reading, "rb") as answer:
        result = pickle.load(answer)
    os.waitpid(child, 0)
    return result


def test_an_index_in_a_folder_this_user_cannot_write_can_be_read(tmp_path):
    """The metadata is in write-ahead-log mode, where an ordinary reader
    must create a shared-memory file beside it: a read-only folder (read-only
    media, another user's index) is read without one, and left unchanged."""
    import tempfile

    rng = np.random.default_rng(3)
    data = l2_normalize(rng.standard_normal((20, DIM)))
    # Under the system's temporary folder: pytest's own is closed to other users.
    directory = Path(tempfile.mkdtemp(prefix="imgsearch-ro-")) / "ix"
    try:
        directory.parent.chmod(0o755)
        with Store.create(directory, encoder={"name": "test"}, dim=DIM) as store:
            _add(store, data)
        before = sorted(p.name for p in directory.iterdir())
        for path in directory.iterdir():
            path.chmod(0o444)
        directory.chmod(0o555)

        result = _read_as_another_user(directory, np.arange(1, 21))

        assert not isinstance(result, str), result
        paths, vectors = result
        assert paths == [f"/photos/{i}.jpg" for i in range(20)]
        np.testing.assert_allclose(vectors, data, rtol=1e-6)
        assert sorted(p.name for p in directory.iterdir()) == before  # no -shm, no -wal made
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory.parent)


def test_a_read_only_index_with_a_writers_leftover_log_is_refused_in_one_line(tmp_path):
    """A writer killed before its log was folded into the database: a
    reader that cannot write would miss the commits in that log, so it is
    told who can open the index instead of reading an older state."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="imgsearch-ro-")) / "ix"
    try:
        directory.parent.chmod(0o755)
        with Store.create(directory, encoder={"name": "test"}, dim=DIM) as store:
            _add(store, l2_normalize(np.random.default_rng(4).standard_normal((5, DIM))))
        wal = directory / "metadata.sqlite-wal"
        # What a killed writer leaves: committed pages still in the log.
        keep = sqlite3.connect(directory / "metadata.sqlite")
        keep.execute("PRAGMA wal_autocheckpoint=0")
        keep.execute("UPDATE images SET label = 'late' WHERE id = 1")
        keep.commit()
        leftover = wal.read_bytes()
        keep.close()  # folds the log in and removes it; put it back as a crash would leave it
        wal.write_bytes(leftover)
        for path in directory.iterdir():
            path.chmod(0o444)
        directory.chmod(0o555)

        result = _read_as_another_user(directory, np.arange(1, 6))

        assert isinstance(result, str) and "write log" in result and "\n" not in result, result
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory.parent)
