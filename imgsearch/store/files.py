"""Files written whole or not at all, the writer lock, and signals held
around commits: the filesystem rules every part of the store follows."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from ..errors import BadIndexError, IndexLockedError

LOCK_FILE = "write.lock"


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written temporary file visible under its final name."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_error(directory: Path, name: str, exc: BaseException) -> BadIndexError:
    """A failed write (full disk, permissions) as a one-line error."""
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return BadIndexError(f"cannot write index file {name} in {directory} ({reason}); the index is unchanged")


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT and SIGTERM until the block is done, then deliver them.

    A commit interrupted between SQLite's commit and the bookkeeping after it
    would believe it failed and remove the segment it had just made current;
    the signal is only postponed by the milliseconds a commit takes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    received: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in watched}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


def lock(directory: Path, *, create: bool = True):
    """Take the folder's writer lock, or raise IndexLockedError.  Without
    ``create`` (a reader that must see no commit land, such as ``verify``)
    the lock file is only opened for reading, and a folder without one is
    not locked at all: nothing is written."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform; single writer is on the user
        return None
    try:
        if not create:
            if not (directory / LOCK_FILE).exists():
                return None
            handle = open(directory / LOCK_FILE, "r")
        else:
            handle = open(directory / LOCK_FILE, "a+")
    except OSError as exc:
        raise BadIndexError(f"cannot write to index {directory}: {exc.strerror or exc}") from None
    try:
        # flock is dropped by the kernel when the holder dies, so a crashed
        # writer never leaves the index locked.
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise IndexLockedError(
            f"index {directory} is being written by another process; try again when it finishes"
        ) from None
    return handle
