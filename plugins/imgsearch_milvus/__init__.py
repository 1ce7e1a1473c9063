"""The Milvus backend: an index whose vectors live in a Milvus collection.

Registered through the ``imgsearch.backends`` entry points like any
third-party backend.  pymilvus is imported on first use, so the rest of
imgsearch works without it.

What lives where: the index folder keeps the SQLite metadata (every image,
its content hash, label and id: the record of what was embedded) and the
manifest, which names the server and the collection.  The collection holds
one row per image: its id (INT64 primary key) and its vector.

Commits and interruptions: new and changed vectors are upserted by id
before the metadata transaction, and removed ids deleted after it, noted
in the metadata first.  A crash between the two therefore leaves either
vectors under ids the metadata never used (deleted when the next writer
opens the index: they are at or above its next id) or deletions still owed
(done by the next writer).  Vectors are never kept twice: an image whose
vector went missing from the collection can only be embedded again from its
file, so ``verify --repair`` forgets it and the next ``index`` run re-embeds it.
"""

from __future__ import annotations

import calendar
import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from imgsearch.errors import BadIndexError, ImgsearchError, UsageError, first_line
from imgsearch.store import ann
from imgsearch.store.backend import Staged, VectorBackend

logger = logging.getLogger(__name__)

# Milvus index types for ours, and their build parameters.
INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf-sq8": "IVF_SQ8", "ivf-pq": "IVF_PQ"}
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 200
MAX_TOPK = 16384          # Milvus refuses a larger limit (and offset + limit in queries)
TRANSFER_BYTES = 8 << 20  # per upsert or read: well under gRPC's message limits
ID_RANGE = 10_000         # ids per query when listing a collection
FILTER_IDS = 4096         # ids per filter expression of a search among given ids
CONNECT_TIMEOUT = 10.0
# Reads of an index committed longer ago than this use Bounded consistency,
# which sees every write older than Milvus's grace period (5 s by default)
# and answers at once; fresher indexes, and writers, read Strong, which
# waits for the server's next time tick (about 200 ms a call).
FRESH_S = 60.0
INDEX_TIMEOUT = 3600.0


def register_backends(register):
    register(MilvusBackend)


def _pymilvus():
    # gRPC's fork handlers abort a child forked while its threads run (a
    # subprocess started after a Milvus call) and log a line at each fork;
    # nothing here forks to use gRPC in the child, so they are switched off.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        import pymilvus
    except ImportError:
        raise UsageError("the milvus backend needs pymilvus: pip install 'imgsearch[milvus]'") from None
    # pymilvus logs every failed call with its traceback; ours become one line.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    return pymilvus


def _resolve_uri(uri: str) -> str:
    """Server URIs as given; a Milvus Lite path made absolute, so that the
    index opens the same file from any working folder."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", uri, re.I):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _default_collection(directory: Path) -> str:
    """Milvus names: letters, digits and underscores, not starting with a digit."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(os.path.abspath(directory)).name)[:200]
    return f"imgsearch_{stem}"


class _Connection:
    """One client and collection, every failure turned into one line."""

    def __init__(self, uri: str, collection: str):
        self.uri, self.collection = uri, collection
        pymilvus = _pymilvus()
        self.MilvusException = pymilvus.MilvusException
        token = os.environ.get("IMGSEARCH_MILVUS_TOKEN", "")  # never recorded in the index
        try:
            self.client = pymilvus.MilvusClient(uri=uri, token=token, timeout=CONNECT_TIMEOUT)
        except Exception as exc:
            raise ImgsearchError(f"cannot reach Milvus at {uri} ({self._reason(exc)})") from None

    @staticmethod
    def _reason(exc: Exception) -> str:
        message = getattr(exc, "message", None) or first_line(exc)
        return str(message).strip().rstrip(".")

    def call(self, what: str, method: str, *args, **kwargs):
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as exc:
            raise ImgsearchError(f"Milvus at {self.uri}: {what} failed ({self._reason(exc)})") from None

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead connection: nothing left to release
            pass
        if "://" not in self.uri:
            # Milvus Lite serves a folder from a thread of this process and
            # keeps its lock until the process ends unless told to stop:
            # another process could not open the index meanwhile.
            try:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.uri)
            except Exception:  # an older milvus-lite: the lock goes with the process
                pass


class MilvusBackend(VectorBackend):
    name = "milvus"
    description = "a Milvus collection (server or Milvus Lite file)"

    def __init__(self, store, record: dict):
        super().__init__(store, record)
        self._connection: _Connection | None = None
        self._loaded = False

    # -- lifecycle --------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, dim: int, options: dict) -> dict:
        if not options.get("uri"):
            raise UsageError("--backend milvus needs --milvus-uri, e.g. http://localhost:19530 or vectors.db")
        unknown = set(options) - {"uri", "collection"}
        if unknown:
            raise UsageError(f"the milvus backend has no option {sorted(unknown)[0]!r}")
        uri = _resolve_uri(str(options["uri"]))
        collection = options.get("collection") or _default_collection(directory)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", collection):
            raise UsageError(f"Milvus collection name {collection!r} must be letters, digits and underscores, "
                             "not starting with a digit")
        connection = _Connection(uri, collection)
        try:
            made = False
            if connection.call("listing collections", "has_collection", collection):
                cls._check_schema(connection, dim)
                rows = cls._count(connection)
                if rows:
                    raise UsageError(f"Milvus collection {collection} at {uri} already holds {rows} vectors; "
                                     "name a new one with --milvus-collection")
            else:
                cls._make_collection(connection, dim)
                made = True
            identity = connection.call("describing the collection", "describe_collection", collection)
            return {"name": cls.name, "uri": uri, "collection": collection, "made_collection": made,
                    "collection_id": identity.get("collection_id")}
        finally:
            connection.close()

    @staticmethod
    def _make_collection(connection: _Connection, dim: int) -> None:
        pymilvus = _pymilvus()
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=int(dim))
        # Strong: a search right after a commit sees it (the default,
        # Bounded, may still return removed vectors for a moment).
        connection.call("creating collection " + connection.collection, "create_collection",
                        connection.collection, schema=schema, consistency_level="Strong")
        params = connection.client.prepare_index_params()
        params.add_index("vector", index_type="FLAT", metric_type="IP", params={})
        connection.call("indexing the collection", "create_index", connection.collection, params)
        connection.call("loading the collection", "load_collection", connection.collection)

    @staticmethod
    def _check_schema(connection: _Connection, dim: int) -> None:
        described = connection.call("describing the collection", "describe_collection", connection.collection)
        fields = {f["name"]: f for f in described.get("fields", [])}
        vector = fields.get("vector", {})
        found_dim = int((vector.get("params") or {}).get("dim", -1))
        primary = fields.get("id", {})
        if (set(fields) != {"id", "vector"} or not primary.get("is_primary")
                or _type_name(primary.get("type")) != "INT64" or _type_name(vector.get("type")) != "FLOAT_VECTOR"):
            raise UsageError(f"Milvus collection {connection.collection} at {connection.uri} holds other data "
                             f"(fields {', '.join(sorted(fields))}), not imgsearch vectors; name another "
                             "with --milvus-collection")
        if found_dim != dim:
            raise UsageError(f"Milvus collection {connection.collection} at {connection.uri} holds "
                             f"{found_dim}-d vectors, not {dim}-d; name another with --milvus-collection")

    @staticmethod
    def _count(connection: _Connection) -> int:
        rows = connection.call("counting vectors", "query", connection.collection, filter="",
                               output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    @property
    def connection(self) -> _Connection:
        """Connected on first use: opening an index to read its metadata
        alone (info's labels, a dry run) needs no server."""
        if self._connection is None:
            record = self.record_
            connection = _Connection(record["uri"], record["collection"])
            try:
                where = f"Milvus collection {record['collection']} at {record['uri']}"
                if not connection.call("listing collections", "has_collection", record["collection"]):
                    raise BadIndexError(f"index {self.store.directory} is damaged: {where} is gone")
                identity = connection.call("describing the collection", "describe_collection",
                                           record["collection"])
                if record.get("collection_id") and identity.get("collection_id") != record["collection_id"]:
                    raise BadIndexError(f"index {self.store.directory} is damaged: {where} is not the one it was "
                                        "built in (it was dropped and made again)")
                self._check_schema(connection, self.store.dim)
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        return self._connection

    def _ready(self) -> _Connection:
        """The connection, with the collection loaded for search and reads
        (a Milvus Lite process loads it for itself)."""
        connection = self.connection
        if not self._loaded:
            state = connection.call("checking the collection", "get_load_state", connection.collection)
            if "Loaded" not in str(state.get("state")):
                connection.call("loading the collection", "load_collection", connection.collection)
            self._loaded = True
        return connection

    def discard(self) -> None:
        if not self.record_.get("made_collection"):
            return
        connection = _Connection(self.record_["uri"], self.record_["collection"])
        try:
            connection.call("dropping the collection", "drop_collection", self.record_["collection"])
        finally:
            connection.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- committing -------------------------------------------------------
    def _rows_per_call(self) -> int:
        return max(1, TRANSFER_BYTES // (4 * self.store.dim))

    def stage(self, staged: Staged, vectors: np.ndarray) -> None:
        if not len(staged.ids):
            return
        connection = self._ready()
        step = self._rows_per_call()
        for start in range(0, len(staged.ids), step):
            rows = [{"id": int(i), "vector": v} for i, v in
                    zip(staged.ids[start:start + step], vectors[start:start + step])]
            connection.call("upserting vectors", "upsert", connection.collection, rows)

    def record(self, db, staged: Staged) -> None:
        # Deletions still owed to Milvus, until finish() has done them.
        db.executemany("INSERT OR IGNORE INTO tombstones (segment, id) VALUES (0, ?)",
                       [(int(i),) for i in staged.removed])

    def finish(self, staged: Staged) -> None:
        if len(staged.removed):
            self._delete_owed()

    def abandon(self, staged: Staged) -> None:
        # New ids are at or above the next id: strays that clean_up removes
        # anyway; trying now keeps searches clean meanwhile.
        fresh = [int(i) for i in staged.ids if i >= self.store.next_id]
        if fresh:
            try:
                self._delete(fresh)
            except ImgsearchError as exc:
                logger.warning("%s; the next write removes them", exc)

    def _delete(self, ids) -> None:
        connection = self._ready()
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), ID_RANGE):
            connection.call("deleting vectors", "delete", connection.collection, ids=ids[start:start + ID_RANGE])

    def _delete_owed(self) -> int:
        db = self.store._db
        owed = [i for (i,) in db.execute("SELECT id FROM tombstones WHERE segment = 0")]
        if owed:
            self._delete(owed)
            with db:
                db.execute("DELETE FROM tombstones WHERE segment = 0")
        return len(owed)

    def clean_up(self) -> None:
        self._delete_owed()
        connection = self._ready()
        connection.call("deleting vectors of an unfinished commit", "delete", connection.collection,
                        filter=f"id >= {int(self.store.next_id)}")

    # -- reading ----------------------------------------------------------
    def _search_params(self, k: int) -> dict:
        built = self.store.manifest.get("ann") or {}
        params = built.get("params") or {}
        if built.get("type") == "hnsw":
            return {"metric_type": "IP", "params": {"ef": max(int(params.get("value", 64)), k)}}
        if built.get("type", "").startswith("ivf"):
            return {"metric_type": "IP", "params": {"nprobe": int(params.get("value", 16))}}
        return {"metric_type": "IP", "params": {}}

    def _consistency(self) -> str:
        """How fresh reads must be (see FRESH_S)."""
        if self.store.writable:
            return "Strong"
        try:
            committed = calendar.timegm(time.strptime(self.store.manifest["updated"], "%Y-%m-%dT%H:%M:%SZ"))
        except (KeyError, TypeError, ValueError):
            return "Strong"
        return "Strong" if time.time() - committed < FRESH_S else "Bounded"

    def search_among(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A filtered search (``id in [...]``), a slice of the ids per
        expression, the slices' answers merged.  An approximate index then
        reaches as much further as the filter leaves out, as the local
        store does past skipped rows."""
        from imgsearch.store.segments import pad, top_k

        built = self.store.manifest.get("ann") or {}
        params = self._search_params(k)
        share = max(1, self.store.count) / max(1, len(ids))
        if built.get("type") == "hnsw":
            params["params"]["ef"] = min(MAX_TOPK, int(math.ceil(params["params"]["ef"] * share)))
        elif built.get("type", "").startswith("ivf"):
            nlist = int((built.get("build_params") or {}).get("nlist", 1 << 16))
            params["params"]["nprobe"] = min(nlist, int(math.ceil(params["params"]["nprobe"] * share)))
        best = np.full((len(queries), 0), -np.inf, np.float32)
        best_ids = np.full((len(queries), 0), -1, np.int64)
        for start in range(0, len(ids), FILTER_IDS):
            chunk = ids[start:start + FILTER_IDS]
            scores, found = self.search(queries, k, params=params,
                                        filter=f"id in [{','.join(str(int(i)) for i in chunk)}]")
            best, best_ids = top_k(np.hstack([best, scores]), np.hstack([best_ids, found]), k)
        return pad(best, best_ids, k)

    def search(self, queries: np.ndarray, k: int, params: dict | None = None,
               kind: str | None = None, filter: str = "") -> tuple[np.ndarray, np.ndarray]:
        connection = self._ready()
        limit = min(int(k), MAX_TOPK)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        params = params or self._search_params(limit)
        kind = kind or (self.store.manifest.get("ann") or {}).get("type")
        # Product-quantizer codes rank too roughly to reach the recall target
        # alone: more candidates are fetched with their stored vectors and
        # re-ranked by exact inner product, as the local store does.
        refine = ann.REFINE["ivf-pq"] if kind == "ivf-pq" else 1
        fetch = min(limit * refine, MAX_TOPK)
        fields = ["id", "vector"] if refine > 1 else ["id"]
        for start in range(0, len(queries), 256):
            batch = queries[start:start + 256]
            found = connection.call("searching", "search", connection.collection, data=[q for q in batch],
                                    limit=fetch, search_params=params, output_fields=fields,
                                    filter=filter, consistency_level=self._consistency())
            for row, hits in enumerate(found, start=start):
                if not hits:
                    continue
                found_ids = np.asarray([int(hit["id"]) for hit in hits], np.int64)
                if refine > 1:
                    stored = np.asarray([hit["entity"]["vector"] for hit in hits], np.float32)
                    found_scores = stored @ queries[row]
                else:
                    found_scores = np.asarray([float(hit["distance"]) for hit in hits], np.float32)
                best = np.argsort(-found_scores, kind="stable")[:limit]
                ids[row, :len(best)] = found_ids[best]
                scores[row, :len(best)] = found_scores[best]
        return scores, ids

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        connection = self._ready()
        out = np.zeros((len(ids), self.store.dim), np.float32)
        if not len(ids):
            return out
        where: dict[int, list[int]] = {}
        for row, image_id in enumerate(ids):
            where.setdefault(int(image_id), []).append(row)
        wanted = sorted(where)
        step = min(self._rows_per_call(), ID_RANGE)
        for start in range(0, len(wanted), step):
            chunk = wanted[start:start + step]
            for found in connection.call("reading vectors", "get", connection.collection, ids=chunk,
                                         output_fields=["vector"]):
                out[where.pop(int(found["id"]))] = np.asarray(found["vector"], np.float32)
        if where:
            raise KeyError(f"no vector for id {min(where)}")
        return out

    def _stored(self, with_vectors: bool = False):
        """(ids, vectors or None) of everything in the collection, a range
        of ids at a time: the metadata's ids, then any above its next id."""
        connection = self._ready()
        fields = ["id", "vector"] if with_vectors else ["id"]
        step = min(ID_RANGE, self._rows_per_call()) if with_vectors else ID_RANGE
        top = max(int(self.store.next_id), 1)
        bounds = [(lo, min(lo + step, top)) for lo in range(0, top, step)]
        for lo, hi in bounds:
            rows = connection.call("listing vectors", "query", connection.collection,
                                   filter=f"id >= {lo} and id < {hi}", output_fields=fields, limit=hi - lo)
            yield self._unpack(rows, with_vectors)
        # Strays of unfinished commits, and ids nobody should have written.
        rows = connection.call("listing vectors", "query", connection.collection,
                               filter=f"id >= {top} or id < 0", output_fields=fields, limit=MAX_TOPK)
        yield self._unpack(rows, with_vectors)

    def _unpack(self, rows, with_vectors: bool):
        ids = np.asarray([int(r["id"]) for r in rows], np.int64)
        if not with_vectors:
            return ids, None
        vectors = (np.asarray([r["vector"] for r in rows], np.float32) if rows
                   else np.empty((0, self.store.dim), np.float32))
        return ids, vectors

    # -- the approximate index ----------------------------------------------
    def due(self):
        from imgsearch.store import merge

        store = self.store
        if not store.count:
            return None
        built = store.manifest.get("ann") or {}
        kind = merge.resolved_type(store, merge.settings(store))
        if built.get("type") != kind:
            return "optimize", f"{store.count} vectors call for a {kind} index"
        tuned = int(built.get("vectors", 0))
        if kind != "flat" and not (tuned / 2 <= store.count <= 2 * tuned):
            return "optimize", f"{store.count} vectors, {tuned} when the index was tuned"
        return None

    def optimize(self, *, index_type=None, target_recall=None, max_memory=None, force=False, seed=0,
                 progress=None):
        from imgsearch.store import merge

        store = self.store
        if not store.writable:
            raise UsageError("index opened for reading; open it writable to optimize it")
        started = time.perf_counter()
        chosen = merge.settings(store, index_type, target_recall, max_memory)
        kind = merge.resolved_type(store, chosen)
        if 0 < store.count < ann.MIN_VECTORS[kind]:
            raise UsageError(f"--index-type {kind} needs at least {ann.MIN_VECTORS[kind]} images; "
                             f"index {store.directory} holds {store.count} (flat searches them exactly)")
        built = store.manifest.get("ann") or {}
        report = merge.OptimizeReport(kind, store.count, 0, 0, merged=False)
        report.target_recall = chosen["target_recall"]
        tuned = int(built.get("vectors", 0))
        rebuild = (force or built.get("type") != kind
                   or float(built.get("target_recall", -1)) != chosen["target_recall"]
                   or (kind != "flat" and not (tuned / 2 <= store.count <= 2 * tuned)))
        if not rebuild:
            report.rebuilt = False
            report.recall_at_10, report.params = built.get("recall_at_10"), dict(built.get("params", {}))
            if chosen != store.manifest.get("search"):
                store._replace_segments([], None, search=chosen)
                store._load_state()
            report.seconds = time.perf_counter() - started
            return report
        record = self._build(kind, chosen["target_recall"], seed, progress)
        store._replace_segments([], None, built=record, search=chosen)
        store._load_state()
        report.recall_at_10, report.params = record.get("recall_at_10"), dict(record.get("params", {}))
        report.seconds = time.perf_counter() - started
        return report

    def _index_params(self, kind: str, count: int) -> dict:
        if kind == "hnsw":
            return {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
        if kind == "flat":
            return {}
        nlist = int(min(ann.nlist_for(count), max(1, count // 8)))
        if kind == "ivf-sq8":
            return {"nlist": nlist}
        return {"nlist": nlist, "m": ann.pq_m(self.store.dim), "nbits": 8}

    def _current_index(self) -> dict:
        connection = self.connection
        names = connection.call("listing indexes", "list_indexes", connection.collection)
        if not names:
            return {}
        return connection.call("describing the index", "describe_index", connection.collection, names[0])

    def _build(self, kind: str, target_recall: float, seed: int, progress) -> dict:
        store, connection = self.store, self.connection
        count, dim = store.count, store.dim
        build_params = self._index_params(kind, count)
        current = self._current_index()
        if current.get("index_type") != INDEX_TYPES[kind] or any(
                str(current.get(key)) != str(value) for key, value in build_params.items()):
            if progress:
                progress("building", 0, count)
            # Sealed segments get the index; growing ones stay exact until sealed.
            connection.call("flushing", "flush", connection.collection)
            connection.call("releasing the collection", "release_collection", connection.collection)
            self._loaded = False
            for name in connection.call("listing indexes", "list_indexes", connection.collection):
                connection.call("dropping the old index", "drop_index", connection.collection, name)
            params = connection.client.prepare_index_params()
            params.add_index("vector", index_type=INDEX_TYPES[kind], metric_type="IP", params=build_params)
            connection.call(f"building a {INDEX_TYPES[kind]} index", "create_index", connection.collection, params)
            self._wait_for_index(count)
            if progress:
                progress("building", count, count)
        self._ready()
        record = {"type": kind, "target_recall": target_recall, "vectors": count,
                  "milvus_index": INDEX_TYPES[kind], "build_params": build_params,
                  "memory": _memory(kind, count, dim, build_params)}
        if kind == "flat" or count < 2:
            record.update(recall_at_10=1.0, params={})
            return record
        name = "ef" if kind == "hnsw" else "nprobe"
        held, truth = self._held_back(seed, progress)
        reached, value = 0.0, None
        for value in _sweep(kind, build_params):
            params = {"metric_type": "IP", "params": {name: max(value, ann.RECALL_K + 1) if name == "ef" else value}}
            reached = self._recall(held, truth, params, kind)
            if reached >= target_recall:
                break
        record.update(recall_at_10=round(reached, 4), params={"name": name, "value": int(value)})
        return record

    def _wait_for_index(self, count: int) -> None:
        deadline = time.monotonic() + INDEX_TIMEOUT
        while time.monotonic() < deadline:
            described = self._current_index()
            pending = int(described.get("pending_index_rows") or 0)
            if str(described.get("state", "Finished")) == "Finished" and not pending:
                return
            if str(described.get("state")) == "Failed":
                raise ImgsearchError(f"Milvus could not build the index ({described.get('index_state_fail_reason')})")
            time.sleep(0.5)
        raise ImgsearchError(f"Milvus did not finish building the index of {count} vectors within "
                             f"{INDEX_TIMEOUT:.0f} s; run 'imgsearch optimize' again later")

    def _held_back(self, seed: int, progress):
        """Query vectors taken from the collection and their exact top 10
        (themselves left out), by one pass over every stored vector."""
        ids = np.asarray([i for (i,) in self.store._db.execute("SELECT id FROM images ORDER BY id")], np.int64)
        rng = np.random.default_rng(seed)
        held = np.sort(rng.choice(ids, size=min(ann.HELD_BACK, len(ids)), replace=False))
        queries = self.vectors(held)
        best = np.full((len(held), ann.RECALL_K), -np.inf, np.float32)
        best_ids = np.full((len(held), ann.RECALL_K), -1, np.int64)
        done = 0
        for chunk_ids, vectors in self._stored(with_vectors=True):
            if not len(chunk_ids):
                continue
            scores = queries @ vectors.T
            scores[chunk_ids[None, :] == held[:, None]] = -np.inf  # not itself
            both = np.hstack([best, scores])
            both_ids = np.hstack([best_ids, np.broadcast_to(chunk_ids, scores.shape)])
            order = np.argsort(-both, axis=1, kind="stable")[:, :ann.RECALL_K]
            best, best_ids = np.take_along_axis(both, order, 1), np.take_along_axis(both_ids, order, 1)
            done += len(chunk_ids)
            if progress:
                progress("measuring", min(done, self.store.count), self.store.count)
        return (held, queries), best_ids

    def _recall(self, held, truth: np.ndarray, params: dict, kind: str) -> float:
        held_ids, queries = held
        _, found = self.search(queries, ann.RECALL_K + 1, params=params, kind=kind)
        hits = 0
        for row, self_id, expected in zip(found, held_ids, truth):
            got = [int(i) for i in row if i != self_id and i >= 0][:ann.RECALL_K]
            hits += len(set(got) & set(expected[expected >= 0].tolist()))
        return hits / max(1, int((truth >= 0).sum()))

    # -- checking -----------------------------------------------------------
    def verify(self, progress=None) -> tuple[list[str], list[str]]:
        store = self.store
        where = f"Milvus collection {self.record_['collection']}"
        problems, notes = [], []
        rows = np.asarray([i for (i,) in store._db.execute("SELECT id FROM images ORDER BY id")], np.int64)
        stored, bad, done = [], 0, 0
        for ids, vectors in self._stored(with_vectors=True):
            stored.append(ids)
            norms = np.linalg.norm(vectors, axis=1)
            bad += int(np.sum((np.abs(norms - 1) > 1e-3) & (norms > 0)))
            done += len(ids)
            if progress:
                progress(min(done, max(store.count, 1)), max(store.count, 1))
        stored_ids = np.unique(np.concatenate(stored)) if stored else np.empty(0, np.int64)
        owed = [i for (i,) in store._db.execute("SELECT id FROM tombstones WHERE segment = 0")]
        missing = np.setdiff1d(rows, stored_ids)
        extra = np.setdiff1d(stored_ids, np.concatenate([rows, np.asarray(owed, np.int64)]))
        # Ids from the next one up are a commit that never stood (its upsert
        # came before the metadata transaction): left for the next writer.
        unfinished, extra = extra[extra >= store.next_id], extra[extra < store.next_id]
        if len(missing):
            problems.append(f"{len(missing)} images have no vector in {where} (first id {int(missing[0])}); "
                            "'imgsearch verify --repair' forgets them and the next 'imgsearch index' embeds "
                            "their files again")
        if len(extra):
            problems.append(f"{len(extra)} vectors in {where} belong to no image (first id {int(extra[0])}); "
                            "'imgsearch verify --repair' deletes them")
        if owed:
            notes.append(f"{len(owed)} removed vectors are still to be deleted from {where} "
                         "(an interrupted commit); the next write or 'verify --repair' deletes them")
        if len(unfinished):
            notes.append(f"{len(unfinished)} vectors in {where} were written by a commit that never finished; "
                         "the next write or 'verify --repair' deletes them")
        if bad:
            problems.append(f"{bad} vectors in {where} are not unit length")
        built = store.manifest.get("ann") or {}
        current = self._current_index().get("index_type")
        if built and built.get("milvus_index") and current != built["milvus_index"]:
            problems.append(f"{where} has a {current} index, the manifest records {built['milvus_index']}; "
                            "'imgsearch optimize --force' builds it again")
        return problems, notes

    def repair(self) -> list[str]:
        from imgsearch.store import Changes

        store = self.store
        done = []
        owed = self._delete_owed()
        if owed:
            done.append(f"deleted {owed} vectors an interrupted commit still owed")
        rows = np.asarray([i for (i,) in store._db.execute("SELECT id FROM images ORDER BY id")], np.int64)
        stored = [ids for ids, _ in self._stored()]
        stored_ids = np.unique(np.concatenate(stored)) if stored else np.empty(0, np.int64)
        extra = np.setdiff1d(stored_ids, rows)
        if len(extra):
            self._delete(extra)
            done.append(f"deleted {len(extra)} vectors that belong to no image")
        missing = np.setdiff1d(rows, stored_ids)
        if len(missing):
            store.commit(Changes(removed=[int(i) for i in missing]))
            done.append(f"forgot {len(missing)} images whose vector was missing; the next 'imgsearch index' "
                        "of their folders embeds them again")
        return done

    def describe(self) -> dict:
        return {"backend": self.name, "backend_uri": self.record_.get("uri"),
                "backend_collection": self.record_.get("collection")}


def _type_name(kind) -> str:
    """A field type as Milvus names it (DataType is an IntEnum)."""
    return getattr(kind, "name", str(kind))


def _sweep(kind: str, build_params: dict) -> list[int]:
    if kind == "hnsw":
        return [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    nlist = int(build_params["nlist"])
    return [p for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
            if p <= nlist] + ([nlist] if nlist > 512 else [])


def _memory(kind: str, count: int, dim: int, build_params: dict) -> int:
    """What the query nodes keep in memory for this index, roughly."""
    if kind == "hnsw":  # Milvus's HNSW holds the float vectors beside the graph
        return count * (dim * 4 + 2 * HNSW_M * 4)
    if kind == "flat":
        return count * dim * 4
    return ann.memory_needed(kind, count, dim)
