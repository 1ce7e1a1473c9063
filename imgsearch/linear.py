"""Linear classifiers on the frozen features.

Training uses scikit-learn (the optional extra ``imgsearch[linear]``); the
fitted weights are saved as plain arrays (``classifier.npz`` in the index
folder, no pickle), so classifying needs numpy alone.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ImgsearchError, UsageError, first_line

logger = logging.getLogger(__name__)

MODEL_FILE = "classifier.npz"
METHODS = ("logreg", "svm")
C_GRID = tuple(float(c) for c in np.logspace(-2, 3, 6))  # 0.01 ... 1000


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ImgsearchError(
            "training a linear classifier needs scikit-learn: pip install 'imgsearch[linear]'"
        ) from None


@dataclass
class LinearModel:
    method: str
    C: float
    classes: list[str]
    coef: np.ndarray        # (n_classes, dim), or (1, dim) for two classes
    intercept: np.ndarray
    fingerprint: str        # the index state it was trained on
    cv_accuracy: float | None = None

    def decision(self, vectors: np.ndarray) -> np.ndarray:
        """Class scores ``(n, n_classes)``."""
        scores = np.asarray(vectors, dtype=np.float64) @ self.coef.T + self.intercept
        if scores.shape[1] == 1:  # scikit-learn's binary form: one score for classes[1]
            scores = np.hstack([-scores, scores]) / 2
        return scores

    def predict(self, vectors: np.ndarray) -> tuple[list[list[str]], np.ndarray]:
        """Labels ranked best first for each row, and the confidence of the
        first: the softmax of the class scores (the model's probability for
        logreg; for svm only a monotone score, not a calibrated probability)."""
        scores = self.decision(vectors)
        order = np.argsort(-scores, axis=1)
        ranked = [[self.classes[j] for j in row] for row in order]
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        confidence = (shifted / shifted.sum(axis=1, keepdims=True)).max(axis=1)
        return ranked, confidence

    def save(self, directory: Path) -> Path:
        target = Path(directory) / MODEL_FILE
        tmp = target.with_name(target.name + ".tmp.npz")
        meta = {"method": self.method, "C": self.C, "classes": self.classes,
                "fingerprint": self.fingerprint, "cv_accuracy": self.cv_accuracy}
        np.savez(tmp, coef=self.coef, intercept=self.intercept, meta=np.array(json.dumps(meta)))
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, directory: Path) -> "LinearModel | None":
        path = Path(directory) / MODEL_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                model = cls(meta["method"], float(meta["C"]), list(meta["classes"]), data["coef"],
                            data["intercept"], meta["fingerprint"], meta.get("cv_accuracy"))
            rows = len(model.classes) if len(model.classes) > 2 else 1
            if model.coef.ndim != 2 or model.coef.shape[0] != rows or model.intercept.shape != (rows,):
                raise ValueError("arrays do not match the classes")
            return model
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise ImgsearchError(f"the classifier file {path} is damaged ({first_line(exc)}); train it again") from None


def _estimator(method: str, C: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if method == "logreg":
        return LogisticRegression(C=C, max_iter=2000, random_state=seed)
    return LinearSVC(C=C, max_iter=10000, random_state=seed)


def _fitted(estimator, X, y, unconverged: list):
    """``estimator`` fitted, a solver that stops short noted in ``unconverged``
    instead of printed as scikit-learn's warning (the library never prints)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        estimator.fit(X, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        unconverged.append(estimator.C)
    return estimator


def _cross_validated(method, X, y, splits: int, seed: int, progress, unconverged) -> tuple[float, float]:
    """The C of the grid with the best mean accuracy over stratified folds
    (the first of equals), and that accuracy."""
    from sklearn.model_selection import StratifiedKFold

    folds = list(StratifiedKFold(splits, shuffle=True, random_state=seed).split(X, y))
    total, done, means = len(C_GRID) * len(folds), 0, []
    for C in C_GRID:
        scores = []
        for train, test in folds:
            model = _fitted(_estimator(method, C, seed), X[train], y[train], unconverged)
            scores.append(float(np.mean(model.predict(X[test]) == y[test])))
            done += 1
            if progress:
                progress(done, total)
        means.append(float(np.mean(scores)))
    best = int(np.argmax(means))
    return C_GRID[best], means[best]


def fit(vectors: np.ndarray, labels: list[str], *, method: str = "logreg", C: float | str = "auto",
        fingerprint: str = "", seed: int = 0, folds: int = 3, progress=None) -> LinearModel:
    """Fit on L2-normalised vectors; ``C="auto"`` picks C from a log grid by
    stratified cross-validation, reporting ``progress(done, total)`` fits.
    A solver that does not converge is logged as a warning."""
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UsageError("a classifier needs at least two labels in the index")
    _sklearn()

    X = np.asarray(vectors, dtype=np.float64)
    y = np.asarray(labels)
    cv_accuracy = None
    unconverged: list[float] = []
    if C == "auto":
        smallest = min(int(np.sum(y == c)) for c in classes)
        if smallest < 2:
            raise UsageError("choosing C by cross-validation needs at least 2 images of every label; "
                             "pass --C with a value")
        C, cv_accuracy = _cross_validated(method, X, y, max(2, min(folds, smallest)), seed, progress, unconverged)
        unconverged.clear()  # the final fit decides whether the saved model converged
    model = _fitted(_estimator(method, float(C), seed), X, y, unconverged)
    if unconverged:
        logger.warning("the %s solver stopped before converging at C=%g; the classifier may be a little "
                       "less accurate (a smaller --C converges faster)", method, float(C))
    return LinearModel(method, float(C), [str(c) for c in model.classes_], np.asarray(model.coef_),
                       np.asarray(model.intercept_), fingerprint, cv_accuracy)
