"""imgsearch: image similarity search with pluggable encoders and FAISS.

The public API is imported lazily so that ``import imgsearch`` (and the CLI's
``--help``) stays fast; nothing here imports a deep-learning framework.
"""

import logging

__version__ = "0.1.0"

# The library never prints: its notices go to logging, and without a handler
# of the application's own they go nowhere (Python would otherwise print
# warnings through its last-resort handler).  The CLI installs one.
logging.getLogger(__name__).addHandler(logging.NullHandler())

_EXPORTS = {
    "Index": "imgsearch.index",
    "AddReport": "imgsearch.index",
    "QueryResult": "imgsearch.index",
    "Classification": "imgsearch.index",
    "Encoder": "imgsearch.encoders",
    "Registry": "imgsearch.encoders",
    "WeightsStatus": "imgsearch.encoders",
    "load_registry": "imgsearch.encoders",
    "l2_normalize": "imgsearch.encoders",
    "Preprocessing": "imgsearch.preprocessing",
    "ImgsearchError": "imgsearch.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'imgsearch' has no attribute {name!r}")
