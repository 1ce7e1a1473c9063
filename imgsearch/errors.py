"""The library's own exceptions.

Every error a user can cause or meet carries a message written for that user.
The CLI prints the message on one line and exits with ``exit_code``; library
callers can catch :class:`ImgsearchError` alone.
"""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, for wrapping into ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ImgsearchError(Exception):
    """Base class: a failure with a message fit to show a user."""

    exit_code = 1


class UsageError(ImgsearchError):
    """The request itself is wrong (bad option value, wrong kind of index)."""

    exit_code = 2


class UnknownEncoderError(UsageError):
    def __init__(self, name, known):
        names = ", ".join(sorted(known)) or "(none registered)"
        super().__init__(
            f"unknown encoder {name!r}; registered encoders: {names} "
            "(an encoder from a plugin file needs --plugins-dir or IMGSEARCH_PLUGINS_DIR)"
        )
        self.name = name
        self.known = sorted(known)


class PluginError(ImgsearchError):
    """A plugin could not be loaded or registered something invalid."""


class WeightsError(ImgsearchError):
    """An encoder's weights are missing, unreadable or do not fit the model."""


class BadIndexError(ImgsearchError):
    """The index directory is missing, damaged or not an index."""


class DamagedIndexError(BadIndexError):
    """The index's files are damaged or disagree with each other."""


class IndexMismatchError(UsageError):
    """The index was built with another encoder or other weights."""


class IndexLockedError(ImgsearchError):
    """Another process is writing to the index."""


class NoImagesError(UsageError):
    """The given paths held no image files."""


class Interrupted(ImgsearchError):
    """Ctrl-C or SIGTERM during long work; what was committed stays."""

    exit_code = 130
