"""Approximate indexes over the settled part of an index, chosen and tuned
for the user.

``optimize`` merges an index's vectors into one segment and builds one of
these over it; newer segments stay searchable exactly until the next merge.

| type      | what FAISS holds                          | memory for 1M x 2048 |
| --------- | ----------------------------------------- | -------------------- |
| flat      | nothing: exact search over the segment    | 8 GB (the vectors)   |
| hnsw      | an HNSW graph over 8-bit scalar codes     | about 2.3 GB         |
| ivf-sq8   | inverted lists of 8-bit scalar codes      | about 2 GB           |
| ivf-pq    | inverted lists of product-quantizer codes | about 0.15 GB        |

Every approximate answer is re-ranked with the exact vectors (read from the
segment, only for the candidates), so scores are exact cosine
similarities whichever type found them.  IVF files are memory-mapped: a
cold query reads the lists it probes, not the whole index.  HNSW is read
whole; ``auto`` never picks it, it is there for users who serve warm.

``auto`` picks flat below :data:`FLAT_BELOW` vectors, else ivf-sq8 when its
codes fit the memory budget, else ivf-pq.  The search parameter (nprobe or
efSearch) is the smallest that reaches the target recall@10 against exact
search, measured on vectors held back from the index's own, and recorded in
the manifest with the recall it reached.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np

from ..errors import DamagedIndexError, UsageError
from .files import publish, write_error

TYPES = ("auto", "flat", "hnsw", "ivf-sq8", "ivf-pq")
DEFAULT_TARGET_RECALL = 0.95
FLAT_BELOW = 50_000
RECALL_K = 10
HELD_BACK = 200          # query vectors for measuring recall
REFINE = {"hnsw": 4, "ivf-sq8": 4, "ivf-pq": 16}  # candidates re-ranked per result
# How far below a range-search threshold coded scores may fall for vectors
# truly above it: 8-bit codes move an inner product by well under 0.01.
# Product-quantizer codes move it too far for a fixed margin (recall 0.90
# at 0.2 in the tests), so ivf-pq, like hnsw, answers a range search
# through its re-ranked k-nearest search.
RANGE_SLACK = {"ivf-sq8": 0.05}
_TRAIN_PER_LIST = 32     # k-means sample per inverted list
_MAX_TRAIN = 131_072


def default_max_memory() -> int:
    """A quarter of the machine's memory, at most 4 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return int(min(4 << 30, total // 4))


def check_settings(index_type: str, target_recall: float, max_memory: int | None) -> None:
    if index_type not in TYPES:
        raise UsageError(f"index type must be one of {', '.join(TYPES)}, not {index_type!r}")
    if not (0 < float(target_recall) <= 1):
        raise UsageError(f"target recall must be above 0 and at most 1, not {target_recall}")
    if max_memory is not None and max_memory <= 0:
        raise UsageError("the memory budget must be positive")


def parse_memory(text: str) -> int:
    """``"2G"``, ``"512M"``, ``"1.5GB"`` or a number of bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in units and value[-1:] else ""
    try:
        number = float(value[:-1] if unit else value)
    except ValueError:
        raise UsageError(f"memory budget {text!r} is not a size such as 2G or 512M") from None
    if not (number > 0 and math.isfinite(number)):
        raise UsageError(f"memory budget {text!r} must be positive")
    return int(number * units[unit])


def nlist_for(count: int) -> int:
    """Inverted lists: about 2 sqrt(n), a power of two, 16 to 4096 (2048
    at a million: k-means over 2048-d vectors costs minutes beyond that on
    two cores, and the probes needed for the target recall stay cheap)."""
    return int(min(4096, max(16, 2 ** round(math.log2(2 * math.sqrt(max(count, 1)))))))


def pq_m(dim: int) -> int:
    """Sub-quantizers for ivf-pq: 8 dimensions each where that divides."""
    for m in (dim // 8, dim // 4, dim // 2, dim):
        if m and dim % m == 0 and m <= 512:
            return m
    return 1


def memory_needed(index_type: str, count: int, dim: int) -> int:
    """Bytes the type keeps in memory for warm queries at full speed."""
    if index_type == "flat":
        return count * dim * 4
    lists = nlist_for(count) * dim * 4
    if index_type == "ivf-sq8":
        return count * (dim + 8) + lists
    if index_type == "ivf-pq":
        return count * (pq_m(dim) + 8) + lists + 256 * dim * 4
    if index_type == "hnsw":
        return count * (dim + 32 * 2 * 4 + 16)
    raise ValueError(index_type)


# Below these many vectors a type cannot be trained (product quantizers
# learn 256 centroids per part; HNSW and IVF need a few per list).
MIN_VECTORS = {"flat": 0, "hnsw": 2, "ivf-sq8": 2, "ivf-pq": 256}


def choose(count: int, dim: int, max_memory: int) -> str:
    if count < FLAT_BELOW:
        return "flat"
    if memory_needed("ivf-sq8", count, dim) <= max_memory:
        return "ivf-sq8"
    return "ivf-pq"


def _factory(index_type: str, count: int, dim: int):
    import faiss

    if index_type == "hnsw":
        return faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, 32, faiss.METRIC_INNER_PRODUCT)
    nlist = min(nlist_for(count), max(1, count // 8))
    quantizer = faiss.IndexFlatIP(dim)
    if index_type == "ivf-sq8":
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m(dim), 8, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    # Small indexes have fewer training points than FAISS likes per centroid;
    # it would print a warning for each k-means it runs.
    index.cp.min_points_per_centroid = 1
    index.cp.niter = 10  # FAISS runs 25 rounds: minutes at 2048-d; nprobe is tuned afterwards anyway
    if index_type == "ivf-pq":
        index.pq.cp.min_points_per_centroid = 1
    return index


def _sweep(index_type: str, index) -> list[int]:
    if index_type == "hnsw":
        return [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    return [p for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
            if p <= index.nlist] + ([index.nlist] if index.nlist > 512 else [])


def _params(index_type: str, value: int, skip: np.ndarray | None):
    import faiss

    selector = bits = None
    if skip is not None and skip.any():
        # One bit per row that may answer: as cheap for a few removed rows
        # as for a search restricted to a small part of the index.
        bits = np.packbits(~skip, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(skip), faiss.swig_ptr(bits))
    if index_type == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=int(value))
    else:
        params = faiss.SearchParametersIVF(nprobe=int(value))
    if selector is not None:
        params.sel = selector
    return params, (selector, bits)  # both must outlive the search


def _refine(segment, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each query's candidate rows; the best ``k``."""
    from .segments import pad, top_k

    wanted = np.unique(rows[rows >= 0])
    vectors = segment.rows(wanted)
    at = np.searchsorted(wanted, np.maximum(rows, 0))
    scores = np.einsum("nd,nkd->nk", queries, vectors[at]) if len(wanted) else np.zeros(rows.shape, np.float32)
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    best, best_rows = top_k(scores, rows, min(k, rows.shape[1]))
    return pad(best, best_rows, k)


class AnnIndex:
    """An approximate index over one segment, as recorded in the manifest."""

    def __init__(self, index, built: dict, segment):
        self.index, self.built, self.segment = index, built, segment
        self.type = built["type"]
        self.file = built.get("file")

    @classmethod
    def open(cls, directory: Path, built: dict, segment) -> "AnnIndex":
        import faiss


        path = directory / built["file"]
        size = os.stat(path).st_size  # FileNotFoundError: the caller may retry
        if size != built.get("bytes"):
            raise DamagedIndexError(f"index {directory} is damaged: {built['file']} has {size} bytes, "
                                    f"{built.get('bytes')} recorded")
        flags = faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_MMAP if built["type"].startswith("ivf") else 0)
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError:
            if not path.exists():  # a merge replaced it just now: the caller retries
                raise FileNotFoundError(2, "no such file", str(path)) from None
            raise DamagedIndexError(f"index {directory} is damaged: cannot read {built['file']}") from None
        if index.ntotal != segment.count or index.d != segment.dim:
            raise DamagedIndexError(f"index {directory} is damaged: {built['file']} does not fit its segment")
        return cls(index, built, segment)

    def checksum_ok(self) -> bool:
        from ..hashing import sha256_file

        return sha256_file(self.segment.path.with_name(self.file)) == self.built.get("sha256")

    def search(self, queries: np.ndarray, k: int, value: int | None = None,
               widen: bool = True, skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows ``(n, k)`` of the segment, best first, exact scores.

        Removed vectors are skipped inside FAISS, so the lists next to a
        query may hold fewer live candidates than when the search was tuned:
        an IVF search then probes lists, nearest first, until it scans as
        many live vectors as the tuned probes scan in a whole index; HNSW
        widens its beam by the share removed.  Either doubles its reach
        while some query is still short of ``k`` results (``widen``; tuning
        turns it off to measure the parameter itself).  ``skip``: rows that
        may not answer (default the removed ones), treated the same way."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        dead = self.segment.dead if skip is None else skip
        live = self.segment.count - int(dead.sum())
        value = value or self.built["params"]["value"]
        wanted = min(live, k * self.built["params"]["refine"])
        if wanted <= 0:
            return _refine(self.segment, queries, np.full((len(queries), 0), -1, np.int64), k)
        most = getattr(self.index, "nlist", None) or max(self.segment.count, value)
        if live < self.segment.count:
            value = self._reach(queries, value, dead)
        while True:
            params, _selector = _params(self.type, min(value, most), dead)
            _, rows = self.index.search(queries, wanted, params=params)
            if not widen or value >= most or (rows >= 0).sum(axis=1).min() >= min(k, live):
                return _refine(self.segment, queries, rows, k)
            value *= 2

    def range_search(self, queries: np.ndarray, threshold: float) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Rows of the segment at exact cosine >= ``threshold`` from each
        query, best first, as (scores, rows); None for a type without a
        range search here (ivf-pq, hnsw: the caller uses their k-nearest
        search).

        FAISS's own range search over the inverted lists, at the tuned
        probes, collects candidates whose coded score reaches the threshold
        less :data:`RANGE_SLACK` (codes only approximate the vectors); the
        candidates alone are then scored exactly.  Near-duplicates are few,
        so this reads a handful of vectors a query where a k-nearest search
        re-ranks k times the refine factor."""
        if self.type not in RANGE_SLACK:
            return None
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        value = self.built["params"]["value"]
        if self.segment.live < self.segment.count:
            value = self._reach(queries, value, self.segment.dead)
        params, _selector = _params(self.type, min(value, self.index.nlist), self.segment.dead)
        lims, _, rows = self.index.range_search(queries, float(threshold) - RANGE_SLACK[self.type], params=params)
        lims = lims.astype(np.int64)
        owner = np.repeat(np.arange(len(queries)), np.diff(lims))
        wanted = np.unique(rows)
        vectors = self.segment.rows(wanted)
        exact = np.einsum("nd,nd->n", queries[owner], vectors[np.searchsorted(wanted, rows)])
        out = []
        for number in range(len(queries)):
            mine = slice(lims[number], lims[number + 1])
            keep = exact[mine] >= threshold
            scores, found = exact[mine][keep], rows[mine][keep]
            order = np.lexsort((found, -scores))
            out.append((scores[order].astype(np.float32), found[order]))
        return out

    def _reach(self, queries: np.ndarray, value: int, skip: np.ndarray) -> int:
        """The probes (or beam) that make up for the rows skipped."""
        if self.type == "hnsw":
            return int(math.ceil(value * self.segment.count / max(self.segment.count - int(skip.sum()), 1)))
        nlist = self.index.nlist
        key = hashlib.blake2b(np.packbits(skip).tobytes(), digest_size=16).digest()
        if getattr(self, "_live_lists", (None, None))[1] != key:
            import faiss

            lists = self.index.invlists
            counts = np.zeros(nlist, np.int64)
            for number in range(nlist):
                size = lists.list_size(number)
                if size:
                    ids = faiss.rev_swig_ptr(lists.get_ids(number), size)
                    counts[number] = size - int(skip[ids].sum())
            self._live_lists = (counts, key)
        counts = self._live_lists[0]
        # What the tuned probes scan, on average, with nothing removed.
        target = value * self.segment.count / nlist
        _, order = self.index.quantizer.search(queries, nlist)
        scanned = np.cumsum(counts[order], axis=1)
        needed = np.minimum(np.argmax(scanned >= target, axis=1) + 1, nlist)
        needed[scanned[:, -1] < target] = nlist
        return int(max(value, needed.max()))

    @property
    def memory(self) -> int:
        return int(self.built.get("memory", 0))


def build(directory: Path, name: str, index_type: str, segment, *, target_recall: float,
          seed: int = 0, progress=None) -> tuple[dict, "AnnIndex | None"]:
    """Build, tune and write an approximate index over ``segment`` (all its
    rows live); returns what the manifest records and the open index."""
    import faiss

    from ..hashing import sha256_file

    count, dim = segment.count, segment.dim
    if index_type == "flat":  # exact: nothing to build or measure
        return {"type": "flat", "recall_at_10": 1.0, "target_recall": target_recall,
                "memory": memory_needed("flat", count, dim), "vectors": count}, None
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(count, size=min(HELD_BACK, count), replace=False))
    queries = segment.rows(held)
    truth = _exact_neighbours(segment, queries, held)
    index = _factory(index_type, count, dim)
    try:
        if not index.is_trained:
            train_rows = np.sort(rng.choice(count, size=min(count, _MAX_TRAIN, max(
                _TRAIN_PER_LIST * getattr(index, "nlist", 256), 256 * 40)), replace=False))
            index.train(segment.rows(train_rows))
        for start, _, vectors in segment.chunks():
            index.add(np.ascontiguousarray(vectors))
            if progress:
                progress(start + len(vectors), count)
    except RuntimeError as exc:  # FAISS's own refusals, as one line
        from ..errors import ImgsearchError

        raise ImgsearchError(f"cannot build a {index_type} index over {count} vectors "
                             f"({str(exc).strip().splitlines()[-1]})") from None
    refine = REFINE[index_type]
    built = {"type": index_type, "target_recall": target_recall, "vectors": count,
             "params": {"refine": refine}, "memory": memory_needed(index_type, count, dim)}
    if index_type != "hnsw":
        built["params"]["nlist"] = int(index.nlist)
    trial = AnnIndex(index, built, segment)
    reached, value = 0.0, None
    for value in _sweep(index_type, index):
        built["params"]["value"] = value
        reached = _recall(trial, queries, held, truth)
        if reached >= target_recall:
            break
    built["recall_at_10"] = round(reached, 4)
    built["params"]["name"] = "efSearch" if index_type == "hnsw" else "nprobe"
    tmp = directory / (name + ".tmp")
    try:
        faiss.write_index(index, str(tmp))
        publish(tmp, directory / name)
    except (RuntimeError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(directory, tmp.name, exc) from None
    built.update(file=name, bytes=(directory / name).stat().st_size, sha256=sha256_file(directory / name))
    return built, AnnIndex.open(directory, built, segment)


def _exact_neighbours(segment, queries: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Exact top-10 rows of each held-back vector, itself left out."""
    _, rows = segment.search(queries, RECALL_K + 1, mapped=False)  # one pass: plain reads
    truth = np.full((len(rows), RECALL_K), -1, dtype=np.int64)
    for out, row, self_row in zip(truth, rows, held):
        kept = [r for r in row if r != self_row and r >= 0][:RECALL_K]
        out[:len(kept)] = kept
    return truth


def _recall(index: AnnIndex, queries: np.ndarray, held: np.ndarray, truth: np.ndarray) -> float:
    _, rows = index.search(queries, RECALL_K + 1, widen=False)
    found = 0
    for row, self_row, expected in zip(rows, held, truth):
        got = [r for r in row if r != self_row and r >= 0][:RECALL_K]
        found += len(set(got) & set(expected[expected >= 0].tolist()))
    return found / max(1, int((truth >= 0).sum()))
