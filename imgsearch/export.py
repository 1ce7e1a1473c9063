"""An index's images, metadata and vectors written out for other tools.

Three forms, all with one record per indexed image (identical files stored
once appear once, their other paths in ``also_at``):

- ``jsonl``: one JSON object a line, the vector as a list of numbers (or
  without it: a listing of what the index holds);
- ``npy``: a folder with ``vectors.npy`` (float32, one row per image) and
  ``metadata.jsonl`` whose n-th line describes the n-th row;
- ``parquet``: one table, the vector a fixed-size list of float32 (needs
  pyarrow: ``pip install 'imgsearch[export]'``).

Vectors are the stored unit vectors, so an inner product is the cosine
similarity ``query`` reports.  Rows and vectors come from one commit, read a
batch at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ImgsearchError, UsageError

FORMATS = ("jsonl", "npy", "parquet")
_BATCH = 10_000


def check_target(target, fmt: str, index_dir=None) -> None:
    """:class:`UsageError` unless ``target`` can take an export in ``fmt``
    without overwriting anything, outside the folder of the index
    ``index_dir``; checked before any work."""
    from .outputs import check_output_folder, inside

    if fmt not in FORMATS:
        raise UsageError(f"export format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "jsonl" and str(target) == "-":
        return
    path = Path(target)
    if index_dir is not None and inside(path, index_dir):
        raise UsageError(f"{target} is inside the index folder; choose another place")
    if fmt == "npy":
        check_output_folder(path, "the export folder")
        if path.is_dir() and any(path.iterdir()):
            raise UsageError(f"the export folder {target} is not empty; choose a new one")
        return
    if path.exists():
        raise UsageError(f"{target} exists; choose a new file")
    check_output_folder(path.parent if str(path.parent) else ".", "the export file's folder")
    if fmt == "parquet":
        _pyarrow()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImgsearchError("exporting to parquet needs pyarrow: pip install 'imgsearch[export]'") from None
    return pyarrow


def export(index, target, fmt: str, *, vectors: bool = True,
           progress: Callable[[int, int], None] | None = None) -> int:
    """Write ``index`` (an open :class:`~imgsearch.index.Index`) to
    ``target`` in ``fmt`` (see the module's description; ``"-"`` with jsonl
    is standard output).  ``vectors=False`` leaves the vectors out (jsonl
    only).  Returns the number of images written."""
    check_target(target, fmt, index.store.directory)
    if not vectors and fmt != "jsonl":
        raise UsageError("only the jsonl form can leave the vectors out")
    store = index.store
    with store.reading():  # rows and vectors of one commit
        also_at: dict[int, list[str]] = {}
        for alias in store.aliases():
            also_at.setdefault(alias.image_id, []).append(alias.path)
        entries = store.entries()
        writer = {"jsonl": _JsonLines, "npy": _NumpyFolder, "parquet": _Parquet}[fmt](target, store.dim,
                                                                                      len(entries))
        try:
            for start in range(0, len(entries), _BATCH):
                batch = entries[start:start + _BATCH]
                rows = [{"id": e.id, "path": e.path, "label": e.label, "sha256": e.sha256, "width": e.width,
                         "height": e.height, "also_at": also_at.get(e.id, [])} for e in batch]
                writer.write(rows, store.vectors([e.id for e in batch]) if vectors else None)
                if progress:
                    progress(start + len(batch), len(entries))
        except BaseException:
            writer.abandon()
            raise
        writer.close()
    return len(entries)


class _JsonLines:
    def __init__(self, target, dim: int, total: int):
        self.target = target
        self.handle = None if str(target) == "-" else open(target, "w", encoding="utf-8")

    def write(self, rows, matrix) -> None:
        import sys

        out = self.handle or sys.stdout
        for number, row in enumerate(rows):
            if matrix is not None:
                row = dict(row, vector=[float(x) for x in matrix[number]])
            out.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()

    def abandon(self) -> None:
        if self.handle is not None:
            self.handle.close()
            os.unlink(self.target)  # half an export is worse than none


class _NumpyFolder:
    def __init__(self, target, dim: int, total: int):
        self.folder = Path(target)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Written in place a batch at a time: an export never holds all vectors.
        self.vectors = np.lib.format.open_memmap(self.folder / "vectors.npy", mode="w+", dtype=np.float32,
                                                 shape=(total, dim)) if total else None
        if not total:  # an empty file cannot be mapped
            np.save(self.folder / "vectors.npy", np.empty((0, dim), np.float32))
        self.metadata = open(self.folder / "metadata.jsonl", "w", encoding="utf-8")
        self.row = 0

    def write(self, rows, matrix) -> None:
        self.vectors[self.row:self.row + len(rows)] = matrix
        for number, row in enumerate(rows):
            self.metadata.write(json.dumps(dict(row, row=self.row + number)) + "\n")
        self.row += len(rows)

    def close(self) -> None:
        if self.vectors is not None:
            self.vectors.flush()
        self.vectors = None
        self.metadata.close()

    def abandon(self) -> None:
        self.vectors = None
        self.metadata.close()
        for name in ("vectors.npy", "metadata.jsonl"):
            (self.folder / name).unlink(missing_ok=True)


class _Parquet:
    def __init__(self, target, dim: int, total: int):
        self.pa = _pyarrow()
        self.target = target
        self.schema = self.pa.schema([
            ("id", self.pa.int64()), ("path", self.pa.string()), ("label", self.pa.string()),
            ("sha256", self.pa.string()), ("width", self.pa.int32()), ("height", self.pa.int32()),
            ("also_at", self.pa.list_(self.pa.string())), ("vector", self.pa.list_(self.pa.float32(), dim)),
        ])
        self.writer = self.pa.parquet.ParquetWriter(target, self.schema)

    def write(self, rows, matrix) -> None:
        columns = {name: [row[name] for row in rows] for name in self.schema.names if name != "vector"}
        flat = self.pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
        columns["vector"] = self.pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])
        self.writer.write_table(self.pa.table(columns, schema=self.schema))

    def close(self) -> None:
        self.writer.close()

    def abandon(self) -> None:
        self.writer.close()
        os.unlink(self.target)
