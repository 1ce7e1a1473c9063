"""imgsearch dupes on a small planted corpus: sample photos with a resized,
a recompressed, a slightly cropped and a mirrored version each, and an
exact copy, among the other sample photos (same classes: similar but
distinct pictures), embedded by efficientnet-lite0 with its real weights."""

import csv
import io
import json
import shutil

import pytest
from PIL import Image, ImageOps

from conftest import SAMPLE_DATA, run
from imgsearch import dupes
from imgsearch.store import Store
from test_sheets import Page, assert_self_contained

KINDS = ("resized", "recompressed", "cropped", "mirrored")


def plant(source, folder):
    """The photo at a camera-like size (the samples are 224 px, smaller than
    what the encoder reads), and four kinds of near-duplicate of it, written
    beside it."""
    small = Image.open(source).convert("RGB")
    image = small.resize((small.width * 3, small.height * 3), Image.BICUBIC)
    image.save(source, quality=95)
    w, h = image.size
    stem = source.stem
    image.resize((w // 2, h // 2), Image.LANCZOS).save(folder / f"{stem}.resized.jpg", quality=90)
    image.save(folder / f"{stem}.recompressed.jpg", quality=30)
    dx, dy = w // 20, h // 20  # 5% off each side
    image.crop((dx, dy, w - dx, h - dy)).save(folder / f"{stem}.cropped.jpg", quality=90)
    ImageOps.mirror(image).save(folder / f"{stem}.mirrored.png")
    return {f"{stem}.{kind}" for kind in KINDS}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    photos = root / "photos"
    shutil.copytree(SAMPLE_DATA / "labelled", photos)
    originals = [sorted((photos / label).glob("*.jpg"))[0] for label in sorted(p.name for p in photos.iterdir())]
    for source in originals:
        plant(source, source.parent)
    shutil.copy(originals[0], originals[0].parent / "exact-copy.jpg")
    index = root / "ix"
    run("index", photos, "--index", index, "--encoder", "efficientnet-lite0")
    return photos, originals, index


pytestmark = pytest.mark.slow


def _stem(path):
    name = path.rsplit("/", 1)[-1]
    return name.split(".")[0]


def test_each_planted_group_is_found_and_nothing_else(planted):
    photos, originals, index = planted
    out = run("dupes", "--index", index, "--format", "json")
    groups = [json.loads(line) for line in out.stdout.splitlines()]
    found = [sorted(image["path"] for image in g["images"]) for g in groups]
    expected = [sorted([str(o)] + [str(o.parent / f"{o.stem}.{kind}.{'png' if kind == 'mirrored' else 'jpg'}")
                       for kind in KINDS]) for o in originals]
    assert sorted(found) == sorted(expected)
    # The original (most pixels) leads its group; the exact copy is listed with it.
    first = next(g for g in groups if g["images"][0]["path"] == str(originals[0]))
    assert first["images"][0]["score"] == 1.0 and first["size"] == 6
    assert first["images"][0]["copies"] == [str(originals[0].parent / "exact-copy.jpg")]
    for group in groups:
        assert group["images"][0]["width"] * group["images"][0]["height"] == max(
            i["width"] * i["height"] for i in group["images"])
        assert all(dupes.DEFAULT_THRESHOLD - 0.05 < i["score"] <= 1.0 for i in group["images"])


def test_library_pairs_equal_brute_force(planted):
    import numpy as np

    _, _, index = planted
    with Store.open(index) as store:
        ids = store.ids()
        vectors = store.vectors(ids)
        found = {(a, b) for a, b, _ in dupes.pairs(store, 0.8, batch=7)}
    rows, cols = np.nonzero(np.triu(vectors @ vectors.T, 1) >= 0.8)
    assert found == {(int(ids[r]), int(ids[c])) for r, c in zip(rows, cols)} and found


def test_csv_and_html_list_the_same_groups(planted, tmp_path):
    _, originals, index = planted
    page_path = tmp_path / "dupes.html"
    groups = [json.loads(line) for line in run("dupes", "--index", index, "--format", "json").stdout.splitlines()]
    out = run("dupes", "--index", index, "--format", "csv", "--html", page_path)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    expected = [(str(n), i["path"], f"{i['score']:.6f}", "") for n, g in enumerate(groups, 1) for i in g["images"]]
    expected += [(str(n), c, "1.000000", i["path"]) for n, g in enumerate(groups, 1) for i in g["images"]
                 for c in i["copies"]]
    assert sorted((r["group"], r["path"], r["score"], r["copy_of"]) for r in rows) == sorted(expected)
    raw = page_path.read_text(encoding="utf-8")
    page = Page(raw)
    assert_self_contained(page, raw)
    tiles = page.tagged("figure", **{"data-path": ""})
    assert sorted((t["data-path"], t["data-score"]) for t in tiles) == sorted((p, s) for _, p, s, _ in expected)
    assert len(page.tagged("img", src="")) == len(tiles)


def test_a_higher_threshold_finds_fewer_and_bad_thresholds_are_refused(planted):
    _, _, index = planted
    strict = [json.loads(line) for line in
              run("dupes", "--index", index, "--threshold", "0.999", "--format", "json").stdout.splitlines()]
    # At 0.999 the exact copy remains (it is an alias, not a search result).
    assert any(i["copies"] for g in strict for i in g["images"])
    loose = run("dupes", "--index", index, "--format", "json").stdout.splitlines()
    assert sum(json.loads(g)["size"] for g in loose) > sum(g["size"] for g in strict)
    for bad in ("0", "1.5", "-0.2", "nan", "x"):
        run("dupes", "--index", index, "--threshold", bad, code=2)
    with pytest.raises(Exception, match="threshold"):
        dupes.check_threshold(0)
    # The help states the default the library uses.
    assert f"(default {dupes.DEFAULT_THRESHOLD:g})" in " ".join(run("dupes", "-h").stdout.split())
