"""What a new user meets first: options that match the messages, checks made
before heavy work, and what is reported on stderr."""

import json
import shutil
from pathlib import Path

import pytest
import click
from click.testing import CliRunner
from PIL import Image

from conftest import SAMPLE_DATA, run

QUERY = SAMPLE_DATA / "queries" / "church.jpg"

BROKEN_PLUGINS = Path(__file__).resolve().parent / "plugins_broken"


def run_broken(*args, code):
    """The CLI with the encoder whose model never loads (see plugins_broken/)."""
    from imgsearch.cli import main

    result = CliRunner().invoke(main, ["--plugins-dir", str(BROKEN_PLUGINS), *map(str, args)])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert [line for line in result.stderr.splitlines() if line.startswith("Error:")] == result.stderr.splitlines()[-1:]
    return result


def _large_png(path, side=12000):
    # 144 megapixels in a tiny file: one bit a pixel, all zero.
    Image.new("1", (side, side)).save(path)
    return path


def test_query_classify_and_evaluate_take_max_megapixels(index_dir, tmp_path):
    big = _large_png(tmp_path / "big.png")
    refused = run("query", big, "--index", index_dir, code=1)
    assert "image too large (12000x12000, 144 megapixels; limit 100, see --max-megapixels)" in refused.stderr
    found = run("query", big, "--index", index_dir, "-k", "2", "--max-megapixels", "150", "--format", "json")
    assert len(json.loads(found.stdout)["results"]) == 2
    run("classify", big, "--index", index_dir, code=1)
    labelled = run("classify", big, "--index", index_dir, "--max-megapixels", "150", "--format", "json")
    assert json.loads(labelled.stdout)["label"] is not None
    test_folder = tmp_path / "test" / "church"
    test_folder.mkdir(parents=True)
    _large_png(test_folder / "big.png")
    (test_folder / "small.jpg").write_bytes((SAMPLE_DATA / "queries" / "church.jpg").read_bytes())
    skipped = run("evaluate", "--index", index_dir, "--test", tmp_path / "test", "-k", "1", "--format", "json")
    assert "big.png: image too large" in skipped.stderr
    assert json.loads(skipped.stdout)["n"] == 1
    counted = run("evaluate", "--index", index_dir, "--test", tmp_path / "test", "-k", "1", "--format", "json",
                  "--max-megapixels", "150")
    assert "too large" not in counted.stderr
    assert json.loads(counted.stdout)["n"] == 2


def test_a_bad_report_folder_is_refused_before_the_evaluation(index_dir, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for bad in (a_file / "report", a_file / "deeper" / "report"):
        words = f"Error: --report {bad} cannot be created: {a_file} is not a folder"
        refused = run("evaluate", "--index", index_dir, "--leave-one-out", "-k", "1", "--report", bad, code=2)
        assert refused.stdout == ""  # nothing was evaluated first
        assert words in refused.stderr
    good = run("evaluate", "--index", index_dir, "--leave-one-out", "-k", "1", "--report", tmp_path / "new" / "report")
    assert (tmp_path / "new" / "report" / "metrics.json").is_file() and "top1" in good.stdout.lower()


def test_no_output_lands_inside_the_index_folder(index_dir, tmp_path):
    """--report, --html and export are refused inside the index folder,
    before any work, and the index is left as it was."""
    before = sorted((p.name, p.stat().st_size) for p in index_dir.iterdir())
    for args in (("evaluate", "--index", index_dir, "--leave-one-out", "-k", "1", "--report", index_dir / "report"),
                 ("query", QUERY, "--index", index_dir, "--html", index_dir / "sheet.html"),
                 ("export", index_dir / "all.jsonl", "--index", index_dir)):
        refused = run(*args, code=2)
        assert "inside the index folder" in refused.stderr and refused.stdout == "", args
    assert sorted((p.name, p.stat().st_size) for p in index_dir.iterdir()) == before


def test_a_missing_folder_is_named_before_any_model_loads(tmp_path):
    missing = tmp_path / "nonexistent_dir"
    refused = run_broken("index", missing, "--index", tmp_path / "new", "--encoder", "broken", code=2)
    assert refused.stderr == f"Error: no image files found in {missing} (no such file or folder)\n"
    assert not (tmp_path / "new").exists()
    # With a folder that exists, the model is what fails.
    loaded = run_broken("index", SAMPLE_DATA / "queries", "--index", tmp_path / "new", "--encoder", "broken", code=1)
    assert "weights of broken cannot be downloaded here" in loaded.stderr


@pytest.mark.slow
def test_other_weights_are_refused_before_a_model_is_built_or_exported(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("IMGSEARCH_CACHE_DIR", str(cache))
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("church.jpg", "tench.jpg"):
        shutil.copy(SAMPLE_DATA / "queries" / name, photos / name)
    run("index", photos, "--index", tmp_path / "ix", "--encoder", "efficientnet-lite0", "--runtime", "keras")
    refused = run("query", photos / "church.jpg", "--index", tmp_path / "ix", "--weights", "none", code=2)
    assert "was built with other efficientnet-lite0 weights" in refused.stderr
    # No random-weights model was exported into the cache on the way.
    assert not (cache / "openvino").exists()


@pytest.mark.slow
def test_the_library_prints_nothing_and_the_cli_shows_its_notices(tmp_path):
    import os
    import subprocess
    import sys

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(SAMPLE_DATA / "queries" / "tench.jpg", photos / "tench.jpg")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    # A cold cache: TensorFlow is imported and the model exported, which
    # logs a notice and makes TensorFlow's C++ logs speak.
    code = ("from imgsearch import Index\n"
            "with Index.build('ix', encoder='efficientnet-lite0') as index:\n"
            "    print(index.add(['photos']).added)\n")
    library = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env=dict(env, IMGSEARCH_CACHE_DIR=str(tmp_path / "cache-a")))
    assert library.returncode == 0, library.stderr
    assert (library.stdout, library.stderr) == ("1\n", "")
    command = subprocess.run([sys.executable, "-m", "imgsearch", "index", "photos", "--index", "ix2", "--encoder",
                              "efficientnet-lite0"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             env=dict(env, IMGSEARCH_CACHE_DIR=str(tmp_path / "cache-b")))
    assert command.returncode == 0, command.stderr
    assert command.stderr.splitlines()[0].startswith("exporting efficientnet-lite0 to OpenVINO")
    assert "cuInit" not in command.stderr and "oneDNN" not in command.stderr


def test_the_top_level_help_shows_each_command_s_first_sentence_whole():
    from imgsearch.cli import main

    shown = CliRunner().invoke(main, ["--help"], terminal_width=80).stdout
    commands = " ".join(shown.split("Commands:")[1].split())
    assert "train-classifier Fit a linear classifier on the labelled index's features." in commands
    assert "verify Check an index: metadata, vectors and manifest against each other." in commands
    assert "..." not in commands
    assert "offline, index with --encoder efficientnet-lite0" in " ".join(shown.split())


def test_encoders_names_the_default_and_what_to_use_when_its_weights_are_missing(monkeypatch):
    listed = [json.loads(line) for line in run("encoders", "--format", "json").stdout.splitlines()]
    assert [row["name"] for row in listed if row["default"]] == ["resnet50"]
    monkeypatch.setenv("IMGSEARCH_ENCODER", "tiny-color")
    listed = [json.loads(line) for line in run("encoders", "--format", "json").stdout.splitlines()]
    assert [row["name"] for row in listed if row["default"]] == ["tiny-color"]
    table = run("encoders").stdout
    assert "tiny-color (default)" in table and "resnet50 (default)" not in table
    # Weights missing (as resnet50's are before their first download):
    # the note names an encoder that can run here.
    monkeypatch.setenv("IMGSEARCH_ENCODER", "resnet50")
    monkeypatch.setenv("IMGSEARCH_RESNET50_WEIGHTS", "/nonexistent/weights.h5")
    shown = run("encoders")
    resnet = next(line for line in shown.stdout.splitlines() if line.startswith("resnet50"))
    assert resnet.split()[:4] == ["resnet50", "(default)", "2048", "no"]
    assert shown.stderr.splitlines()[-1] == (
        "note: new indexes use resnet50 unless --encoder says otherwise, and its weights are not here; "
        "where they cannot be fetched, pass --encoder efficientnet-lite0")


def test_every_option_of_every_command_says_what_it_does():
    from imgsearch.cli import main

    bare = [f"{name} {param.opts[0]}" for name, command in sorted(main.commands.items())
            for param in command.params if isinstance(param, click.Option) and not param.help]
    assert bare == []


def test_k_lists_and_c_values_are_checked_with_the_option_named(index_dir):
    refused = run("evaluate", "--index", index_dir, "--leave-one-out", "-k", "1,,5", code=2)
    assert "'1,,5' is not a comma-separated list of numbers" in refused.stderr
    warned = run("evaluate", "--index", index_dir, "--leave-one-out", "-k", "1,5000", "--format", "json")
    assert "warning: k=5000 but the index holds 50 labelled images" in warned.stderr
    refused = run("train-classifier", "--index", index_dir, "--C", "0", code=2)
    assert "Invalid value for '--C': '0' must be a finite number above zero" in refused.stderr


def test_plugins_dir_may_follow_the_command(tmp_path):
    from imgsearch.cli import main

    from conftest import PLUGINS_DIR

    for args in (["encoders", "--plugins-dir", str(PLUGINS_DIR), "--format", "json"],
                 ["encoders", "--format", "json", f"--plugins-dir={PLUGINS_DIR}"]):
        listed = CliRunner().invoke(main, args)
        assert listed.exit_code == 0, listed.stderr
        assert "tiny-color" in [json.loads(line)["name"] for line in listed.stdout.splitlines()]
    # An index made with a plugin's encoder, the option after the command.
    made = CliRunner().invoke(main, ["index", str(SAMPLE_DATA / "queries"), "--index", str(tmp_path / "ix"),
                                     "--encoder", "tiny-color", "--plugins-dir", str(PLUGINS_DIR)])
    assert made.exit_code == 0, made.stderr


def test_classify_and_query_report_progress_a_batch_at_a_time(index_dir):
    from imgsearch.index import Index

    from conftest import PLUGINS_DIR

    photos = sorted((SAMPLE_DATA / "labelled").rglob("*.jpg"))[:20]
    with Index.open(index_dir, plugins_dir=PLUGINS_DIR) as index:
        calls = []
        decided = index.classify(photos, k=5, progress=lambda done, total: calls.append((done, total)))
        assert calls == [(8, 20), (16, 20), (20, 20)]  # tiny-color embeds 8 at a time
        assert len(decided) == 20
        calls.clear()
        found = index.query(photos[:3], k=2, progress=lambda done, total: calls.append((done, total)))
        assert calls == [(3, 3)] and [len(r.hits) for r in found] == [2, 2, 2]


def test_info_counts_unlabelled_images_and_says_whether_a_classifier_is_trained(index_dir, tmp_path):
    facts = json.loads(run("info", "--index", index_dir, "--format", "json").stdout)
    assert (facts["count"], facts["unlabelled"], facts["classifier"]) == (50, 0, None)
    assert "classifier:          none (imgsearch train-classifier)" in run("info", "--index", index_dir).stdout
    run("train-classifier", "--index", index_dir, "--C", "1")
    facts = json.loads(run("info", "--index", index_dir, "--format", "json").stdout)
    assert facts["classifier"] == {"method": "logreg", "labels": 5, "current": True, "damaged": False}
    run("index", SAMPLE_DATA / "queries", "--index", index_dir)  # unlabelled photos, a new index state
    facts = json.loads(run("info", "--index", index_dir, "--format", "json").stdout)
    assert (facts["count"], facts["unlabelled"], facts["classifier"]["current"]) == (55, 5, False)
    shown = run("info", "--index", index_dir).stdout
    assert "unlabelled:          5" in shown and "stale: the index changed since" in shown


def test_a_new_index_interrupted_before_its_first_commit_says_it_was_removed(tmp_path, registry):
    from imgsearch.errors import Interrupted
    from imgsearch.index import Index

    def interrupted(pixels):
        raise KeyboardInterrupt  # Ctrl-C while the first batch is embedded

    index = Index.build(tmp_path / "new", encoder="tiny-color", registry=registry)
    index.encoder.embed_pixels = interrupted
    with pytest.raises(Interrupted) as stopped, index:
        index.add([SAMPLE_DATA / "queries"])
    assert str(stopped.value) == "interrupted before any image was committed; the new index was removed"
    assert not (tmp_path / "new").exists()


def test_ctrl_c_on_a_terminal_puts_the_error_on_a_line_of_its_own(tmp_path):
    # A real terminal (a pseudo-terminal), since progress bars are drawn
    # only there; the paced test encoder keeps the run going meanwhile.
    import os
    import pty
    import signal
    import subprocess
    import sys
    import time

    plugins = Path(__file__).resolve().parent / "plugins_ray"
    primary, secondary = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "imgsearch", "--plugins-dir", str(plugins), "index",
                                str(SAMPLE_DATA / "labelled"), "--index", str(tmp_path / "ix"), "--encoder",
                                "paced-color", "--commit-every", "8"],
                               stdin=secondary, stdout=secondary, stderr=secondary,
                               env=dict(os.environ, IMGSEARCH_TEST_PACE_S="0.5"))
    os.close(secondary)
    seen, deadline = b"", time.monotonic() + 120
    try:
        while b"%" not in seen and time.monotonic() < deadline:  # the bar is drawn
            seen += os.read(primary, 4096)
        process.send_signal(signal.SIGINT)
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            seen += chunk
    finally:
        process.wait(60)
        os.close(primary)
    assert process.returncode == 130
    lines = seen.decode().replace("\r\n", "\n").split("\n")
    errors = [line for line in lines if "Error:" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: interrupted:"), lines


def test_a_damaged_index_says_what_to_do_and_info_still_shows_how_it_was_built(index_dir):
    vectors = next(index_dir.glob("seg-*.vec"))
    data = bytearray(vectors.read_bytes())
    data[-5] ^= 0xFF
    vectors.write_bytes(bytes(data))
    query = SAMPLE_DATA / "queries" / "tench.jpg"
    refused = run("query", query, "--index", index_dir, code=1).stderr
    assert "does not match the checksum recorded when it was written; 'imgsearch info' still shows how it " \
           "was built; a damaged file cannot be mended in place" in refused
    shown = run("info", "--index", index_dir, code=1)
    assert "encoder:             tiny-color" in shown.stdout and "count:               50" in shown.stdout
    facts = json.loads(run("info", "--index", index_dir, "--format", "json", code=1).stdout)
    assert (facts["damaged"], facts["count"], facts["encoder"], facts["dim"]) == (True, 50, "tiny-color", 48)


def test_the_confusion_picture_scales_the_errors_on_their_own(tmp_path):
    import numpy as np

    from imgsearch.evaluation import Scores
    from imgsearch.report import confusion_png

    confusion = np.array([[90, 2], [0, 80]])
    scores = Scores("knn", 5, "weighted", 172, 0.99, 1.0, 0.99, {}, confusion, ["cat", "dog"], [])
    with Image.open(confusion_png(scores, tmp_path / "m.png")) as picture:
        picture = picture.convert("RGB")
        pixels = np.asarray(picture)
    # The most frequent error is as dark as the fullest diagonal cell, in red.
    reds = {tuple(p) for p in pixels.reshape(-1, 3) if p[0] == 255 and p[1] == p[2] and p[1] < 250}
    blues = {tuple(p) for p in pixels.reshape(-1, 3) if p[2] == 255 and p[0] == p[1] and p[0] < 250}
    assert (255, 55, 55) in reds and (55, 55, 255) in blues


def test_query_takes_folders_filters_by_score_and_label_and_prints_paths(index_dir):
    queries = SAMPLE_DATA / "queries"

    def ranked(*args):
        out = run("query", *args, "--index", index_dir, "--format", "json").stdout
        return {json.loads(line)["query"]: json.loads(line)["results"] for line in out.splitlines()}

    everything = ranked(queries, "-k", "50")  # a folder: each photo in it, the whole index ranked
    assert sorted(Path(q).name for q in everything) == sorted(p.name for p in queries.glob("*.jpg"))
    by_label = ranked(queries, "-k", "3", "--label", "tench")
    scores = sorted({hit["score"] for hits in everything.values() for hit in hits})
    floor = round((scores[100] + scores[101]) / 2, 7)  # between two scores: rounding cannot matter
    by_score = ranked(queries, "-k", "50", "--min-score", str(floor))
    for query, hits in everything.items():
        # the same as filtering the full ranking, best first
        assert [h["path"] for h in by_label[query]] == [h["path"] for h in hits if h["label"] == "tench"][:3]
        assert [h["rank"] for h in by_label[query]] == [1, 2, 3]
        expected = [h for h in hits if h["score"] >= floor]
        assert [h["path"] for h in by_score[query]] == [h["path"] for h in expected]
    paths = run("query", queries / "church.jpg", "--index", index_dir, "-k", "4", "--format", "paths").stdout
    assert paths.splitlines() == [h["path"] for h in everything[str(queries / "church.jpg")][:4]]
    warned = run("query", queries / "church.jpg", "--index", index_dir, "--label", "unicorn")
    assert "no indexed image has the label 'unicorn'" in warned.stderr


def test_export_writes_every_image_once_with_its_vector_in_three_forms(labelled_copy, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from imgsearch.store import Store

    shutil.copy(SAMPLE_DATA / "queries" / "church.jpg", labelled_copy / "church" / "zz-copy.jpg")
    shutil.copy(SAMPLE_DATA / "queries" / "church.jpg", labelled_copy / "church" / "zz-copy2.jpg")
    target = tmp_path / "ix"
    run("index", labelled_copy, "--index", target, "--encoder", "tiny-color")
    with Store.open(target) as store:
        entries = store.entries()
        stored = store.vectors([e.id for e in entries])
        copy_of = store.alias_at(str(labelled_copy / "church" / "zz-copy2.jpg")).image_id

    run("export", tmp_path / "all.jsonl", "--index", target)
    lines = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [row["id"] for row in lines] == [e.id for e in entries]
    assert [row["path"] for row in lines] == [e.path for e in entries]
    np.testing.assert_allclose([row["vector"] for row in lines], stored, rtol=1e-6)
    assert {row["id"]: row["also_at"] for row in lines if row["also_at"]} == {
        copy_of: [str(labelled_copy / "church" / "zz-copy2.jpg")]}

    run("export", tmp_path / "npy", "--index", target, "--format", "npy")
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "vectors.npy"), stored)
    rows = [json.loads(line) for line in (tmp_path / "npy" / "metadata.jsonl").read_text().splitlines()]
    assert [(r["row"], r["id"], r["label"]) for r in rows] == [(n, e.id, e.label) for n, e in enumerate(entries)]

    run("export", tmp_path / "ix.parquet", "--index", target, "--format", "parquet")
    table = pq.read_table(tmp_path / "ix.parquet")
    assert table.column("path").to_pylist() == [e.path for e in entries]
    np.testing.assert_array_equal(np.array(table.column("vector").to_pylist(), dtype=np.float32), stored)

    listing = run("export", "-", "--index", target, "--no-vectors").stdout.splitlines()
    assert len(listing) == len(entries) and "vector" not in json.loads(listing[0])
    refused = run("export", tmp_path / "all.jsonl", "--index", target, code=2)
    assert "exists; choose a new file" in refused.stderr
    refused = run("export", tmp_path / "npy", "--index", target, "--format", "npy", code=2)
    assert "is not empty; choose a new one" in refused.stderr


def test_without_index_a_project_index_above_or_the_per_user_one_is_used(tmp_path, monkeypatch):
    import os

    project = tmp_path / "project"
    (project / "photos" / "new").mkdir(parents=True)
    monkeypatch.chdir(project / "photos" / "new")
    user_index = Path(os.environ["IMGSEARCH_DATA_DIR"]) / "index"  # set aside for tests by conftest

    made = run("index", SAMPLE_DATA / "queries", "--encoder", "tiny-color")
    assert f"index: {user_index} (the per-user default; --index names another)" in made.stderr
    facts = json.loads(run("info", "--format", "json").stdout)
    assert (facts["path"], facts["count"], facts["index_source"]) == (str(user_index), 5, "the per-user default")

    run("index", SAMPLE_DATA / "labelled" / "tench", "--index", project / ".imgsearch", "--encoder", "tiny-color")
    facts = json.loads(run("info", "--format", "json").stdout)  # found above, as git finds its repository
    assert (facts["path"], facts["count"]) == (str(project / ".imgsearch"), 10)
    assert facts["index_source"] == f"found in {project}"
    assert f"path:                {project / '.imgsearch'} (found in {project})" in run("info").stdout
    assert run("query", SAMPLE_DATA / "queries" / "tench.jpg", "-k", "1", "--format", "paths").stdout.startswith(
        str(SAMPLE_DATA / "labelled" / "tench"))

    monkeypatch.setenv("IMGSEARCH_INDEX", str(user_index))  # the environment names one: it wins
    facts = json.loads(run("info", "--format", "json").stdout)
    assert (facts["path"], facts["index_source"]) == (str(user_index), "IMGSEARCH_INDEX")
