"""How good kNN classification and retrieval are on labelled images.

Pure numpy on neighbour lists and label arrays: the callers (leave-one-out,
cross-validation, a held-out folder) only decide who the neighbours are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .errors import ImgsearchError
from .knn import vote
from .linear import MODEL_FILE


@dataclass
class Scores:
    """The metrics of one evaluated setting (e.g. kNN, k=10, weighted)."""

    method: str
    k: int | None
    vote: str | None
    n: int
    top1: float
    top5: float
    balanced_accuracy: float
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray          # rows: true class, columns: predicted
    classes: list[str]
    predictions: list[str | None]
    retrieval: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.method if self.k is None else f"{self.method}-k{self.k}-{self.vote}"

    def summary(self) -> dict:
        out = {"method": self.method, "k": self.k, "vote": self.vote, "top1": round(self.top1, 6),
               "top5": round(self.top5, 6), "balanced_accuracy": round(self.balanced_accuracy, 6),
               "n": self.n}
        out.update({key: round(value, 6) for key, value in self.retrieval.items()})
        return out

    def confusion_pairs(self, limit: int = 5) -> list[tuple[str, str, int]]:
        """The (true, predicted) pairs most often wrong, most frequent first."""
        pairs = [(self.classes[i], self.classes[j], int(self.confusion[i, j]))
                 for i in range(len(self.classes)) for j in range(len(self.classes))
                 if i != j and self.confusion[i, j] > 0]
        return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))[:limit]


def score(method: str, k: int | None, vote_name: str | None, truth: list[str],
          ranked: list[list[str]]) -> Scores:
    """Metrics from each image's true label and its labels ranked best first
    (``ranked[i][0]`` is the prediction; an empty list predicts nothing)."""
    classes = sorted(set(truth) | {label for labels in ranked for label in labels[:1]})
    index = {label: i for i, label in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    predictions = [labels[0] if labels else None for labels in ranked]
    for true, predicted in zip(truth, predictions):
        if predicted is not None:
            confusion[index[true], index[predicted]] += 1
    n = len(truth)
    top1 = sum(p == t for p, t in zip(predictions, truth)) / n if n else 0.0
    top5 = sum(t in labels[:5] for t, labels in zip(truth, ranked)) / n if n else 0.0
    per_class = {}
    recalls = []
    for label in classes:
        i = index[label]
        support = int(sum(t == label for t in truth))
        predicted = int(confusion[:, i].sum())
        hits = int(confusion[i, i])
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support:
            recalls.append(recall)
    balanced = float(np.mean(recalls)) if recalls else 0.0
    return Scores(method, k, vote_name, n, top1, top5, balanced, per_class, confusion, classes, predictions)


def knn_ranked(neighbour_labels: list[list[str | None]], neighbour_scores: list[list[float]],
               k: int, vote_name: str, temperature: float) -> list[list[str]]:
    """Labels of each image ranked by the vote of its first ``k`` neighbours."""
    ranked = []
    for labels, scores in zip(neighbour_labels, neighbour_scores):
        decision = vote(list(zip(labels[:k], scores[:k])), vote_name, temperature)
        ranked.append(sorted(decision.tally, key=lambda label: -decision.tally[label]))
    return ranked


def retrieval(truth: list[str], neighbour_labels: list[list[str | None]], k: int,
              available: list[int] | None = None) -> dict[str, float]:
    """Precision@k and mean average precision@k of the neighbour lists.

    AP@k sums the precision at each rank (up to k) that holds a relevant
    (same label) neighbour and divides by min(k, the number of relevant
    images the search could have returned), ``available[i]`` for query i
    (without it, the relevant neighbours found in the top k).
    """
    precisions, average_precisions = [], []
    for i, (true, labels) in enumerate(zip(truth, neighbour_labels)):
        relevant = np.array([label == true for label in labels[:k]], dtype=float)
        if not len(relevant):
            continue
        precisions.append(relevant.sum() / k)
        possible = min(k, available[i]) if available is not None else relevant.sum()
        if relevant.sum() and possible:
            cumulative = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
            average_precisions.append(float((cumulative * relevant).sum() / possible))
        else:
            average_precisions.append(0.0)
    return {f"precision@{k}": float(np.mean(precisions)) if precisions else 0.0,
            f"map@{k}": float(np.mean(average_precisions)) if average_precisions else 0.0}


def stratified_folds(labels: list[str], folds: int, seed: int = 0) -> list[np.ndarray]:
    """``folds`` disjoint index arrays, each with about the same share of
    every label; the same seed gives the same folds."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    labels_array = np.asarray(labels, dtype=object)
    offset = 0
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels_array == label)
        rng.shuffle(members)
        # Continue the round-robin where the previous class stopped, so small
        # classes do not all land in the first folds.
        assignment[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return [np.flatnonzero(assignment == f) for f in range(folds)]


NEAR_DUPLICATE = 0.98


@dataclass
class Evaluation:
    mode: str                      # leave-one-out, cv-K or held-out
    paths: list[str]
    truth: list[str]
    scores: list[Scores]
    near_duplicates: int           # test images with a neighbour at cosine >= 0.98
    skipped: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Each image's nearest indexed images (ids, best first) and their
    # cosines, as the kNN settings saw them: the report shows who outvoted whom.
    neighbour_ids: list[list[int]] = field(default_factory=list)
    neighbour_scores: list[list[float]] = field(default_factory=list)


def _neighbours(search, queries: np.ndarray, k: int, exclude: list[int] | None = None):
    """Labels and scores of the ``k`` nearest neighbours of each query;
    ``exclude[i]`` is an id to drop from row ``i`` (the query itself)."""
    scores, ids = search(queries, k + (1 if exclude is not None else 0))
    labels_out, scores_out, best = [], [], []
    for row, (row_scores, row_ids) in enumerate(zip(scores, ids)):
        pairs = [(int(i), float(s)) for s, i in zip(row_scores, row_ids)
                 if i >= 0 and (exclude is None or int(i) != exclude[row])][:k]
        labels_out.append([i for i, _ in pairs])
        scores_out.append([s for _, s in pairs])
        best.append(pairs[0][1] if pairs else -1.0)
    return labels_out, scores_out, best


def _search_among(store, ids: np.ndarray):
    """The index's own search, restricted to ``ids``: every mode votes among
    labelled images found the way ``classify`` finds them."""
    return lambda queries, k: store.nearest(queries, k, among=ids)


def evaluate(index, *, mode: str, test_paths=None, labels: dict[str, str] | None = None, folds: int = 5,
             ks=(1, 5, 10, 20), votes=("weighted",), temperature: float = 0.07, seed: int = 0,
             linear: bool = True, progress=None) -> Evaluation:
    """kNN (and, where a trained classifier fits, linear) classification and
    retrieval quality on labelled images.

    ``mode``: ``leave-one-out`` (each labelled indexed image against all the
    others), ``cv`` (stratified ``folds``-fold cross-validation over the
    labelled indexed images, seeded) or ``held-out`` (the labelled images
    under ``test_paths``, labelled by folder or ``labels``).
    """
    import time

    from . import images as imgs
    from .errors import UsageError

    started = time.perf_counter()
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise UsageError("k values must be at least 1")
    entries, vectors = index.labelled_vectors()
    if not entries:
        raise UsageError(f"index {index.store.directory} has no labels to evaluate against")
    # Every mode searches the labelled images alone (cross-validation: those
    # of the training folds), as classify does; only labelled rows are read.
    label_of = {e.id: e.label for e in entries}
    ids = np.asarray([e.id for e in entries], dtype=np.int64)
    notes: list[str] = []
    skipped: list = []
    k_max = ks[-1]
    model = None
    if linear and (index.store.directory / MODEL_FILE).exists():
        try:
            model = index.classifier()
        except ImgsearchError as exc:  # a stale or damaged classifier: kNN only
            notes.append(f"no linear classifier row: {exc}")

    if mode == "held-out":
        files, missing = imgs.discover(test_paths or [])
        skipped += missing
        labels = labels or {}
        files = [imgs.ImageFile(f.path, labels.get(str(f.path), f.label)) for f in files]
        unlabelled = [f for f in files if f.label is None]
        if unlabelled:
            notes.append(f"{len(unlabelled)} test images have no label and were left out")
        files = [f for f in files if f.label is not None]
        if not files:
            raise UsageError("no labelled test images found (use class folders or --labels)")
        queries, kept, bad = index.embed_images(files, progress=progress)
        skipped += bad
        if not kept:
            raise UsageError(f"none of the {len(files)} labelled test images could be read "
                             f"(first: {bad[0].path}: {bad[0].reason})")
        paths = [str(f.path) for f in kept]
        truth = [f.label for f in kept]
        neighbour_ids, neighbour_scores, best = _neighbours(_search_among(index.store, ids), queries, k_max)
        folds_of = [(np.arange(len(kept)), queries, None)]
    elif mode in ("leave-one-out", "cv"):
        paths = [e.path for e in entries]
        truth = [e.label for e in entries]
        neighbour_ids = [None] * len(entries)
        neighbour_scores = [None] * len(entries)
        best = [None] * len(entries)
        if mode == "leave-one-out":
            found = _neighbours(_search_among(index.store, ids), vectors, k_max, exclude=list(ids))
            neighbour_ids, neighbour_scores, best = (list(x) for x in found)
            folds_of = [(np.arange(len(entries)), vectors, None)]
        else:
            if folds < 2 or folds > min(truth.count(c) for c in set(truth)):
                raise UsageError(f"--cv {folds}: every label needs at least {folds} images (and K >= 2)")
            folds_of = []
            for test_rows in stratified_folds(truth, folds, seed):
                train_rows = np.setdiff1d(np.arange(len(entries)), test_rows)
                found = _neighbours(_search_among(index.store, ids[train_rows]), vectors[test_rows], k_max)
                for j, row in enumerate(test_rows):
                    neighbour_ids[row], neighbour_scores[row], best[row] = found[0][j], found[1][j], found[2][j]
                folds_of.append((test_rows, vectors[test_rows], train_rows))
    else:
        raise UsageError(f"unknown evaluation mode {mode!r}")

    neighbour_labels = [[label_of.get(i) for i in row] for row in neighbour_ids]
    scores = []
    if len(set(truth)) < 2:
        notes.append("only one label: every prediction is trivially right")
    # How many same-label images each query's search could have found.
    pool = Counter(e.label for e in entries)
    if mode == "held-out":
        available = [pool[t] for t in truth]
    elif mode == "leave-one-out":
        available = [pool[t] - 1 for t in truth]
    else:
        available = [0] * len(truth)
        for test_rows, _, train_rows in folds_of:
            train_pool = Counter(truth[r] for r in train_rows)
            for row in test_rows:
                available[row] = train_pool[truth[row]]
    for k in ks:
        for vote_name in votes:
            ranked = knn_ranked(neighbour_labels, neighbour_scores, k, vote_name, temperature)
            result = score("knn", k, vote_name, truth, ranked)
            result.retrieval = retrieval(truth, neighbour_labels, k, available)
            scores.append(result)
    if model is not None:
        if mode == "leave-one-out":
            notes.append("no linear classifier row: leave-one-out would refit it once per image; use --cv")
        else:
            ranked = [None] * len(truth)
            try:
                for test_rows, test_vectors, train_rows in folds_of:
                    fold_model = model
                    if train_rows is not None:  # refit on the training folds
                        from . import linear as linear_module

                        fold_model = linear_module.fit(vectors[train_rows], [truth[r] for r in train_rows],
                                                       method=model.method, C=model.C, seed=seed)
                    fold_ranked, _ = fold_model.predict(test_vectors)
                    for row, labels_ranked in zip(test_rows, fold_ranked):
                        ranked[row] = labels_ranked
                scores.append(score("linear", None, None, truth, ranked))
                if mode == "cv":
                    notes.append(f"linear row: refitted per fold with C={model.C:g}, which train-classifier "
                                 "chose on all labelled images, so it is slightly optimistic")
            except ImgsearchError as exc:  # e.g. scikit-learn missing: keep the kNN results
                notes.append(f"no linear classifier row: {exc}")
    near = sum(b is not None and b >= NEAR_DUPLICATE for b in best)
    name = f"cv-{folds}" if mode == "cv" else mode
    return Evaluation(name, paths, truth, scores, near, skipped, notes, time.perf_counter() - started,
                      neighbour_ids, neighbour_scores)
