"""A reader of PyTorch state dicts in the legacy (pre-1.6, non-zip) format.

The shipped weights are a ``torch.save`` file, but installing PyTorch only to
read a few megabytes of float arrays would add a gigabyte of dependencies.
The legacy format is simple enough to read directly:

1. a pickle of the magic number,
2. a pickle of the format version,
3. a pickle of a dict describing the writer's machine,
4. a pickle of the state dict, whose tensors are rebuilt by a torch helper
   and refer to their storages through persistent ids,
5. a pickle of the storage keys in the order their data follows,
6. per storage: an int64 element count, then the raw little-endian elements.

A pickle can call any importable function while it is being read, so every
pickle here goes through :class:`RestrictedUnpickler`, which knows only the
four globals such a file needs and replaces each with a stand-in of ours.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgsearch.errors import WeightsError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_VERSION = 1001

# Little-endian is what the format writes on every machine torch supports;
# naming the byte order keeps the reader right on a big-endian host too.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "LongStorage": np.dtype("<i8"),
}


class UnsafePickleError(WeightsError):
    """The file asked for something a state dict never needs."""


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` and friends become: only an element type."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage named in the pickle; its bytes come after the last pickle."""

    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _PendingTensor:
    """A tensor whose storage has not been read yet.

    Rebuilding must wait because the storages' bytes follow the pickle that
    describes the tensors.
    """

    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_):
    # Gradients and hooks mean nothing to inference, so they are dropped; the
    # trailing ``*_`` absorbs the metadata argument newer writers append.
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError("a tensor refers to something other than a storage")
    if not _is_int(storage_offset) or not _is_int_tuple(size) or not _is_int_tuple(stride):
        raise WeightsError("a tensor has a malformed offset, size or stride")
    if len(size) != len(stride):
        raise WeightsError("a tensor's size and stride differ in length")
    return _PendingTensor(storage, storage_offset, tuple(size), tuple(stride))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_tuple(value) -> bool:
    return isinstance(value, tuple) and all(_is_int(v) for v in value)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of a legacy state dict."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: a weights file has no use for it"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"unknown persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError("a storage has no known element type")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise WeightsError("a storage has a malformed key or size")
        if view_metadata is not None:
            # Storage views were written only by very old torch releases; the
            # weights this reader exists for have none, so failing beats
            # guessing at a layout nobody can test here.
            raise WeightsError("storage views are not supported")
        return _StorageRef(key, storage_type.dtype, numel)


def _load_restricted(stream):
    return RestrictedUnpickler(stream).load()


def _read_storages(stream, keys, refs: dict[str, _StorageRef]) -> dict[str, np.ndarray]:
    storages = {}
    for key in keys:
        ref = refs.get(key)
        if ref is None:
            raise WeightsError(f"storage {key!r} is listed but no tensor uses it")
        header = stream.read(8)
        if len(header) != 8:
            raise WeightsError("the file ends inside the storage data")
        (count,) = struct.unpack("<q", header)
        if count != ref.numel:
            raise WeightsError(f"storage {key!r} holds {count} elements, the pickle says {ref.numel}")
        raw = stream.read(count * ref.dtype.itemsize)
        if len(raw) != count * ref.dtype.itemsize:
            raise WeightsError("the file ends inside the storage data")
        storages[key] = np.frombuffer(raw, dtype=ref.dtype)
    if set(refs) - set(storages):
        missing = sorted(set(refs) - set(storages))[0]
        raise WeightsError(f"storage {missing!r} is used but has no data")
    return storages


def _materialise(name: str, pending: _PendingTensor, storage: np.ndarray) -> np.ndarray:
    size, stride, offset = pending.size, pending.stride, pending.offset
    if any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
        raise WeightsError(f"tensor {name!r} has a negative size, stride or offset")
    native = storage.dtype.newbyteorder("=")
    if 0 in size:
        return np.empty(size, dtype=native)
    # as_strided trusts its arguments and would read past the buffer, so the
    # furthest element a crafted stride could reach is checked first.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise WeightsError(f"tensor {name!r} reaches past the end of its storage")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=size,
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    # The copy detaches the tensor from the file buffer and makes it
    # contiguous, whatever layout the writer used (np.array rather than
    # ascontiguousarray, which would turn a scalar into shape (1,)).
    return np.array(view, dtype=native, order="C", copy=True)


def read_state_dict(path: str | Path, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """Tensor name to numpy array (float32 or int64) from a legacy ``.pth`` file.

    With ``expected_sha256`` the file is refused unless its digest matches,
    before any of it is unpickled.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    if expected_sha256 is not None:
        # Hashing the bytes already in memory, not the file again, means the
        # bytes checked are the bytes parsed.
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise WeightsError(
                f"weights file {path} has sha256 {actual}, expected {expected_sha256.lower()}; "
                "it is damaged or has been replaced"
            )
    try:
        return _parse(io.BytesIO(data))
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"weights file {path}: {exc}") from None
    except WeightsError as exc:
        raise WeightsError(f"weights file {path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, MemoryError) as exc:
        # Any of these means the bytes are not a legacy torch file; the
        # user needs the file name more than the parser's internals.
        raise WeightsError(f"weights file {path} is not a legacy PyTorch state dict ({type(exc).__name__})") from None


def _parse(stream) -> dict[str, np.ndarray]:
    if _load_restricted(stream) != LEGACY_MAGIC:
        raise WeightsError("not a legacy PyTorch file (bad magic number; newer zip files are not supported)")
    version = _load_restricted(stream)
    if version != LEGACY_VERSION:
        raise WeightsError(f"unsupported legacy format version {version!r}")
    sys_info = _load_restricted(stream)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise WeightsError("the file was written on a big-endian machine, which is not supported")
    state = _load_restricted(stream)
    if not isinstance(state, dict):
        raise WeightsError("the file does not hold a state dict")
    keys = _load_restricted(stream)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise WeightsError("the storage key list is malformed")

    refs: dict[str, _StorageRef] = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, _PendingTensor):
            raise WeightsError(f"entry {str(name)[:60]!r} is not a tensor")
        known = refs.setdefault(value.storage.key, value.storage)
        if known != value.storage:
            raise WeightsError(f"storage {value.storage.key!r} is described two different ways")
    storages = _read_storages(stream, keys, refs)
    return {name: _materialise(name, t, storages[t.storage.key]) for name, t in state.items()}
