"""Contact sheets (query/classify --html): one self-contained HTML page
whose tiles carry exactly what the JSON output says."""

import json
import os
import shutil
from html.parser import HTMLParser

from conftest import SAMPLE_DATA, run

QUERIES = sorted((SAMPLE_DATA / "queries").glob("*.jpg"))


class Page(HTMLParser):
    """Every element's attributes, and every attribute value that could
    load something from outside the page."""

    def __init__(self, text):
        super().__init__()
        self.elements = []
        self.text = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def tagged(self, tag, **wanted):
        return [a for t, a in self.elements if t == tag and all(k in a for k in wanted)]


def assert_self_contained(page: Page, raw: str):
    for tag, attrs in page.elements:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for key in ("src", "href", "srcset", "action", "data", "poster"):
            if key in attrs:
                assert attrs[key].startswith("data:image/"), (tag, key, attrs[key][:60])
    assert "url(" not in raw and "@import" not in raw and "://" not in raw.replace("data:image/", "")


def test_query_sheet_shows_every_neighbour_of_the_json(index_dir, tmp_path):
    sheet = tmp_path / "sheet.html"
    out = run("query", *QUERIES, "--index", index_dir, "-k", "4", "--format", "json", "--html", sheet)
    expected = [json.loads(line) for line in out.stdout.splitlines()]
    raw = sheet.read_text(encoding="utf-8")
    page = Page(raw)
    assert_self_contained(page, raw)
    rows = page.tagged("section", **{"data-query": ""})
    assert [r["data-query"] for r in rows] == [e["query"] for e in expected]
    tiles = page.tagged("figure", **{"data-rank": ""})
    shown = [(t["data-path"], float(t["data-score"]), t["data-label"], int(t["data-rank"])) for t in tiles]
    wanted = [(hit["path"], hit["score"], hit["label"] or "", hit["rank"])
              for e in expected for hit in e["results"]]
    assert shown == wanted and len(wanted) == 4 * len(QUERIES)
    # Each query and each neighbour has its picture, embedded.
    images = page.tagged("img", src="")
    assert len(images) == len(QUERIES) + len(wanted)
    assert all(i["src"].startswith("data:image/jpeg;base64,") for i in images)
    text = " ".join(page.text)
    assert f"{expected[0]['results'][0]['score']:.4f}" in text


def test_classify_sheet_shows_labels_and_voters(index_dir, tmp_path):
    sheet = tmp_path / "labels.html"
    out = run("classify", *QUERIES, "--index", index_dir, "-k", "5", "--format", "json", "--html", sheet)
    expected = [json.loads(line) for line in out.stdout.splitlines()]
    raw = sheet.read_text(encoding="utf-8")
    page = Page(raw)
    assert_self_contained(page, raw)
    rows = page.tagged("section", **{"data-query": ""})
    assert [(r["data-query"], r["data-label"], float(r["data-confidence"])) for r in rows] == [
        (e["path"], e["label"], e["confidence"]) for e in expected]
    tiles = page.tagged("figure", **{"data-rank": ""})
    assert [(t["data-path"], float(t["data-score"]), t["data-label"]) for t in tiles] == [
        (n["path"], n["score"], n["label"] or "") for e in expected for n in e["neighbors"]]


def test_sheet_escapes_names_and_survives_a_missing_file(tmp_path):
    # A label and a file name with markup in them, and an indexed file
    # deleted before the sheet is made: the page stays one valid page.
    photos = tmp_path / "photos" / "<b>odd</b>"
    photos.mkdir(parents=True)
    sources = sorted((SAMPLE_DATA / "labelled" / "tench").glob("*.jpg"))[:3]
    for number, source in enumerate(sources):
        shutil.copy(source, photos / f'x"{number}<i>.jpg')
    index = tmp_path / "ix"
    run("index", tmp_path / "photos", "--index", index, "--encoder", "tiny-color")
    gone = photos / 'x"0<i>.jpg'
    os.remove(gone)
    sheet = tmp_path / "sheet.html"
    run("query", QUERIES[0], "--index", index, "-k", "3", "--html", sheet)
    raw = sheet.read_text(encoding="utf-8")
    page = Page(raw)
    assert not page.tagged("b") and not page.tagged("i")
    assert "&lt;b&gt;odd&lt;/b&gt;" in raw
    tiles = page.tagged("figure", **{"data-rank": ""})
    assert {t["data-path"] for t in tiles} == {str(photos / f'x"{n}<i>.jpg') for n in range(3)}
    assert "no preview: cannot read file" in " ".join(page.text)
    assert len(page.tagged("img", src="")) == 1 + 2


def test_bad_html_paths_fail_before_any_work(index_dir, tmp_path):
    for target, message in ((tmp_path, "is a directory"), (tmp_path / "nope" / "a.html", "does not exist"),
                            (index_dir / "sheet.html", "inside the index folder")):
        result = run("query", QUERIES[0], "--index", index_dir, "--html", target, code=2)
        assert message in result.stderr
    assert not (index_dir / "sheet.html").exists()
    result = run("classify", QUERIES[0], "--index", index_dir, "--html", index_dir / "x.html", code=2)
    assert "inside the index folder" in result.stderr


def test_evaluation_page_shows_metrics_matrix_and_who_outvoted_whom(index_dir, tmp_path):
    import csv

    report = tmp_path / "report"
    run("evaluate", "--index", index_dir, "--leave-one-out", "-k", "1,5", "--report", report)
    metrics = json.loads((report / "metrics.json").read_text())
    raw = (report / "index.html").read_text(encoding="utf-8")
    page = Page(raw)
    for tag, attrs in page.elements:  # thumbnails embedded; links only to the report's own files
        assert not attrs.get("src", "data:image/").startswith(("http", "/", "file")) and tag != "script"
        if "href" in attrs:
            assert (report / attrs["href"]).is_file()
    shown = {r["data-setting"]: float(r["data-top1"]) for r in page.tagged("tr", **{"data-setting": ""})}
    assert shown == {f"knn-k{s['k']}-{s['vote']}": s["top1"] for s in metrics["settings"]}
    best = max(metrics["settings"], key=lambda s: s["top1"])
    name = f"knn-k{best['k']}-weighted"
    with open(report / f"confusion-{name}.csv", newline="") as handle:
        matrix = [[int(c) for c in row[1:]] for row in list(csv.reader(handle))[1:]]
    cells = [int(t) for t in " ".join(page.text).split("Confusion matrix")[1].split("Per class")[0].split()
             if t.isdigit()]
    assert cells == [c for row in matrix for c in row]
    # The confusions: each image shown is one of those misclassified that
    # way, and its red tiles are the neighbours (of the k that voted)
    # carrying the winning label, with their cosines.
    with open(report / "predictions.csv", newline="") as handle:
        predicted = {r["path"]: (r["label"], r[name]) for r in csv.DictReader(handle)}
    sections = [(t, a) for t, a in page.elements if t == "section" or (t == "figure" and "winner" in a["class"])]
    examples, current = {}, None
    for tag, attrs in sections:
        if tag == "section":
            current = attrs["data-image"]
            assert predicted[current] == (attrs["data-true"], attrs["data-predicted"]) and attrs["data-true"] != attrs["data-predicted"]
            examples[current] = []
        else:
            examples[current].append((attrs["data-path"], float(attrs["data-score"]), attrs["data-label"]))
    wrong = sum(1 for label, guess in predicted.values() if label != guess)
    assert wrong and examples and len(examples) <= wrong
    for image, winners in examples.items():
        near = json.loads(run("query", image, "--index", index_dir, "-k", best["k"], "--format", "json").stdout)
        expected = [(h["path"], h["score"], h["label"]) for h in near["results"]
                    if h["label"] == predicted[image][1]]
        assert [(p, round(s, 6), label) for p, s, label in winners] == expected and expected


def test_bad_report_folders_fail_before_the_evaluation(index_dir, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for target, message in ((a_file, "is a file"), (index_dir / "report", "inside the index folder")):
        result = run("evaluate", "--index", index_dir, "--leave-one-out", "--report", target, code=2)
        assert message in result.stderr and "top1" not in result.stdout
    assert a_file.read_text() == "x" and not (index_dir / "report").exists()
