"""A collection full of bad files, indexed together with good ones.

The test makes its own corpus (nothing is downloaded or kept in the
repository): empty, truncated, random, text and HTML files with image names,
a decompression bomb, a HEIC file, symbolic-link loops, a folder with an
image's name, and beside them good images in every awkward mode and shape
(CMYK, 16-bit, palette with transparency, LA, 1-bit, EXIF-rotated, animated,
multi-page, panorama, 1x1, odd file names, a duplicate).  Every bad file must
be skipped with a reason, every good one indexed, and nothing may hang.
"""

import csv
import json
import os
import re
import shutil
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsearch import images as imgs

from conftest import PLUGINS_DIR, SAMPLE_DATA, run, run_process

PHOTOS = sorted((SAMPLE_DATA / "labelled").glob("*/*.jpg"))
SUMMARY = re.compile(
    r"added (\d+), updated (\d+), moved (\d+), unchanged (\d+), duplicates (\d+), skipped (\d+) "
    r"in [0-9.]+ s; (.+) holds (\d+) images"
)


def summary(stdout: str, index_dir) -> tuple[int, ...]:
    """(added, updated, moved, unchanged, duplicates, skipped, holds) of the first line."""
    match = SUMMARY.fullmatch(stdout.splitlines()[0])
    assert match, stdout
    assert match.group(7) == str(index_dir)
    return tuple(int(match.group(i)) for i in (1, 2, 3, 4, 5, 6, 8))


def read_errors(path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "reason"]
    paths = [row[0] for row in rows[1:]]
    assert len(paths) == len(set(paths)), "a path is listed twice"
    assert all(len(row) == 2 and row[1].strip() for row in rows[1:]), rows
    return dict(rows[1:])


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- making files -----------------------------------------------------------

def photo(number: int, size=None) -> Image.Image:
    with Image.open(PHOTOS[number]) as image:
        image = image.convert("RGB")
    return image.resize(size) if size else image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of any size, written row by row so that making
    it takes no memory: a few tens of kilobytes that decode to gigabytes."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then 8 pixels a byte
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row * 1000) for _ in range(height // 1000))
    body += packer.compress(row * (height % 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
            + _png_chunk(b"IEND", b""))


@dataclass
class Corpus:
    root: Path                     # the folder to index
    explicit: list[Path]           # files to name on the command line as well
    good: dict[str, Path]          # every file that must be indexed, by role
    bad: dict[Path, str]           # every file that must be skipped -> reason pattern
    ignorable: set[Path]           # may be skipped or silently ignored, never indexed
    refs: dict[str, Path] = field(default_factory=dict)  # reference pictures, not indexed

    @property
    def paths(self):
        return [self.root, *self.explicit]


def make_corpus(base: Path) -> Corpus:
    root = base / "corpus"
    root.mkdir()
    refs = base / "refs"
    refs.mkdir()
    good, bad, ref = {}, {}, {}

    def put_good(role, name, image, fmt, **options):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, fmt, **options)
        good[role] = path

    def put_ref(role, image):
        ref[role] = refs / f"{role}.png"
        image.save(ref[role], "PNG")

    # ---- good files: every one must be indexed (as RGB) ----
    put_good("cmyk", "cmyk.jpg", photo(0, (96, 64)).convert("CMYK"), "JPEG", quality=95)

    gray = np.asarray(photo(1, (64, 48)).convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    sixteen = Image.fromarray(gray)
    assert sixteen.mode == "I;16"
    put_good("gray16", "gray16.png", sixteen, "PNG")
    put_ref("gray16", Image.fromarray((gray // 257).astype(np.uint8), "L"))

    # Palette with a transparent colour that hides black: it must show white.
    indices = np.zeros((40, 40), np.uint8)
    indices[:, :20] = 1  # left half red, right half transparent
    palette = Image.fromarray(indices, "P")
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    put_good("palette", "palette.png", palette, "PNG", transparency=0)
    shown = np.full((40, 40, 3), 255, np.uint8)
    shown[:, :20] = (255, 0, 0)
    put_ref("palette", Image.fromarray(shown, "RGB"))

    la = Image.new("LA", (40, 30), (0, 0))  # transparent black: must show white
    la.paste((90, 255), (0, 0, 20, 30))
    put_good("la", "la.png", la, "PNG")
    put_good("bilevel", "bilevel.png", photo(2, (80, 60)).convert("1"), "PNG")

    # The same portrait picture stored upright, and stored turned on its side
    # with EXIF orientation 6 (a viewer turns it 90 degrees clockwise).
    upright = photo(3, (120, 200))
    put_good("upright", "upright.jpg", upright, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    put_good("rotated", "rotated.jpg", upright.transpose(Image.Transpose.ROTATE_90), "JPEG",
             quality=95, exif=exif)
    sideways = refs / "sideways.jpg"  # the rotated pixels without the EXIF tag
    upright.transpose(Image.Transpose.ROTATE_90).save(sideways, "JPEG", quality=95)
    ref["sideways"] = sideways

    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    put_good("gif", "animated.gif", red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    put_ref("red", red)
    put_ref("blue", blue)
    green = Image.new("RGB", (32, 32), (0, 200, 0))
    # fresh frames: Pillow leaves encoder settings on an image it has saved
    put_good("tiff", "pages.tif", green.copy(), "TIFF", save_all=True,
             append_images=[Image.new("RGB", (32, 32), (0, 0, 255)), Image.new("RGB", (32, 32), (255, 0, 0))])
    put_ref("green", green)

    put_good("panorama", "panorama.png", photo(4, (10000, 50)), "PNG")
    # Decoded at an eighth of its size (draft mode), recorded at its own.
    put_good("large", "large.jpg", photo(12, (3000, 2000)), "JPEG", quality=80)
    put_good("pixel", "pixel.png", Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")
    for role, name, number in (("spaces", "with  spaces .jpg", 5), ("unicode", "café ☕.jpg", 6),
                               ("newline", "new\nline.jpg", 7)):
        shutil.copyfile(PHOTOS[number], root / name)
        good[role] = root / name
    # One picture at two paths: one vector, the second path an alias.
    shutil.copyfile(PHOTOS[8], root / "dup-a.jpg")
    shutil.copyfile(PHOTOS[8], root / "dup-b.jpg")
    good["dup-a"], good["dup-b"] = root / "dup-a.jpg", root / "dup-b.jpg"

    # A folder with a link to its parent (a walk that follows it never ends)
    # and a link to itself named like an image; one good image beside them
    # shows the folder is walked, once.
    loop = root / "loop"
    loop.mkdir()
    (loop / "up").symlink_to("..")
    (loop / "up.jpg").symlink_to("..", target_is_directory=True)
    (loop / "self.jpg").symlink_to("self.jpg")
    put_good("in-loop", "loop/inside.png", photo(9, (40, 40)), "PNG")
    # A folder whose name looks like an image.
    (root / "x.jpg").mkdir()

    # ---- bad files: every one must be skipped, with a fitting reason ----
    def put_bad(name, data: bytes, reason: str):
        (root / name).write_bytes(data)
        bad[root / name] = reason

    truncated = "corrupt|truncated"
    put_bad("empty.jpg", b"", r"^empty")
    put_bad("truncated.jpg", PHOTOS[10].read_bytes()[: PHOTOS[10].stat().st_size // 2], truncated)
    whole_png = base / "whole.png"
    photo(11).save(whole_png, "PNG")
    put_bad("truncated.png", whole_png.read_bytes()[: whole_png.stat().st_size // 2], truncated)
    noise = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    put_bad("random.jpg", b"\x13\x37" + noise, r"not an image|unsupported format")
    put_bad("text.jpg", "These are my holiday notes, not a photo.\n".encode() * 20, r"not an image.*text")
    put_bad("page.png", b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not found</body></html>\n",
            r"not an image.*html")
    put_bad("bomb.png", png_bomb(20000, 20000), r"too large")
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(2000)
    put_bad("iphone.jpg", heic, r"unsupported format.*heic")
    # A .heic file is not taken from a folder walk (unknown suffix), only when named.
    (root / "iphone.heic").write_bytes(heic)
    bad[root / "iphone.heic"] = r"unsupported format.*heic"
    bad[loop / "self.jpg"] = r"symbolic link|symlink|loop"
    # Formats Pillow reads but the README does not list: named on the
    # command line (a folder walk passes over their suffixes), and one
    # hiding behind an image suffix.  EPS would make Pillow run Ghostscript.
    red_tile = Image.new("RGB", (24, 16), (220, 20, 20))
    red_tile.save(root / "portable.ppm", "PPM")
    red_tile.save(root / "targa.tga", "TGA")
    (root / "drawing.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 24 16\n%%EndComments\n"
                                       b"newpath 0 0 moveto 24 16 lineto stroke\nshowpage\n%%EOF\n")
    bad[root / "portable.ppm"] = r"unsupported format \(PPM is not among the formats read.*--image-formats"
    bad[root / "targa.tga"] = r"unsupported format or not an image \(it might be TGA.*--image-formats"
    bad[root / "drawing.png"] = r"unsupported format \(EPS is not among the formats read.*--image-formats"

    explicit = [root / "iphone.heic", root / "portable.ppm", root / "targa.tga"]
    return Corpus(root, explicit, good, bad, {root / "x.jpg", loop / "up.jpg"}, ref)


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path)


def check_skips(corpus: Corpus, skipped: dict[str, str], bad=None):
    """``skipped`` (path -> reason) lists exactly the bad files, with fitting reasons."""
    bad = corpus.bad if bad is None else bad
    expected = {str(path) for path in bad}
    ignorable = {str(path) for path in corpus.ignorable}
    assert expected - set(skipped) == set(), f"bad files not reported; reported: {skipped}"
    assert set(skipped) - expected - ignorable == set(), "good files reported as skipped"
    for path, pattern in bad.items():
        assert re.search(pattern, skipped[str(path)], re.IGNORECASE), (path.name, skipped[str(path)])
    for path in ignorable & set(skipped):
        assert re.search(r"folder|directory", skipped[path], re.IGNORECASE), (path, skipped[path])


def check_indexed(corpus: Corpus, index_dir):
    from imgsearch.index import Index

    with Index.open(index_dir, plugins_dir=PLUGINS_DIR) as index:
        entries = index.store.by_path()
        aliases = {alias.path: alias for alias in index.store.aliases()}
        assert str(corpus.good["dup-b"]) in aliases
        assert aliases[str(corpus.good["dup-b"])].image_id == entries[str(corpus.good["dup-a"])].id
        assert set(entries) == {str(p) for role, p in corpus.good.items() if role != "dup-b"}
        # every good file decodes to RGB; the size recorded is the picture's
        # own, upright, whatever size it was decoded at
        for role, path in corpus.good.items():
            if role == "dup-b":
                continue
            image = imgs.decode(imgs.read_bytes(path), draft_size=index.encoder.preprocessing.draft_size)
            assert image.mode == "RGB", role
            with Image.open(path) as stored:
                turned = stored.getexif().get(0x0112, 1) >= 5
                size = stored.size[::-1] if turned else stored.size
            entry = entries[str(path)]
            assert (entry.width, entry.height) == size, role

        def size_of(role):
            return entries[str(corpus.good[role])].width, entries[str(corpus.good[role])].height

        assert size_of("panorama") == (10000, 50)
        assert size_of("pixel") == (1, 1)
        assert size_of("large") == (3000, 2000)
        assert size_of("rotated") == size_of("upright") == (120, 200)

        def stored(role):
            return index.store.vectors([entries[str(corpus.good[role])].id])[0]

        # EXIF orientation applied: the turned file reads as the upright one
        up, turned = entries[str(corpus.good["upright"])], entries[str(corpus.good["rotated"])]
        assert (turned.width, turned.height) == (up.width, up.height) and up.height > up.width
        assert cosine(stored("rotated"), stored("upright")) > 0.999
        refs, _ = index.embed_files([corpus.refs[name] for name in
                                     ("sideways", "red", "blue", "green", "gray16", "palette")])
        sideways, red, blue, green, gray16, palette = refs
        assert cosine(stored("upright"), sideways) < 0.99  # the check above can tell
        # first frames: the GIF's red, the TIFF's green
        gif, _ = index.embed_files([corpus.good["gif"]])
        assert cosine(gif[0], red) > 0.999 and cosine(gif[0], red) > cosine(gif[0], blue)
        assert cosine(stored("gif"), red) > 0.999
        assert cosine(stored("tiff"), green) > 0.999
        # 16-bit scaled to 8 bits (not clipped to white); transparency shown on white
        assert cosine(stored("gray16"), gray16) > 0.999
        assert cosine(stored("palette"), palette) > 0.999


def test_bad_files_are_skipped_with_reasons_and_good_ones_indexed(tmp_path, corpus):
    index_dir, errors = tmp_path / "ix", tmp_path / "errors.csv"
    result = run("index", *corpus.paths, "--index", index_dir, "--encoder", "tiny-color", "--errors", errors)
    skipped = read_errors(errors)
    check_skips(corpus, skipped)
    assert (len(corpus.good), len(corpus.bad)) == (18, 13)
    good = len(corpus.good) - 1  # one of them is a duplicate
    assert summary(result.stdout, index_dir) == (good, 0, 0, 0, 1, len(skipped), good)
    assert len(skipped) == 13 + len({str(p) for p in corpus.ignorable} & set(skipped))
    lines = result.stderr.splitlines()  # notices, not results
    for path, reason in skipped.items():
        assert f"skipped: {path}: {reason}" in lines
    assert f"duplicate: {corpus.good['dup-b']} (same content as {corpus.good['dup-a']})" in lines
    check_indexed(corpus, index_dir)

    # the duplicate is one picture: returned once, with its other path
    found = json.loads(run("query", corpus.good["dup-a"], "--index", index_dir, "--include-self",
                           "-k", good, "--format", "json").stdout)
    first = found["results"][0]
    assert first["path"] == str(corpus.good["dup-a"]) and first["score"] > 0.9999
    assert first["also_at"] == [str(corpus.good["dup-b"])]
    assert len(found["results"]) == good
    assert [r["path"] for r in found["results"]].count(str(corpus.good["dup-a"])) == 1
    assert str(corpus.good["dup-b"]) not in [r["path"] for r in found["results"]]

    checked = run("verify", "--index", index_dir)
    assert any(line.startswith(f"ok: {good} images and 1 identical copy (stored once)") for line in checked.stdout.splitlines()), checked.stdout

    # A higher megapixel limit lets the bomb in; nothing else changes.
    again = run("index", *corpus.paths, "--index", index_dir, "--max-megapixels", "500", "--errors", errors)
    bomb = corpus.root / "bomb.png"
    skipped = read_errors(errors)
    check_skips(corpus, skipped, {path: reason for path, reason in corpus.bad.items() if path != bomb})
    assert summary(again.stdout, index_dir) == (1, 0, 0, good + 1, 0, len(skipped), good + 1)
    from imgsearch.store import Store

    with Store.open(index_dir) as store:
        entry = store.by_path()[str(bomb)]
        assert (entry.width, entry.height) == (20000, 20000)
    assert any(line.startswith("ok: ") for line in run("verify", "--index", index_dir).stdout.splitlines())


def test_strict_fails_with_one_error_line_and_still_indexes_the_good_files(tmp_path, corpus):
    index_dir, errors = tmp_path / "ix", tmp_path / "errors.csv"
    result = run("index", *corpus.paths, "--index", index_dir, "--encoder", "tiny-color",
                 "--strict", "--errors", errors, code=1)
    skipped = read_errors(errors)
    check_skips(corpus, skipped)
    good = len(corpus.good) - 1
    assert summary(result.stdout, index_dir) == (good, 0, 0, 0, 1, len(skipped), good)
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")][0]
    assert str(len(skipped)) in error and "strict" in error
    assert json.loads(run("info", "--index", index_dir, "--format", "json").stdout)["count"] == good
    check_indexed(corpus, index_dir)
    assert run("verify", "--index", index_dir).stdout.splitlines()[-1].startswith("ok: ")


@pytest.mark.slow
def test_a_real_process_goes_through_the_corpus_without_hanging(tmp_path, corpus):
    index_dir, errors = tmp_path / "ix", tmp_path / "errors.csv"
    done = run_process("index", *corpus.paths, "--index", index_dir, "--encoder", "tiny-color", "--errors", errors)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    skipped = read_errors(errors)
    check_skips(corpus, skipped)
    good = len(corpus.good) - 1
    assert summary(done.stdout, index_dir) == (good, 0, 0, 0, 1, len(skipped), good)
    check_indexed(corpus, index_dir)


def _corpus_with_locked_places(tmp_path):
    """A readable photo, a photo and a folder (with a photo) to lock."""
    root = tmp_path / "corpus"
    root.mkdir()
    photo(0, (64, 64)).save(root / "fine.jpg", "JPEG")
    locked_file = root / "locked.jpg"
    photo(1, (64, 64)).save(locked_file, "JPEG")
    locked_folder = root / "locked"
    locked_folder.mkdir()
    photo(2, (64, 64)).save(locked_folder / "inside.jpg", "JPEG")
    return root, locked_file, locked_folder


def test_unreadable_files_and_folders_are_skipped(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 cannot keep root from reading, so nothing is unreadable")
    root, locked_file, locked_folder = _corpus_with_locked_places(tmp_path)
    locked_file.chmod(0)
    locked_folder.chmod(0)
    try:
        index_dir, errors = tmp_path / "ix", tmp_path / "errors.csv"
        result = run("index", root, "--index", index_dir, "--encoder", "tiny-color", "--errors", errors)
        skipped = read_errors(errors)
        assert set(skipped) == {str(locked_file), str(locked_folder)}
        for path in skipped:
            assert re.search(r"permission denied|unreadable", skipped[path], re.IGNORECASE), skipped
        assert summary(result.stdout, index_dir) == (1, 0, 0, 0, 0, 2, 1)
    finally:
        locked_folder.chmod(stat.S_IRWXU)
        locked_file.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_permission_denied_files_and_folders_are_skipped_even_as_root(tmp_path, monkeypatch):
    """The same as above without file modes (root reads through chmod 000):
    opening one file and listing one folder raise PermissionError."""
    import builtins
    import errno

    root, locked_file, locked_folder = _corpus_with_locked_places(tmp_path)
    real_open, real_scandir = builtins.open, os.scandir

    def denied(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == str(locked_file):
            raise denied(file)
        return real_open(file, *args, **kwargs)

    def guarded_scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(path) == str(locked_folder):
            raise denied(path)
        return real_scandir(path)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "scandir", guarded_scandir)
    index_dir, errors = tmp_path / "ix", tmp_path / "errors.csv"
    result = run("index", root, "--index", index_dir, "--encoder", "tiny-color", "--errors", errors)
    skipped = read_errors(errors)
    assert skipped == {str(locked_file): "permission denied", str(locked_folder): "permission denied"}
    assert summary(result.stdout, index_dir) == (1, 0, 0, 0, 0, 2, 1)


@pytest.mark.slow
def test_a_named_pipe_with_an_image_name_does_not_hang(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    photo(0, (64, 64)).save(root / "fine.jpg", "JPEG")
    pipe = root / "pipe.jpg"
    os.mkfifo(pipe)  # opening it for reading would wait for a writer forever
    index_dir, errors = tmp_path / "ix", tmp_path / "errors.csv"
    done = run_process("index", root, pipe, "--index", index_dir, "--encoder", "tiny-color", "--errors", errors)
    assert done.returncode == 0, done.stderr
    assert summary(done.stdout, index_dir)[0] == 1
    # Reported, not silently passed over: found in the folder and named.
    assert read_errors(errors) == {str(pipe): "not a regular file"}


def test_more_formats_are_read_when_listed(tmp_path, corpus):
    index_dir, errors = tmp_path / "ix", tmp_path / "errors.csv"
    listed = {corpus.root / "portable.ppm", corpus.root / "targa.tga"}
    run("index", *corpus.paths, "--index", index_dir, "--encoder", "tiny-color", "--errors", errors,
        "--image-formats", "jpeg,png,gif,tiff,ppm,tga")
    check_skips(corpus, read_errors(errors), {p: r for p, r in corpus.bad.items() if p not in listed})
    from imgsearch.store import Store

    with Store.open(index_dir) as store:
        entries = store.by_path()
    assert {str(p) for p in listed} <= set(entries)
    assert {(entries[str(p)].width, entries[str(p)].height) for p in listed} == {(24, 16)}
    # A folder walk takes the suffixes of the listed formats too.
    walked = tmp_path / "walked"
    walked.mkdir()
    Image.new("RGB", (24, 16), (20, 20, 220)).save(walked / "blue.ppm", "PPM")
    result = run("index", walked, "--index", tmp_path / "ix2", "--encoder", "tiny-color", "--image-formats", "PPM")
    assert summary(result.stdout, tmp_path / "ix2")[0] == 1
    error = run("index", walked, "--index", tmp_path / "ix3", "--image-formats", "PPM,NOPE", code=2).stderr
    assert "unknown image format 'NOPE'" in error
