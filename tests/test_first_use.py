"""What a new user meets first: options that match the messages, checks made
before heavy work, and what is reported on stderr."""

import json

from PIL import Image

from conftest import SAMPLE_DATA, run


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
