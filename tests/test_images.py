"""Decoding real image files of many kinds, and finding them on disk."""

import io

import numpy as np
import pytest
from PIL import Image

from imgsearch import images as imgs

from conftest import SAMPLE_DATA


def _encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def photo():
    with Image.open(SAMPLE_DATA / "labelled" / "church" / sorted((SAMPLE_DATA / "labelled" / "church").iterdir())[0].name) as im:
        return im.convert("RGB")


def test_jpeg_decodes_to_rgb(photo):
    out = imgs.decode(_encode(photo, "JPEG", quality=95))
    assert out.mode == "RGB" and out.size == photo.size


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "LA", "RGBA", "P", "I;16"])
def test_every_mode_becomes_rgb(photo, mode):
    if mode == "I;16":
        gray = np.asarray(photo.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        image = Image.fromarray(gray)  # mode I;16
        fmt = "PNG"
    else:
        image = photo.convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = imgs.decode(_encode(image, fmt))
    assert out.mode == "RGB" and out.size == photo.size
    if mode == "I;16":
        # scaled, not clipped to white: compare with the 8-bit gray version
        expected = np.asarray(photo.convert("L"), dtype=np.int16)
        assert np.abs(np.asarray(out)[..., 0].astype(np.int16) - expected).max() <= 1


def test_transparent_areas_become_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = np.asarray(imgs.decode(_encode(image, "PNG")))
    assert (out == 255).all()
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert (np.asarray(imgs.decode(_encode(palette, "PNG"))) == 255).all()


def test_exif_rotated_jpeg_is_decoded_upright(photo):
    tall = photo.crop((0, 0, 100, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90 degrees clockwise
    stored = tall.transpose(Image.Transpose.ROTATE_90)
    out = imgs.decode(_encode(stored, "JPEG", exif=exif, quality=95))
    assert out.size == (100, 200)
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(tall, dtype=np.int16))
    assert diff.mean() < 6


def test_first_frame_of_an_animation(photo):
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(imgs.decode(data))
    assert out[10, 10, 0] > 200 and out[10, 10, 2] < 50


def test_draft_mode_decodes_large_jpegs_smaller_but_not_below_the_asked_size(photo):
    big = photo.resize((2000, 1500))
    out = imgs.decode(_encode(big, "JPEG"), draft_size=(256, 256))
    assert min(out.size) >= 256 and out.size[0] < 2000


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, I am text\n" * 20, r"not an image \(text\)"),
        (b"<html><body>nope</body></html>", r"not an image \(an HTML"),
        (np.random.default_rng(0).bytes(5000), "unsupported format or not an image"),
        (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(200), r"unsupported format \(HEIC/HEIF"),
    ],
)
def test_not_images_are_refused_with_a_reason(data, reason):
    with pytest.raises(imgs.DecodeError, match=reason):
        imgs.decode(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_refused(photo, fmt):
    data = _encode(photo, fmt)
    with pytest.raises(imgs.DecodeError, match="corrupt or truncated"):
        imgs.decode(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    data = _encode(Image.new("1", (12000, 12000)), "PNG")  # 144 megapixels, tiny file
    with pytest.raises(imgs.DecodeError, match="too large"):
        imgs.decode(data)
    assert imgs.decode(data, max_megapixels=200).size == (12000, 12000)


def test_discover_walks_folders_labels_by_parent_and_reports_missing(tmp_path):
    (tmp_path / "root" / "cats").mkdir(parents=True)
    (tmp_path / "root" / "cats" / "b.jpg").write_bytes(b"x")
    (tmp_path / "root" / "cats" / "a.PNG").write_bytes(b"x")
    (tmp_path / "root" / "cats" / "notes.txt").write_bytes(b"x")
    (tmp_path / "root" / "top.jpg").write_bytes(b"x")
    files, skipped = imgs.discover([tmp_path / "root", tmp_path / "root" / "top.jpg", tmp_path / "nope"])
    assert [(f.path.name, f.label) for f in files] == [("top.jpg", None), ("a.PNG", "cats"), ("b.jpg", "cats")]
    assert [(s.path.name, s.reason) for s in skipped] == [("nope", "no such file or folder")]
