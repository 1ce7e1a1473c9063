"""Encoder discovery: entry points, plugin folders, and the errors of both."""

import subprocess
import sys
import textwrap

import pytest

from imgsearch.encoders import Encoder, Registry, load_registry
from imgsearch.errors import PluginError, UnknownEncoderError
from imgsearch.preprocessing import Preprocessing


PLUGIN_SOURCE = textwrap.dedent(
    """
    from imgsearch import Encoder, Preprocessing

    class {cls}(Encoder):
        name = {name!r}
        dim = 3
        preprocessing = Preprocessing(input_size=8, resize="stretch")

        def load(self):
            pass

        def embed_batch(self, pixels):
            return pixels.mean(axis=(1, 2))

    def register_encoders(register):
        register({cls})
    """
)


def test_builtin_encoders_come_through_the_entry_point_group():
    registry = load_registry()
    assert {"resnet50", "efficientnet-lite0"} <= set(registry.names())
    assert "imgsearch_resnet50" in registry.source("resnet50")
    assert registry.get("resnet50").dim == 2048
    assert registry.get("efficientnet-lite0").dim == 1280


def test_a_third_party_package_registers_through_its_entry_point(tmp_path, monkeypatch):
    # What pip leaves behind for an installed package: the module and a
    # dist-info folder declaring the entry point.
    (tmp_path / "acme_encoder.py").write_text(PLUGIN_SOURCE.format(cls="Acme", name="acme-mean"))
    dist = tmp_path / "acme_encoder-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-encoder\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[imgsearch.encoders]\nacme = acme_encoder\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = load_registry()
    assert "acme-mean" in registry.names()
    assert registry.source("acme-mean") == "acme-encoder (acme_encoder)"
    encoder = registry.create("acme-mean")
    assert encoder.embed_pixels(__import__("numpy").zeros((2, 8, 8, 3), "uint8")).shape == (2, 3)


def test_plugins_folder(registry):
    assert "tiny-color" in registry.names()
    assert registry.source("tiny-color").startswith("plugin file ")


def test_unknown_name_lists_the_valid_ones(registry):
    with pytest.raises(UnknownEncoderError) as info:
        registry.get("resnet5O")
    assert str(info.value).startswith(
        "unknown encoder 'resnet5O'; registered encoders: efficientnet-lite0, lite0-any-precision, resnet50, saved-model, tiny-color "
    )


def test_two_plugins_claiming_one_name_is_an_error_naming_both(tmp_path):
    (tmp_path / "first.py").write_text(PLUGIN_SOURCE.format(cls="A", name="twin"))
    (tmp_path / "second.py").write_text(PLUGIN_SOURCE.format(cls="B", name="twin"))
    with pytest.raises(PluginError) as info:
        load_registry(tmp_path)
    message = str(info.value)
    assert "'twin'" in message and "first.py" in message and "second.py" in message


def test_a_plugin_cannot_take_a_builtin_name(tmp_path):
    (tmp_path / "impostor.py").write_text(PLUGIN_SOURCE.format(cls="R", name="resnet50"))
    with pytest.raises(PluginError, match="imgsearch_resnet50.*impostor.py"):
        load_registry(tmp_path)


def test_broken_plugins_are_reported_by_file(tmp_path):
    (tmp_path / "nohook.py").write_text("x = 1\n")
    with pytest.raises(PluginError, match="nohook.py has no register_encoders"):
        load_registry(tmp_path)
    (tmp_path / "nohook.py").unlink()
    (tmp_path / "crash.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match="crash.py failed to load: boom"):
        load_registry(tmp_path)
    with pytest.raises(PluginError, match="does not exist"):
        load_registry(tmp_path / "nowhere")


def test_registering_something_that_is_not_an_encoder():
    registry = Registry()
    with pytest.raises(PluginError, match="not an Encoder"):
        registry.register(object, "test")

    class NoPreprocessing(Encoder):
        name, dim = "x", 2

    with pytest.raises(PluginError, match="preprocessing"):
        registry.register(NoPreprocessing, "test")

    class Fine(Encoder):
        name, dim, preprocessing = "fine", 2, Preprocessing()

    registry.register(Fine, "test")
    assert registry.names() == ["fine"]


def test_help_and_encoders_do_not_import_tensorflow():
    code = textwrap.dedent(
        """
        import sys
        from click.testing import CliRunner
        from imgsearch.cli import main
        for args in (["--help"], ["encoders"], ["index", "-h"]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
        heavy = sorted(m for m in ("tensorflow", "keras", "torch") if m in sys.modules)
        print(",".join(heavy) or "none")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none"


def test_a_plugin_file_may_use_dataclasses_with_postponed_annotations(tmp_path):
    (tmp_path / "typed.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class Settings:\n"
        "    size: int = 8\n"
        + PLUGIN_SOURCE.format(cls="Typed", name="typed")
    )
    assert "typed" in load_registry(tmp_path).names()


def test_a_relative_weights_path_is_recorded_absolute(tmp_path, monkeypatch):
    from imgsearch_resnet50 import ResNet50Encoder

    (tmp_path / "w.weights.h5").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert ResNet50Encoder("w.weights.h5").weights == str(tmp_path / "w.weights.h5")
    assert ResNet50Encoder("imagenet").weights == "imagenet"
    assert ResNet50Encoder("none").weights == "none"
