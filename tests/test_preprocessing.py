"""Preprocessing declared as data, applied by the core."""

import numpy as np
import pytest
from PIL import Image

from imgsearch.preprocessing import Preprocessing

from conftest import SAMPLE_DATA


def _photo(size):
    path = sorted((SAMPLE_DATA / "labelled" / "church").iterdir())[0]
    with Image.open(path) as image:
        return image.convert("RGB").resize(size)


@pytest.mark.parametrize("size", [(500, 300), (224, 224), (3000, 2000), (225, 1000)])
def test_shorter_side_resize_equals_resize_then_centre_crop(size):
    prep = Preprocessing(input_size=224, resize="shorter-side", resize_to=256)
    image = _photo(size)
    width, height = size
    scale = 256 / min(width, height)
    new_w, new_h = max(224, round(width * scale)), max(224, round(height * scale))
    left, top = (new_w - 224) // 2, (new_h - 224) // 2
    reference = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR).crop((left, top, left + 224, top + 224)))
    ours = prep.resize_image(image)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - reference).max() <= 1


def test_a_very_thin_strip_is_cropped_before_it_is_scaled():
    # scaled whole first, this would be a 256 x 102,400,000 image
    out = Preprocessing().resize_image(Image.new("RGB", (1, 400_000), (10, 200, 30)))
    assert out.shape == (224, 224, 3)
    assert (out == [10, 200, 30]).all()


def test_stretch_and_normalisation():
    prep = Preprocessing(input_size=32, resize="stretch", channel_order="BGR", mean=(1, 2, 3), std=(2, 2, 2))
    out = prep.resize_image(Image.new("RGB", (100, 10), (10, 20, 30)))
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(prep.normalize(out)[0, 0], [(30 - 1) / 2, (20 - 2) / 2, (10 - 3) / 2])
    assert prep.draft_size == (32, 32)
    assert Preprocessing(resize_to=300).draft_size == (300, 300)


def test_invalid_declarations_are_refused():
    with pytest.raises(ValueError):
        Preprocessing(resize="squash")
    with pytest.raises(ValueError):
        Preprocessing(channel_order="GBR")
    with pytest.raises(ValueError):
        Preprocessing(input_size=224, resize_to=200)


def test_declaration_round_trips_through_the_manifest_form():
    prep = Preprocessing(mean=(1, 2, 3))
    assert Preprocessing(**prep.to_dict()) == prep
