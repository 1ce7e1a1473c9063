"""The command line, through click's runner and as a real subprocess.

These tests use the tiny-color encoder from tests/plugins (loaded with
--plugins-dir, the way a one-off plugin is) so that every command and error
path can be exercised quickly; the real encoders are tested on their own and
end to end in test_end_to_end.py.
"""

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image


from conftest import PLUGINS_DIR, SAMPLE_DATA, run

CLASSES = {"church", "english_springer", "garbage_truck", "parachute", "tench"}
QUERY = str(SAMPLE_DATA / "queries" / "church.jpg")


def test_index_summary_and_rerun_adds_nothing(tmp_path):
    target = tmp_path / "ix"
    first = run("index", SAMPLE_DATA / "labelled", "--index", target, "--encoder", "tiny-color", "--batch-size", "7")
    assert re.fullmatch(
        rf"added 50, updated 0, moved 0, unchanged 0, duplicates 0, skipped 0 in [0-9.]+ s; {re.escape(str(target))} holds 50 images\n",
        first.stdout,
    )
    assert "encoder: tiny-color (48-d, native)" in first.stderr
    again = run("index", SAMPLE_DATA / "labelled", "--index", target)
    assert again.stdout.startswith("added 0, updated 0, moved 0, unchanged 50, duplicates 0, skipped 0 ")


def test_changed_new_duplicate_and_bad_files(tmp_path, labelled_copy):
    target = tmp_path / "ix"
    run("index", labelled_copy, "--index", target, "--encoder", "tiny-color")
    church = sorted((labelled_copy / "church").iterdir())
    info_before = json.loads(run("info", "--index", target, "--format", "json").stdout)
    from imgsearch.store import Store

    with Store.open(target) as store:
        ids_before = {e.path: e.id for e in store.entries()}
        shas_before = {e.path: e.sha256 for e in store.entries()}
    with Image.open(church[0]) as image:                               # changed content
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(church[0], "JPEG")
    shutil.copy(church[2], labelled_copy / "church" / "copy.jpg")      # duplicate content
    (labelled_copy / "church" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run("index", labelled_copy, "--index", target)
    assert result.stdout.splitlines()[0].startswith("added 0, updated 1, moved 0, unchanged 49, duplicates 1, skipped 1 ")
    assert f"duplicate: {labelled_copy / 'church' / 'copy.jpg'} (same content as {church[2]})" in result.stderr
    assert f"skipped: {labelled_copy / 'church' / 'broken.jpg'}: not an image" in result.stderr
    info_after = json.loads(run("info", "--index", target, "--format", "json").stdout)
    assert info_after["count"] == info_before["count"] == 50
    from imgsearch.store import Store

    with Store.open(target) as store:
        entry = store.by_path()[str(church[0])]
        assert entry.id == ids_before[str(church[0])]
        assert entry.sha256 != shas_before[str(church[0])]
        assert {e.path: e.id for e in store.entries()} == ids_before


def test_query_formats_and_self_exclusion(index_dir):
    table = run("query", QUERY, "--index", index_dir, "-k", "3").stdout.splitlines()
    assert table[0] == f"query: {QUERY}"
    assert table[1].split() == ["rank", "score", "label", "path"]
    assert [line.split()[0] for line in table[2:]] == ["1", "2", "3"]

    lines = run("query", QUERY, QUERY, "--index", index_dir, "-k", "4", "--format", "json").stdout.splitlines()
    assert len(lines) == 2
    record = json.loads(lines[0])
    assert record["query"] == QUERY
    assert [r["rank"] for r in record["results"]] == [1, 2, 3, 4]
    scores = [r["score"] for r in record["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)
    assert {r["label"] for r in record["results"]} <= CLASSES
    assert all(os.path.isfile(r["path"]) for r in record["results"])

    rows = list(csv.DictReader(io.StringIO(run("query", QUERY, "--index", index_dir, "-k", "2", "--format", "csv").stdout)))
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert [r["path"] for r in rows] == [r["path"] for r in record["results"][:2]]

    indexed = sorted((SAMPLE_DATA / "labelled" / "tench").iterdir())[0]
    own = json.loads(run("query", indexed, "--index", index_dir, "-k", "3", "--format", "json").stdout)
    assert str(indexed) not in [r["path"] for r in own["results"]] and len(own["results"]) == 3
    with_self = json.loads(run("query", indexed, "--index", index_dir, "-k", "3", "--include-self", "--format", "json").stdout)
    assert with_self["results"][0]["path"] == str(indexed)
    assert with_self["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [r["path"] for r in with_self["results"][1:]] == [r["path"] for r in own["results"][:2]]


def test_k_larger_than_the_index_warns_and_returns_all(index_dir):
    result = run("query", QUERY, "--index", index_dir, "-k", "80", "--format", "json")
    assert "warning: k=80 but the index holds 50 images" in result.stderr
    assert len(json.loads(result.stdout)["results"]) == 50


def test_classify_formats(index_dir):
    queries = sorted(str(p) for p in (SAMPLE_DATA / "queries").iterdir())
    records = [json.loads(line) for line in run("classify", *queries, "--index", index_dir, "-k", "5", "--format", "json").stdout.splitlines()]
    assert [r["path"] for r in records] == queries
    for record in records:
        assert record["label"] in CLASSES
        assert len(record["neighbors"]) == 5
        # The winner's share of exp(score / 0.07) over the five neighbours,
        # and no label has a larger share.
        weights = {}
        for neighbour in record["neighbors"]:
            weights[neighbour["label"]] = weights.get(neighbour["label"], 0.0) + math.exp(neighbour["score"] / 0.07)
        assert record["confidence"] == pytest.approx(weights[record["label"]] / sum(weights.values()), abs=1e-4)
        assert weights[record["label"]] == max(weights.values())
        assert set(record["neighbors"][0]) == {"rank", "path", "score", "label"}
    majority = [json.loads(line) for line in run("classify", *queries, "--index", index_dir, "-k", "5", "--vote", "majority", "--format", "json").stdout.splitlines()]
    for record in majority:
        votes = sum(n["label"] == record["label"] for n in record["neighbors"])
        assert record["confidence"] == pytest.approx(votes / 5)
    rows = list(csv.DictReader(io.StringIO(run("classify", queries[0], "--index", index_dir, "--format", "csv").stdout)))
    assert rows[0]["label"] == records[0]["label"]
    table = run("classify", queries[0], "--index", index_dir, "-k", "5").stdout.splitlines()
    assert table[0].split()[:3] == ["image", "label", "confidence"]
    assert table[1].startswith(queries[0])


def test_info_and_encoders(index_dir):
    facts = json.loads(run("info", "--index", index_dir, "--format", "json").stdout)
    assert facts["count"] == 50 and facts["encoder"] == "tiny-color" and facts["dim"] == 48
    assert facts["labels"] == {name: 10 for name in CLASSES}
    table = run("info", "--index", index_dir).stdout
    assert "count:               50" in table and "tench              10" in table
    listed = [json.loads(line) for line in run("encoders", "--format", "json").stdout.splitlines()]
    assert [e["name"] for e in listed] == ["efficientnet-lite0", "lite0-any-precision", "resnet50", "saved-model",
                                           "tiny-color"]
    # saved-model's dimension is its model's; without one it has none.
    assert {e["name"]: e["dim"] for e in listed} == {"efficientnet-lite0": 1280, "lite0-any-precision": 1280,
                                                     "resnet50": 2048, "saved-model": 0, "tiny-color": 48}
    # What each offers: measured quality for the built-in ones, fp32 alone without a Keras model.
    assert {e["name"]: e["precisions"] for e in listed} == {
        "efficientnet-lite0": ["fp32"], "lite0-any-precision": ["fp32", "bf16", "int8"],
        "resnet50": ["fp32", "bf16", "int8"], "saved-model": ["fp32", "bf16", "int8"], "tiny-color": ["fp32"]}
    assert {e["name"]: e["weights_available"] for e in listed}["efficientnet-lite0"] is True
    assert run("encoders").stdout.splitlines()[0].split()[:2] == ["name", "dim"]


def test_labels_csv_overrides_folder_names(tmp_path):
    photos = sorted((SAMPLE_DATA / "labelled" / "tench").iterdir())[:3]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},fish\n" for p in photos[:2]))
    target = tmp_path / "ix"
    run("index", *photos, "--index", target, "--encoder", "tiny-color", "--labels", labels)
    assert json.loads(run("info", "--index", target, "--format", "json").stdout)["labels"] == {"fish": 2}


def test_errors_are_one_line_with_the_right_exit_code(tmp_path, index_dir):
    before = sorted(p.name for p in index_dir.iterdir())
    assert "no index at" in run("query", QUERY, "--index", tmp_path / "nothing", code=1).stderr
    (tmp_path / "photos").mkdir()
    shutil.copy(QUERY, tmp_path / "photos" / "a.jpg")
    assert "not an imgsearch index" in run("query", QUERY, "--index", tmp_path / "photos", code=1).stderr
    assert "not empty" in run("index", SAMPLE_DATA / "queries", "--index", tmp_path / "photos", "--encoder", "tiny-color", code=1).stderr
    run("query", QUERY, "--index", index_dir, "-k", "0", code=2)
    run("query", QUERY, "--index", index_dir, "-k", "-3", code=2)
    run("query", tmp_path / "missing.jpg", "--index", index_dir, code=2)
    run("classify", QUERY, "--index", index_dir, "--vote", "loudest", code=2)
    err = run("index", SAMPLE_DATA / "queries", "--index", tmp_path / "new", "--encoder", "nope", code=2).stderr
    assert "unknown encoder 'nope'; registered encoders: efficientnet-lite0, lite0-any-precision, resnet50, saved-model, tiny-color" in err
    assert not (tmp_path / "new").exists()
    err = run("index", SAMPLE_DATA / "queries", "--index", index_dir, "--encoder", "resnet50", code=2).stderr
    assert "was built with encoder 'tiny-color', not 'resnet50'" in err
    for command in ("query", "classify"):
        err = run(command, QUERY, "--index", index_dir, "--encoder", "efficientnet-lite0", code=2).stderr
        assert "was built with encoder 'tiny-color', not 'efficientnet-lite0'" in err
    (tmp_path / "empty").mkdir()
    assert "no image files found" in run("index", tmp_path / "empty", "--index", index_dir, code=2).stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert f"cannot read query image {bad}" in run("query", bad, "--index", index_dir, code=1).stderr
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nonly-a-path\n")
    assert "line 2: expected 'path,label'" in run("index", SAMPLE_DATA / "queries", "--index", index_dir, "--labels", labels, code=2).stderr
    assert sorted(p.name for p in index_dir.iterdir()) == before
    assert json.loads(run("info", "--index", index_dir, "--format", "json").stdout)["count"] == 50


def test_classify_needs_labels(tmp_path):
    target = tmp_path / "ix"
    run("index", SAMPLE_DATA / "queries", "--index", target, "--encoder", "tiny-color")
    assert "has no labels" in run("classify", QUERY, "--index", target, code=2).stderr


def test_help_everywhere_and_version():
    for command in ([], ["index"], ["query"], ["classify"], ["info"], ["encoders"]):
        assert "Usage:" in run(*command, "-h").stdout
    assert "Example" in run("query", "--help").stdout
    from imgsearch import __version__

    assert run("--version").stdout.strip() == f"imgsearch, version {__version__}"


@pytest.mark.slow
def test_real_subprocess_end_to_end(tmp_path):
    exe = shutil.which("imgsearch", path=os.path.dirname(sys.executable)) or shutil.which("imgsearch")
    env = dict(os.environ, IMGSEARCH_PLUGINS_DIR=str(PLUGINS_DIR), IMGSEARCH_INDEX=str(tmp_path / "ix"))

    def call(*args, code=0):
        done = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env)
        assert done.returncode == code, done.stderr
        return done

    assert call("index", SAMPLE_DATA / "labelled", "--encoder", "tiny-color").stdout.startswith("added 50,")
    assert json.loads(call("query", QUERY, "-k", "2", "--format", "json").stdout)["query"] == QUERY
    assert json.loads(call("classify", QUERY, "--format", "json").stdout)["label"] in CLASSES
    assert json.loads(call("info", "--format", "json").stdout)["count"] == 50
    assert "tiny-color" in call("encoders").stdout
    failed = call("query", QUERY, "--index", tmp_path / "none", code=1)
    assert failed.stderr.strip().splitlines() == [f"Error: no index at {tmp_path / 'none'} (create one with 'imgsearch index')"]
    module = subprocess.run([sys.executable, "-m", "imgsearch", "--version"], capture_output=True, text=True)
    assert module.stdout.strip().startswith("imgsearch, version")


def test_a_failed_first_run_leaves_no_index_behind(tmp_path):
    run("index", tmp_path / "nothing-here", "--index", tmp_path / "ix", "--encoder", "tiny-color", code=2)
    assert not (tmp_path / "ix").exists()
    (tmp_path / "given").mkdir()  # a folder the user made stays, empty
    run("index", tmp_path / "nothing-here", "--index", tmp_path / "given", "--encoder", "tiny-color", code=2)
    assert list((tmp_path / "given").iterdir()) == []
    # and the next run may choose any encoder
    run("index", SAMPLE_DATA / "queries", "--index", tmp_path / "ix", "--encoder", "tiny-color")


def test_bad_numbers_and_unwritable_places(tmp_path, index_dir):
    for value in ("nan", "inf", "-1", "0", "lots"):
        run("index", SAMPLE_DATA / "queries", "--index", index_dir, "--max-megapixels", value, code=2)
        run("classify", QUERY, "--index", index_dir, "--temperature", value, code=2)
    (tmp_path / "file").write_text("x")
    err = run("index", SAMPLE_DATA / "queries", "--index", tmp_path / "file" / "ix", "--encoder", "tiny-color", code=1).stderr
    assert "cannot create index folder" in err


def test_paths_are_normalised(index_dir):
    odd = SAMPLE_DATA / "labelled" / ".." / "labelled" / "tench"
    result = run("index", odd, "--index", index_dir)
    assert result.stdout.startswith("added 0, updated 0, moved 0, unchanged 10, duplicates 0, skipped 0 ")


def test_labels_csv_relabels_indexed_images_and_warns_about_unknown_rows(tmp_path):
    photos = sorted((SAMPLE_DATA / "labelled" / "tench").iterdir())[:3]
    target = tmp_path / "ix"
    run("index", *photos, "--index", target, "--encoder", "tiny-color")
    labels = tmp_path / "labels.csv"
    # a byte-order mark, as spreadsheets write it, and one row for no image
    labels.write_text("\ufeffpath,label\n" + "".join(f"{p},fish\n" for p in photos) + "gone.jpg,x\n", encoding="utf-8")
    result = run("index", *photos, "--index", target, "--labels", labels)
    assert "relabelled 3 indexed images" in result.stdout
    assert f"warning: 1 row of {labels} name no image found here (first: {tmp_path / 'gone.jpg'})" in result.stderr
    assert json.loads(run("info", "--index", target, "--format", "json").stdout)["labels"] == {"fish": 3}


def test_a_file_changed_into_a_copy_of_another_loses_its_stale_entry(tmp_path, labelled_copy):
    target = tmp_path / "ix"
    run("index", labelled_copy, "--index", target, "--encoder", "tiny-color")
    church = sorted((labelled_copy / "church").iterdir())
    shutil.copy(church[1], church[0])
    result = run("index", labelled_copy, "--index", target)
    assert result.stdout.startswith("added 0, updated 0, moved 0, unchanged 49, duplicates 1, skipped 0 ")
    from imgsearch.store import Store

    with Store.open(target) as store:
        assert store.count == 49
        assert str(church[0]) not in store.by_path()


def test_environment_encoder_only_chooses_for_new_indexes(index_dir, monkeypatch):
    monkeypatch.setenv("IMGSEARCH_ENCODER", "efficientnet-lite0")
    assert run("index", SAMPLE_DATA / "queries", "--index", index_dir).stdout.startswith("added 5,")


def test_offline_resnet50_download_failure_through_the_cli(tmp_path, monkeypatch):
    import imgsearch_resnet50

    monkeypatch.setattr(imgsearch_resnet50, "WEIGHTS_URL", "http://127.0.0.1:9/" + imgsearch_resnet50.WEIGHTS_FILE)
    err = run("index", SAMPLE_DATA / "queries", "--index", tmp_path / "ix", code=1).stderr
    assert imgsearch_resnet50.WEIGHTS_FILE in err and "--encoder efficientnet-lite0" in err
    assert not (tmp_path / "ix").exists()


def test_a_very_thin_panorama_is_indexed(tmp_path):
    Image.new("RGB", (20000, 3), (200, 10, 10)).save(tmp_path / "strip.png")
    result = run("index", tmp_path / "strip.png", "--index", tmp_path / "ix", "--encoder", "tiny-color")
    assert result.stdout.startswith("added 1,")


def test_a_first_run_where_every_file_is_bad_creates_no_index(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"")
    err = run("index", tmp_path / "bad.jpg", "--index", tmp_path / "ix", "--encoder", "tiny-color", code=1).stderr
    assert "none of the 1 files could be indexed" in err and "empty file" in err
    assert not (tmp_path / "ix").exists()


def test_output_into_a_closed_pipe_is_quiet(index_dir):
    exe = shutil.which("imgsearch", path=os.path.dirname(sys.executable)) or shutil.which("imgsearch")
    # far more output than a pipe buffers, so the writer meets the closed pipe
    queries = " ".join([f"'{QUERY}'"] * 300)
    done = subprocess.run(f"'{exe}' --plugins-dir '{PLUGINS_DIR}' query {queries} --index '{index_dir}' "
                          f"-k 50 --format json | head -c 1", shell=True, capture_output=True, text=True)
    assert done.stderr == "" and done.stdout == "{"


def test_an_occupied_folder_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    import imgsearch_resnet50

    def no_download(self):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(imgsearch_resnet50.ResNet50Encoder, "load", no_download)
    err = run("index", SAMPLE_DATA / "queries", "--index", SAMPLE_DATA, code=1).stderr
    assert "not an imgsearch index and not empty" in err


def test_verify_reports_damage_and_repairs_the_manifest_copy(index_dir):
    ok = run("verify", "--index", index_dir).stdout
    assert ok.strip() == "ok: 50 images and 0 identical copies (stored once), dimension 48, 1 segment"
    manifest = index_dir / "manifest.json"
    manifest.write_text("{ not json")
    for args in (["info"], ["query", QUERY], ["index", SAMPLE_DATA / "queries"], ["remove", QUERY]):
        err = run(*args, "--index", index_dir, code=1).stderr
        assert "manifest.json of index" in err and "missing or damaged" in err
    assert manifest.read_text() == "{ not json"  # never overwritten silently
    run("verify", "--index", index_dir, code=1)
    assert run("verify", "--index", index_dir, "--repair").stdout.splitlines()[-1].startswith("ok: 50 images")
    assert json.loads(run("info", "--index", index_dir, "--format", "json").stdout)["count"] == 50

    vectors = next(index_dir.glob("seg-*.vec"))
    data = bytearray(vectors.read_bytes())
    data[-5] ^= 0xFF  # still a readable FAISS file, with one vector changed
    vectors.write_bytes(bytes(data))
    for args in (["verify"], ["info"], ["query", QUERY], ["index", SAMPLE_DATA / "queries"]):
        err = run(*args, "--index", index_dir, code=1).stderr
        assert f"{vectors.name} does not match the checksum recorded when it was written" in err
    assert vectors.read_bytes() == bytes(data)  # nothing sealed the damage in


def test_remove_and_prune(tmp_path, labelled_copy):
    target = tmp_path / "ix"
    run("index", labelled_copy, "--index", target, "--encoder", "tiny-color")
    result = run("remove", labelled_copy / "tench", labelled_copy / "church" / "nope.jpg", "--index", target)
    assert result.stdout.startswith(f"removed 10 images and 0 identical copies; {target} holds 40 images")
    assert f"warning: not in the index: {labelled_copy / 'church' / 'nope.jpg'}" in result.stderr
    run("remove", labelled_copy / "tench", "--index", target, code=1)
    shutil.rmtree(labelled_copy / "parachute")
    note = run("verify", "--index", target).stdout
    assert "note: 10 indexed files no longer exist" in note
    pruned = run("index", labelled_copy, "--index", target, "--prune").stdout
    assert pruned.startswith("added 10,")  # the tench photos are still on disk
    assert "pruned 10 images and 0 identical copies whose files are gone" in pruned
    facts = json.loads(run("info", "--index", target, "--format", "json").stdout)
    assert facts["count"] == 40 and "parachute" not in facts["labels"] and facts["labels"]["tench"] == 10
    assert "note:" not in run("verify", "--index", target).stdout
    run("remove", labelled_copy, "--index", target)
    assert "is empty" in run("query", QUERY, "--index", target, code=1).stderr


def test_moved_files_keep_their_vectors(tmp_path, labelled_copy):
    target = tmp_path / "ix"
    run("index", labelled_copy, "--index", target, "--encoder", "tiny-color")
    from imgsearch.store import Store

    with Store.open(target) as store:
        before = {e.path: e.id for e in store.entries()}
    (labelled_copy / "tench").rename(labelled_copy / "fish")
    result = run("index", labelled_copy, "--index", target, "--prune")
    assert result.stdout.startswith("added 0, updated 0, moved 10, unchanged 40, duplicates 0, skipped 0 ")
    assert "pruned 0 images" in result.stdout
    with Store.open(target) as store:
        after = {e.path: e.id for e in store.entries()}
        assert store.labels()["fish"] == 10 and "tench" not in store.labels()
    assert sorted(after.values()) == sorted(before.values())
    for path, image_id in before.items():
        assert after[path.replace("/tench/", "/fish/")] == image_id


def test_errors_file_is_checked_before_any_work(tmp_path, index_dir):
    before = {p.name: p.read_bytes() for p in index_dir.iterdir() if p.is_file()}
    err = run("index", SAMPLE_DATA / "queries", "--index", index_dir, "--errors", index_dir / "metadata.sqlite",
              code=2).stderr
    assert "inside the index folder" in err
    err = run("index", SAMPLE_DATA / "queries", "--index", index_dir, "--errors", tmp_path / "no" / "such" / "e.csv",
              code=2).stderr
    assert "cannot write --errors file" in err
    assert {p.name: p.read_bytes() for p in index_dir.iterdir() if p.is_file()} == before
    assert json.loads(run("info", "--index", index_dir, "--format", "json").stdout)["count"] == 50


def test_labels_csv_rows_must_be_exact_and_consistent(tmp_path, index_dir):
    photo = sorted((SAMPLE_DATA / "labelled" / "tench").iterdir())[0]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{photo},fish,extra\n")
    assert "line 2: expected 'path,label'" in run("index", photo, "--index", index_dir, "--labels", labels, code=2).stderr
    labels.write_text(f"{photo},fish\n{photo},carp\n")
    assert "line 2:" in run("index", photo, "--index", index_dir, "--labels", labels, code=2).stderr


def test_a_file_name_that_is_not_utf8_is_skipped(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(QUERY, folder / "fine.jpg")
    shutil.copy(QUERY.replace("church", "tench"), os.fsencode(folder) + b"/bad\xffname.jpg")
    result = run("index", folder, "--index", tmp_path / "ix", "--encoder", "tiny-color")
    assert result.stdout.startswith("added 1,")
    assert "file name is not valid UTF-8" in result.stderr


def test_verify_waits_for_no_writer(index_dir):
    from imgsearch.store import Store

    with Store.open(index_dir, writable=True):
        assert "being written by another process" in run("verify", "--index", index_dir, code=1).stderr
    assert run("verify", "--index", index_dir).stdout.startswith("ok:")


def test_a_copy_takes_over_when_the_original_file_is_gone(tmp_path, labelled_copy):
    target = tmp_path / "ix"
    original = sorted((labelled_copy / "church").iterdir())[0]
    copy = labelled_copy / "church" / "zz copy.jpg"
    shutil.copy(original, copy)
    run("index", labelled_copy, "--index", target, "--encoder", "tiny-color")
    original.unlink()
    run("index", labelled_copy, "--index", target)
    found = json.loads(run("query", copy, "--index", target, "-k", "1", "--include-self", "--format", "json").stdout)
    assert found["results"][0]["path"] == str(copy) and "also_at" not in found["results"][0]


def test_backend_options_without_a_backend_name_the_option_as_typed(tmp_path):
    """--milvus-uri is an alias of --backend-uri: the error names both, and
    nothing is created."""
    target = tmp_path / "ix"
    result = run("index", SAMPLE_DATA / "labelled", "--index", target, "--milvus-uri", tmp_path / "v.db", code=2)
    assert "--milvus-uri" in result.stderr and "--backend milvus" in result.stderr
    assert not target.exists()
