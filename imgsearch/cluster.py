"""Embedding on a Ray cluster: workers decode and encode, this process commits.

``imgsearch index --ray`` hands the files that need reading to Ray Data: a
pool of map tasks reads, hashes and decodes them, and a pool of actors, each
holding the encoder loaded once (same runtime and precision as a local run),
turns the pixels into vectors.  Results come back in file order, so the
driver's one writer records them exactly as a local run would (same ids, same
duplicates, same commits every ``--commit-every`` images); a killed driver
loses at most the uncommitted step, and running the command again resumes,
because files already committed are recognised on the driver by path, size
and modification time before any work is sent out.

Files are opened by the workers by path: on a cluster of several machines
the images must be readable under the same path on every node (a shared
mount), as must a ``--plugins-dir`` folder and any weights file.

Ray is imported only here, and only when ``--ray`` is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from . import images as imgs
from .errors import ImgsearchError, UsageError, first_line
from .runtime import effective_precision

INSTALL_HINT = "pip install 'imgsearch[ray]'"
# Seconds to wait for every node's check (Ray's own waits are minutes).
PROBE_TIMEOUT_S = 120
# CPU share each decoding task asks for.  Ray Data's map tasks need a share
# of their own: actors that take every CPU of a node starve the reading step,
# and the pipeline waits forever.
DECODE_CPUS = 0.25

logger = logging.getLogger(__name__)


class ClusterError(ImgsearchError):
    """The Ray cluster cannot be reached or cannot run this encoder."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to make exactly the driver's encoder."""

    encoder: str
    weights: str
    fingerprint: str
    preprocessing: dict
    runtime: str
    precision: str
    ran_as: str  # the precision the driver's encoder runs at: workers must run the same
    plugins_dir: str | None
    version: str
    max_megapixels: float
    formats: tuple[str, ...]
    batch_size: int
    # int8: the digest of the calibration images, this machine's OpenVINO
    # version and its calibrated model's files, which the workers install
    # (calibrating there would make other vectors).
    calibration: str | None = None
    openvino: str | None = None
    model_files: dict | None = None

    def light(self) -> dict:
        """The spec as a dict, without the model's files (for the node
        checks and the decoding tasks, which do not need them)."""
        return {**asdict(self), "model_files": None}


def spec_for(encoder, *, plugins_dir, max_megapixels: float, formats, batch_size: int,
             gpus_per_actor: float = 0.0) -> WorkerSpec:
    from . import __version__

    options = encoder.options()
    int8 = {}
    if encoder.precision == "int8":
        from .runtime import calibrated_model, openvino_version

        int8 = dict(calibration=options.calibration_id, openvino=openvino_version(),
                    model_files=calibrated_model(encoder))
    runtime = options.runtime
    if gpus_per_actor and runtime == "auto" and options.precision == "fp32":
        runtime = "keras"  # OpenVINO runs on CPUs; TensorFlow uses the actor's GPU
    return WorkerSpec(encoder.name, encoder.weights, encoder.weights_fingerprint(),
                      encoder.preprocessing.to_dict(), runtime, options.precision,
                      encoder.precision,
                      str(os.path.abspath(plugins_dir)) if plugins_dir else None, __version__,
                      max_megapixels, tuple(formats), batch_size, **int8)


# -- connecting ------------------------------------------------------------

def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data comes with the [data] extra)
    except ImportError:
        raise UsageError(f"--ray needs Ray Data: {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``address``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray {address!r}: expected auto, local or HOST:PORT of the cluster's head")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                           "is 'ray start --head' running there?") from None


def _quiet_ray() -> None:
    """Ray's Python loggers report each step of starting a cluster and
    running a dataset; the driver shows a bar of its own, and problems reach
    the user as one-line errors instead.  (Ray's C++ core logs on its own.)"""
    logging.getLogger("ray").setLevel(logging.ERROR)
    # Ray Data logs a failed run with its traceback; the error reaches the
    # user as one line from the driver.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def connect(address: str = "auto"):
    """A connection to a Ray cluster for the duration of the block.

    ``auto``: the cluster this machine belongs to (``RAY_ADDRESS``, or one
    started here with ``ray start``), else a local one started for this run
    and stopped after it.  ``local``: always a new local one.  ``HOST:PORT``:
    the head node of a running cluster.
    """
    ray = _import_ray()
    if ray.is_initialized():  # a library caller connected already
        yield ray
        return
    kwargs = dict(log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
    target = _cluster_here() if address == "auto" else address
    if target and target != "local" and not target.startswith("ray://"):
        _check_reachable(target)
    try:
        _quiet_ray()
        ray.init(address=target, **kwargs)
    except ConnectionError as exc:
        raise ClusterError(
            f"cannot connect to the Ray cluster ({first_line(exc)}); if the cluster uses "
            "token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
            "here as on its nodes"
        ) from None
    except RuntimeError as exc:
        if "version" in str(exc).lower():
            raise ClusterError(f"Ray versions differ between this machine and the cluster: "
                               f"{first_line(exc)}") from None
        raise ClusterError(f"cannot start or join a Ray cluster: {first_line(exc)}") from None
    except Exception as exc:  # Ray raises many kinds while starting
        raise ClusterError(f"cannot start or join a Ray cluster: {first_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _cluster_here() -> str:
    """What ``auto`` joins: RAY_ADDRESS, else the cluster that 'ray start'
    recorded on this machine if it still answers, else a new local one.
    (Ray itself would wait minutes on a recorded cluster that has died.)"""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        # The address file 'ray start' writes (not Ray's scan of this
        # machine's processes, which also finds clusters of other users).
        from ray._private.utils import read_ray_address

        recorded = read_ray_address()
    except Exception:  # Ray moved it: join nothing by guesswork
        recorded = None
    if not recorded:
        return "local"
    try:
        _check_reachable(recorded)
    except ImgsearchError:
        logger.info("the Ray cluster recorded at %s is gone; starting a local one", recorded)
        return "local"
    return recorded


# -- checking the nodes ----------------------------------------------------

def _probe(spec: dict) -> str | None:
    """Runs on a node: why it cannot make the driver's vectors, or None."""
    import imgsearch
    from .encoders import load_registry
    from .errors import ImgsearchError

    if imgsearch.__version__ != spec["version"]:
        return (f"imgsearch {imgsearch.__version__} is installed there, {spec['version']} here; "
                "install the same version on every node")
    if spec["plugins_dir"] and not os.path.isdir(spec["plugins_dir"]):
        return f"the plugins folder {spec['plugins_dir']} is not there; make it readable on every node"
    try:
        registry = load_registry(spec["plugins_dir"])
        if spec["encoder"] not in registry:
            return (f"encoder {spec['encoder']!r} is not installed there; install its plugin package on "
                    "every node")
        encoder = registry.create(spec["encoder"], spec["weights"])
        status = encoder.weights_status()
        if not status.available:
            return f"the {spec['encoder']} weights are not there ({status.detail}); copy them to every node"
        if encoder.weights_fingerprint() != spec["fingerprint"]:
            return f"its {spec['encoder']} weights differ from this machine's ({spec['weights']})"
        if encoder.preprocessing.to_dict() != spec["preprocessing"]:
            return f"another version of encoder {spec['encoder']!r} is installed there"
        if spec["openvino"]:
            from .runtime import openvino_version

            try:
                there = openvino_version()
            except ImportError:
                return "OpenVINO is not installed there (the index is int8); pip install openvino"
            if there != spec["openvino"]:
                return (f"OpenVINO {there} is installed there, {spec['openvino']} here; the int8 model "
                        "needs the same version on every node")
    except ImgsearchError as exc:
        return str(exc)
    return None


def check_nodes(ray, spec: WorkerSpec) -> list[dict]:
    """Run :func:`_probe` on every alive node; the nodes, or ClusterError."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    pending = {
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
        .remote(spec.light()): n for n in nodes
    }
    try:
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
    except Exception as exc:
        raise ClusterError(f"cannot check the Ray nodes: {first_line(exc)}") from None
    if late:
        raise ClusterError(f"node {pending[late[0]]['NodeManagerAddress']} did not answer within "
                           f"{PROBE_TIMEOUT_S} s")
    usable = []
    for ref in ready:
        node = pending[ref]
        try:
            problem = ray.get(ref)
        except Exception as exc:
            text = str(exc)
            if "doesn't exist any more" in text or isinstance(exc, ray.exceptions.NodeDiedError):
                continue  # a node lost moments ago, not yet marked dead: the others carry on
            if "No module named 'imgsearch" in text:
                problem = f"imgsearch is not installed there; {INSTALL_HINT} on every node"
            else:
                problem = first_line(exc)
        if problem:
            raise ClusterError(f"Ray node {node['NodeManagerAddress']} cannot run the encoder: {problem}")
        usable.append(node)
    if not usable:
        raise ClusterError("the Ray cluster has no live nodes")
    return usable


def _actor_plan(nodes: list[dict], gpus_per_actor: float) -> tuple[int, dict]:
    """How many encoding actors, and the resources each asks for."""
    if gpus_per_actor:
        total = sum(n["Resources"].get("GPU", 0) for n in nodes)
        count = int(total // gpus_per_actor)
        if count < 1:
            raise ClusterError(f"the Ray cluster has {total:g} GPUs, fewer than --ray-gpus {gpus_per_actor:g}")
        return count, {"num_gpus": gpus_per_actor, "num_cpus": 1}
    cpus = [n["Resources"].get("CPU", 0) for n in nodes if n["Resources"].get("CPU", 0) > 0]
    if not cpus:
        raise ClusterError("the Ray cluster has no CPUs to run the encoder on")
    # One actor per node, leaving a share for the decoding tasks: the
    # encoder runtime uses every core of its node by itself.
    share = max(DECODE_CPUS, min(cpus) - 2 * DECODE_CPUS)
    return len(cpus), {"num_cpus": share}


# -- the work --------------------------------------------------------------

_COLUMNS = ("path", "sha256", "size", "mtime", "width", "height", "reason")


def _decode(batch: dict, spec: dict) -> dict:
    """Runs in a map task: read, hash and decode a batch of files."""
    from .hashing import sha256_bytes
    from .preprocessing import Preprocessing

    preprocessing = Preprocessing(**spec["preprocessing"])
    side = preprocessing.input_size
    paths = [str(p) for p in batch["path"]]
    out = {name: [] for name in _COLUMNS}
    pixels = np.zeros((len(paths), side, side, 3), np.uint8)
    for row, path in enumerate(paths):
        sha, size, mtime, shape, reason = "", 0, 0.0, (0, 0), ""
        try:
            stat = os.stat(path)
            data = imgs.read_bytes(path)
            sha, size, mtime = sha256_bytes(data), stat.st_size, stat.st_mtime
            pixels[row], shape = imgs.to_pixels(data, preprocessing, max_megapixels=spec["max_megapixels"],
                                                formats=spec["formats"])
        except Exception as exc:  # one bad file must not stop the run
            reason = imgs.skip_reason(exc)
        for name, value in zip(_COLUMNS, (path, sha, size, mtime, shape[0], shape[1], reason)):
            out[name].append(value)
    columns = {name: np.asarray(values) for name, values in out.items()}
    columns["path"] = np.asarray(paths, dtype=object)
    columns["sha256"] = np.asarray(out["sha256"], dtype=object)
    columns["reason"] = np.asarray(out["reason"], dtype=object)
    columns["pixels"] = pixels
    return columns


class _Encode:
    """Runs as a Ray actor: the encoder, loaded once, over decoded batches."""

    SPEC: dict = {}

    def __init__(self):
        from .encoders import load_registry
        from .runtime import RuntimeOptions

        spec = self.SPEC
        encoder = load_registry(spec["plugins_dir"]).create(spec["encoder"], spec["weights"])
        options = RuntimeOptions(spec["runtime"], spec["precision"], calibration_id=spec["calibration"])
        if spec["model_files"]:
            from .runtime import install_calibrated_model

            install_calibrated_model(encoder, options, spec["model_files"])
        encoder.use_runtime(options)
        self.encoder = encoder.ensure_loaded()

    def __call__(self, batch: dict) -> dict:
        from .encoders import l2_normalize

        pixels = batch.pop("pixels")
        ok = np.asarray([not reason for reason in batch["reason"]], dtype=bool)
        vectors = np.zeros((len(ok), self.encoder.dim), np.float32)
        if ok.any():
            vectors[ok] = l2_normalize(self.encoder.embed_pixels(pixels[ok]))
        batch["vector"] = vectors
        batch["runtime"] = np.asarray([self.encoder.runtime_name] * len(ok), dtype=object)
        return batch


def _encoder_actor(spec: dict) -> type:
    """The actor class with ``spec`` built in."""
    return type("Encode", (_Encode,), {"SPEC": spec})


@dataclass(frozen=True)
class Embedded:
    """One file as a worker saw it: its facts and vector, or why it was skipped."""

    path: str
    sha256: str
    size: int
    mtime: float
    width: int
    height: int
    vector: np.ndarray | None
    reason: str | None


def _pipeline(ray, paths, spec, actors, resources):
    """Decoding tasks feeding a pool of encoding actors."""
    # Blocks of a batch each keep every worker busy without holding many
    # decoded images in the object store.
    blocks = max(1, len(paths) // spec.batch_size)
    actors = min(actors, blocks)  # an actor without a block would only load the model
    return (
        ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
        .map_batches(_decode, fn_kwargs={"spec": spec.light()}, batch_size=spec.batch_size,
                     batch_format="numpy", num_cpus=DECODE_CPUS)
        .map_batches(_encoder_actor(asdict(spec)), batch_size=spec.batch_size,
                     batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                     # A lost actor ends the run rather than being restarted:
                     # Ray warns at every start that restarts of Ray Data's
                     # actors may fail, and the driver has committed all it
                     # received, so running the command again resumes.
                     max_restarts=0, scheduling_strategy="SPREAD", **resources)
    )


def _batches(ray, dataset):
    """The dataset's batches; a lost node or worker becomes a one-line error."""
    lost = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, ray.exceptions.NodeDiedError,
            ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
    except lost as exc:
        raise ClusterError(f"a Ray worker or node was lost ({type(exc).__name__})") from None
    except ray.exceptions.RayError as exc:
        raise ClusterError(f"the Ray run failed ({first_line(exc)})") from None


def embed(ray, paths: list[str], spec: WorkerSpec, *, gpus_per_actor: float = 0.0):
    """Yield an :class:`Embedded` for each path, in the order given."""
    if not paths:
        return
    nodes = check_nodes(ray, spec)
    actors, resources = _actor_plan(nodes, gpus_per_actor)
    context = ray.data.DataContext.get_current()
    _quiet_ray()  # again: Ray Data sets up its own logging when first used
    context.execution_options.preserve_order = True  # the driver commits in file order
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    with warnings.catch_warnings():
        # max_restarts is passed the way Ray 2.60 deprecates (it names no
        # replacement yet); the extra pins Ray below the release that drops it.
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = _pipeline(ray, paths, spec, actors, resources)
    for batch in _batches(ray, dataset):
        for row in range(len(batch["path"])):
            reason = batch["reason"][row] or None
            if effective_precision(batch["runtime"][row]) != spec.ran_as:
                # bf16 falls back to fp32 on CPUs without it: an index's
                # vectors must all be made at one precision.
                raise ClusterError(f"a Ray worker runs {spec.encoder} as {batch['runtime'][row]}, but this "
                                   f"machine at {spec.ran_as}; use a --precision that every node can run")
            yield Embedded(str(batch["path"][row]), str(batch["sha256"][row]), int(batch["size"][row]),
                           float(batch["mtime"][row]), int(batch["width"][row]), int(batch["height"][row]),
                           None if reason else batch["vector"][row], reason)
