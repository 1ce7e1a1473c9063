"""Decoding real image files of many kinds, and finding them on disk."""

import io
import os

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


def test_pillows_own_size_guard_is_reported_with_the_real_size(monkeypatch):
    # Pillow checks some formats itself (WebP, GIF frames, TIFF tiles, MPO),
    # beyond our own limit; its refusal names the image's size too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _encode(Image.new("RGB", (300, 200)), "WEBP")
    with pytest.raises(imgs.DecodeError) as refused:
        imgs.decode(data, max_megapixels=100)
    assert str(refused.value) == "image too large (0.06 megapixels; Pillow reads this format only up to 0.002 megapixels)"
    assert refused.value.kind == "too large"


def test_discover_walks_folders_labels_by_parent_and_reports_missing(tmp_path):
    (tmp_path / "root" / "cats").mkdir(parents=True)
    (tmp_path / "root" / "cats" / "b.jpg").write_bytes(b"x")
    (tmp_path / "root" / "cats" / "a.PNG").write_bytes(b"x")
    (tmp_path / "root" / "cats" / "notes.txt").write_bytes(b"x")
    (tmp_path / "root" / "top.jpg").write_bytes(b"x")
    files, skipped = imgs.discover([tmp_path / "root", tmp_path / "root" / "top.jpg", tmp_path / "nope"])
    assert [(f.path.name, f.label) for f in files] == [("top.jpg", None), ("a.PNG", "cats"), ("b.jpg", "cats")]
    assert [(s.path.name, s.reason) for s in skipped] == [("nope", "no such file or folder")]


def test_a_folder_walk_reports_every_picture_it_does_not_take(tmp_path):
    root = tmp_path / "root"
    (root / "cats").mkdir(parents=True)
    for name in ("a.jpg", "b.jfif", "c.JPE", "iphone.HEIC", "d.heif", "e.avif", "old.ppm", "icon.ico",
                 "notes.txt", "model.h5", "clip.mpg"):
        (root / "cats" / name).write_bytes(b"x")
    files, skipped = imgs.discover([root])
    assert [f.path.name for f in files] == ["a.jpg", "b.jfif", "c.JPE"]  # JPEG by other names
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons == {
        "iphone.HEIC": "unsupported format (HEIC/HEIF; convert it to JPEG or PNG)",
        "d.heif": "unsupported format (HEIC/HEIF; convert it to JPEG or PNG)",
        "e.avif": "unsupported format (AVIF; convert it to JPEG or PNG)",
        "old.ppm": "unsupported format (PPM is not among the formats read: JPEG, PNG, WEBP, BMP, GIF, TIFF; "
                   "see --image-formats)",
        "icon.ico": "unsupported format (ICO is not among the formats read: JPEG, PNG, WEBP, BMP, GIF, TIFF; "
                    "see --image-formats)",
    }  # text, Keras weights and video are no pictures
    # Listed formats are taken, and named files are judged by their content.
    files, skipped = imgs.discover([root, root / "cats" / "iphone.HEIC"], imgs.suffixes_for(("JPEG", "PPM")),
                                   ("JPEG", "PPM"))
    assert "old.ppm" in {f.path.name for f in files} and "old.ppm" not in {s.path.name for s in skipped}
    assert "iphone.HEIC" in {f.path.name for f in files}


def test_links_to_folders_are_followed_and_each_folder_walked_once(tmp_path):
    photos = tmp_path / "elsewhere" / "dogs"
    photos.mkdir(parents=True)
    (photos / "rex.jpg").write_bytes(b"x")
    root = tmp_path / "root"
    root.mkdir()
    (root / "dogs").symlink_to(photos, target_is_directory=True)
    (root / "dogs-again").symlink_to(photos, target_is_directory=True)
    (photos / "loop").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    files, skipped = imgs.discover([root])
    assert [(f.path, f.label) for f in files] == [(root / "dogs" / "rex.jpg", "dogs")]
    assert skipped == []


def test_a_larger_limit_leaves_pillows_own_guard_alone(monkeypatch):
    # Pillow's guard is one setting for the whole process; ours is per call.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000_000)
    before = Image.MAX_IMAGE_PIXELS
    data = _encode(Image.new("1", (12000, 12000)), "PNG")
    assert imgs.decode(data, max_megapixels=200).size == (12000, 12000)
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(imgs.DecodeError, match="too large"):
        imgs.decode(data, max_megapixels=100)
    assert Image.MAX_IMAGE_PIXELS == before


def test_the_size_given_is_the_files_own_not_the_reduced_decoding(photo):
    from imgsearch.preprocessing import Preprocessing

    big = photo.resize((4000, 3000))
    pixels, size = imgs.to_pixels(_encode(big, "JPEG", quality=90), Preprocessing())
    assert size == (4000, 3000) and pixels.shape == (224, 224, 3)
    pixels, size = imgs.to_pixels(_encode(big, "PNG"), Preprocessing())
    assert size == (4000, 3000)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: the upright picture is tall
    _, size = imgs.to_pixels(_encode(big, "JPEG", exif=exif), Preprocessing())
    assert size == (3000, 4000)


def test_16_bit_images_are_scaled_strip_by_strip_exactly():
    # 2400x1800 spans several strips; every value must land where a
    # whole-image conversion puts it: value * 255 // 65535.
    ramp = (np.arange(2400 * 1800, dtype=np.uint64) * 7919 % 65536).astype(np.uint16).reshape(1800, 2400)
    out = np.asarray(imgs.decode(_encode(Image.fromarray(ramp), "PNG")))
    expected = (ramp.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    assert out.shape == (1800, 2400, 3)
    np.testing.assert_array_equal(out[..., 1], expected)
    # Reduced while decoding: the average of the converted pixels.
    small = np.asarray(imgs.decode(_encode(Image.fromarray(ramp), "PNG"), draft_size=(256, 256)))
    assert small.shape == (258, 343, 3)  # 7 times smaller: 1800 // 256
    reference = np.asarray(Image.fromarray(expected, "L").reduce(7))
    np.testing.assert_array_equal(small[..., 0], reference)


def test_transparency_is_composited_before_reducing():
    # Left half opaque red, right half fully transparent (hiding black).
    rgba = np.zeros((1500, 3000, 4), np.uint8)
    rgba[:, :1500] = (255, 0, 0, 255)
    out = np.asarray(imgs.decode(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), draft_size=(256, 256)))
    assert out.shape == (300, 600, 3)  # 5 times smaller: 1500 // 256
    assert (out[:, :300] == (255, 0, 0)).all() and (out[:, 300:] == 255).all()


@pytest.mark.slow
def test_decoding_a_100_megapixel_16_bit_or_transparent_png_takes_bounded_memory(tmp_path):
    # In a fresh process, so its peak memory is this decoding's own.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import struct, sys, zlib
        from imgsearch import images as imgs
        from imgsearch.preprocessing import Preprocessing

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        depth, colour, pixel = {"grey16": (16, 0, b"\\x80\\x80"), "rgba": (8, 6, b"\\x20\\x80\\xc0\\x80")}[sys.argv[1]]
        row = b"\\x00" + pixel * 10000
        packer = zlib.compressobj(9)
        idat = b"".join(packer.compress(row * 100) for _ in range(100)) + packer.flush()
        data = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, depth, colour, 0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
        pixels, size = imgs.to_pixels(data, Preprocessing())
        assert size == (10000, 10000) and pixels.shape == (224, 224, 3)
        print([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1])
    """)
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    for kind, decoded_mib in (("grey16", 200), ("rgba", 400)):
        done = subprocess.run([sys.executable, "-c", code, kind], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        peak = int(done.stdout.split()[-1]) / 1024
        # The decoded pixels themselves (Pillow keeps 2 bytes a pixel for
        # 16-bit grey, 4 for RGBA), the interpreter, and a little more:
        # no float64 or full-size RGB copies (2.5 GB and 1.9 GB before).
        assert peak < decoded_mib + 100, (kind, peak)


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "SGI", "ICO", "DDS", "QOI"])
def test_only_the_documented_formats_are_read_unless_asked(fmt):
    data = _encode(Image.new("RGB", (30, 20), (200, 10, 10)), fmt)
    with pytest.raises(imgs.DecodeError, match=f"{fmt}.*not among the formats read.*image-formats") as caught:
        imgs.decode(data)
    assert caught.value.kind == "format"
    out = imgs.decode(data, formats=imgs.check_formats([fmt.lower()]))
    with Image.open(io.BytesIO(data)) as reference:  # ICO keeps a size of its own
        assert out.size == reference.size and out.getpixel((5, 5)) == (200, 10, 10)


def test_eps_bytes_never_reach_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 20\n%%EndComments\n"
           b"newpath 0 0 moveto 20 20 lineto stroke\nshowpage\n%%EOF\n")
    with pytest.raises(imgs.DecodeError, match=r"EPS is not among the formats read"):
        imgs.decode(eps)


def test_unknown_format_names_are_refused():
    from imgsearch.errors import UsageError

    with pytest.raises(UsageError, match="unknown image format 'NOPE'"):
        imgs.check_formats(["jpeg", "nope"])
    assert imgs.check_formats([" png", "JPEG", "png"]) == ("PNG", "JPEG")
