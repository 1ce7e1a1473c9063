"""The update rules, on a real store with real files (vectors are synthetic:
the rules never look at pixels)."""

import numpy as np
import pytest

from imgsearch.encoders import l2_normalize
from imgsearch.store import Store
from imgsearch.sync import FileFacts, Sync

DIM = 8


def _vector(seed):
    return l2_normalize(np.random.default_rng(seed).standard_normal((1, DIM)))[0]


def _facts(path, sha, label=None, folder_label=None, size=10, mtime=1.0):
    return FileFacts(str(path), sha, size, mtime, label, folder_label, 4, 4)


@pytest.fixture
def store(tmp_path):
    with Store.create(tmp_path / "ix", encoder={"name": "test"}, dim=DIM) as s:
        yield s


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / name).write_bytes(name.encode())
    return folder


def _add_all(store, files):
    sync = Sync(store)
    for i, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        assert sync.add(_facts(files / name, f"sha-{name}", folder_label="x"), _vector(i)) == "added"
    sync.commit()
    return {e.path: e.id for e in store.entries()}


def test_new_unchanged_and_relabelled(store, files):
    ids = _add_all(store, files)
    assert sorted(ids.values()) == [1, 2, 3]
    sync = Sync(store)
    assert sync.unchanged_on_disk(str(files / "a.jpg"), 10, 1.0)
    assert not sync.unchanged_on_disk(str(files / "a.jpg"), 10, 2.0)
    assert not sync.needs_pixels(str(files / "a.jpg"), "sha-a.jpg")
    # touched: same content, new mtime; the folder label does not overrule
    assert sync.add(_facts(files / "a.jpg", "sha-a.jpg", folder_label="y", mtime=5.0), None) == "unchanged"
    assert sync.add(_facts(files / "b.jpg", "sha-b.jpg", label="fish"), None) == "relabelled"
    sync.commit()
    rows = store.by_path()
    assert rows[str(files / "a.jpg")].mtime == 5.0 and rows[str(files / "a.jpg")].label == "x"
    assert rows[str(files / "b.jpg")].label == "fish"
    assert store.count == 3


def test_changed_content_keeps_the_id(store, files):
    ids = _add_all(store, files)
    sync = Sync(store)
    assert sync.needs_pixels(str(files / "a.jpg"), "sha-new")
    assert sync.add(_facts(files / "a.jpg", "sha-new"), _vector(10)) == "changed"
    sync.commit()
    entry = store.by_path()[str(files / "a.jpg")]
    assert entry.id == ids[str(files / "a.jpg")] and entry.sha256 == "sha-new" and entry.label == "x"
    np.testing.assert_allclose(store.vectors([entry.id])[0], _vector(10), rtol=1e-6)


def test_identical_files_share_one_vector(store, files):
    ids = _add_all(store, files)
    copy = files / "copy of a.jpg"
    copy.write_bytes(b"a.jpg")
    sync = Sync(store)
    assert not sync.needs_pixels(str(copy), "sha-a.jpg")
    assert sync.add(_facts(copy, "sha-a.jpg", folder_label="x"), None) == "duplicate"
    sync.commit()
    assert store.count == 3
    assert [(a.path, a.image_id) for a in store.aliases()] == [(str(copy), ids[str(files / "a.jpg")])]


def test_a_moved_file_keeps_its_vector_and_id(store, files):
    ids = _add_all(store, files)
    before = store.vectors([ids[str(files / "b.jpg")]])
    (files / "b.jpg").rename(files / "renamed.jpg")
    sync = Sync(store)
    assert sync.add(_facts(files / "renamed.jpg", "sha-b.jpg", folder_label="z"), None) == "moved"
    sync.commit()
    entry = store.by_path()[str(files / "renamed.jpg")]
    assert entry.id == ids[str(files / "b.jpg")] and entry.label == "z"
    assert str(files / "b.jpg") not in store.by_path()
    np.testing.assert_array_equal(store.vectors([entry.id]), before)


def test_dropping_a_file_with_a_copy_promotes_the_copy(store, files):
    ids = _add_all(store, files)
    copy = files / "copy.jpg"
    sync = Sync(store)
    sync.add(_facts(copy, "sha-a.jpg", label="kept"), None)
    sync.commit()
    sync = Sync(store)
    assert sync.drop(str(files / "a.jpg")) == "promoted"
    assert sync.drop(str(files / "c.jpg")) == "removed"
    assert sync.drop(str(files / "never.jpg")) is None
    sync.commit()
    rows = store.by_path()
    assert rows[str(copy)].id == ids[str(files / "a.jpg")] and rows[str(copy)].label == "kept"
    assert store.aliases() == [] and store.count == 2
    sync = Sync(store)
    assert sync.drop(str(copy)) == "removed"
    sync.commit()
    assert sorted(store.by_path()) == [str(files / "b.jpg")]


def test_a_copy_that_changes_becomes_its_own_image(store, files):
    _add_all(store, files)
    copy = files / "copy.jpg"
    sync = Sync(store)
    sync.add(_facts(copy, "sha-a.jpg"), None)
    sync.commit()
    sync = Sync(store)
    assert sync.add(_facts(copy, "sha-other"), _vector(20)) == "added"
    sync.commit()
    assert store.aliases() == [] and store.count == 4


def test_new_content_needs_a_vector(store, files):
    with pytest.raises(ValueError, match="needs a vector"):
        Sync(store).add(_facts(files / "a.jpg", "sha-a.jpg"), None)


def test_two_identical_new_files_in_one_run(store, files):
    sync = Sync(store)
    assert sync.add(_facts(files / "a.jpg", "same"), _vector(1)) == "added"
    assert sync.add(_facts(files / "b.jpg", "same"), _vector(1)) == "duplicate"
    sync.commit()
    assert store.count == 1 and [a.path for a in store.aliases()] == [str(files / "b.jpg")]


@pytest.mark.parametrize("copy_name", ["0 copy.jpg", "z copy.jpg"])  # sorts before and after
def test_editing_a_file_that_has_a_copy_keeps_the_copys_picture(store, files, copy_name):
    ids = _add_all(store, files)
    a = str(files / "a.jpg")
    old_vector = store.vectors([ids[a]])
    sync = Sync(store)
    sync.add(_facts(files / copy_name, "sha-a.jpg"), None)
    sync.commit()
    sync = Sync(store)
    assert sync.add(_facts(a, "sha-edited"), _vector(30)) == "added"
    sync.commit()
    rows = store.by_path()
    # the copy now carries the old picture under the old id ...
    assert rows[str(files / copy_name)].id == ids[a] and rows[str(files / copy_name)].sha256 == "sha-a.jpg"
    np.testing.assert_array_equal(store.vectors([ids[a]]), old_vector)
    # ... and the edited file is a new image with its new vector
    assert rows[a].sha256 == "sha-edited" and rows[a].id not in ids.values()
    np.testing.assert_allclose(store.vectors([rows[a].id])[0], _vector(30), rtol=1e-6)
    assert store.aliases() == [] and store.count == 4


def test_swapping_two_files_swaps_their_pictures(store, files):
    ids = _add_all(store, files)
    a, b = str(files / "a.jpg"), str(files / "b.jpg")
    vector_b = store.vectors([ids[b]])
    sync = Sync(store)
    # a now holds b's bytes and b holds a's: b's picture is found at a first
    assert sync.add(_facts(a, "sha-b.jpg"), None) == "duplicate"
    assert sync.needs_pixels(b, "sha-a.jpg")
    assert sync.add(_facts(b, "sha-a.jpg"), _vector(40)) == "added"
    sync.commit()
    rows = store.by_path()
    assert rows[a].sha256 == "sha-b.jpg" and rows[b].sha256 == "sha-a.jpg"
    np.testing.assert_array_equal(store.vectors([rows[a].id]), vector_b)
    assert store.aliases() == [] and store.count == 3


def test_updates_look_rows_up_instead_of_loading_the_index(tmp_path, monkeypatch):
    """An update of a few files reads only their rows: nothing that loads
    every row or alias of the index is called (memory follows the files in
    the update, not the collection)."""
    from conftest import SAMPLE_DATA, run

    index_dir = tmp_path / "ix"
    run("index", SAMPLE_DATA / "labelled", "--index", index_dir, "--encoder", "tiny-color")
    for name in ("entries", "by_path", "aliases", "labelled_entries"):
        monkeypatch.setattr(Store, name, lambda *a, **k: pytest.fail("the whole index was loaded"))
    result = run("index", SAMPLE_DATA / "labelled", SAMPLE_DATA / "queries", "--index", index_dir,
                 "--encoder", "tiny-color")
    assert "added 5, updated 0, moved 0, unchanged 50" in result.stdout
    run("remove", SAMPLE_DATA / "queries", "--index", index_dir)
    run("index", SAMPLE_DATA / "labelled", "--index", index_dir, "--prune")


def test_verify_finds_one_content_stored_twice(store, files):
    from imgsearch.store import Changes, Entry

    _add_all(store, files)
    twin = Entry(store.next_id, str(files / "twin.jpg"), "sha-a.jpg", 1, 1.0, None, 4, 4)
    store.commit(Changes(added=[twin], vectors=[_vector(9)]))  # a bug in a caller, not a rule of Sync
    problems, _ = store.verify(check_files=False)
    assert problems == ["1 contents are stored as more than one image (first: sha256 sha-a.jpg)"]
