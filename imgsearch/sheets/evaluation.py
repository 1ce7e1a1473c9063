"""The evaluation page (``evaluate --report DIR`` writes it as index.html):
the metrics, the confusion matrix, and the images behind the most frequent
confusions with the neighbours that outvoted their right label."""

from __future__ import annotations

from .. import __version__
from . import render
from .thumbnails import Thumbnails

EXAMPLES = 6  # misclassified images shown per confusion


def _shade(count: int, peak: int, diagonal: bool) -> str:
    """A cell's colour, as in the confusion PNG: blue on the diagonal, red off it."""
    level = int(255 - 200 * count / max(peak, 1))
    return f"rgb({level},{level},255)" if diagonal else f"rgb(255,{level},{level})"


def _examples(evaluation, scores, entries_by_id, limit: int) -> list[dict]:
    """For each frequent confusion of a kNN setting, its first images and
    the neighbours (of the k that voted) labelled with the wrong winner."""
    k = scores.k
    chosen = []
    for true, predicted, count in scores.confusion_pairs():
        rows = [i for i, (t, p) in enumerate(zip(evaluation.truth, scores.predictions))
                if t == true and p == predicted][:limit]
        chosen.append((true, predicted, count, rows))
    wanted = {i for *_, rows in chosen for row in rows for i in evaluation.neighbour_ids[row][:k]}
    entries = entries_by_id(wanted) if wanted else {}
    out = []
    for true, predicted, count, rows in chosen:
        images = []
        for row in rows:
            voted = [(entries.get(i), s) for i, s in zip(evaluation.neighbour_ids[row][:k],
                                                           evaluation.neighbour_scores[row][:k])]
            voted = [(e, s) for e, s in voted if e is not None and e.label is not None]
            winners = [{"path": e.path, "label": e.label, "score": s} for e, s in voted if e.label == predicted]
            right = [s for e, s in voted if e.label == true]
            images.append({
                "path": evaluation.paths[row], "true": true, "predicted": predicted, "winners": winners,
                "tally": f"{len(winners)} of {len(voted)} voting neighbours say {predicted}"
                         + (f" (closest {winners[0]['score']:.3f})" if winners else "")
                         + f", {len(right)} say {true}" + (f" (closest {max(right):.3f})" if right else ""),
            })
        out.append({"true": true, "predicted": predicted, "count": count, "images": images})
    return out


def evaluation_page(evaluation, entries_by_id, files, *, examples: int = EXAMPLES,
                    thumbnails: Thumbnails | None = None) -> str:
    """``entries_by_id``: ids -> {id: Entry} of the index evaluated against
    (for the neighbours' paths); ``files``: the report's other files."""
    thumbnails = thumbnails or Thumbnails()
    best = max(evaluation.scores, key=lambda s: s.top1)
    knn = [s for s in evaluation.scores if s.method == "knn"]
    best_knn = max(knn, key=lambda s: s.top1) if knn else None
    peak = int(best.confusion.max(initial=0))
    matrix = [[{"count": int(c), "colour": _shade(int(c), peak, i == j),
                "ink": "white" if c > 0.6 * peak else "black"} for j, c in enumerate(row)]
              for i, row in enumerate(best.confusion)]
    settings = [{"name": s.name, "best": s is best, **s.summary(),
                 "precision_at_k": s.retrieval.get(f"precision@{s.k}") if s.k else None,
                 "map_at_k": s.retrieval.get(f"map@{s.k}") if s.k else None} for s in evaluation.scores]
    confusions = (_examples(evaluation, best_knn, entries_by_id, examples)
                  if best_knn is not None and evaluation.neighbour_ids else [])
    return render("evaluation.html", title=f"imgsearch evaluate: {evaluation.mode}", evaluation=evaluation,
                  settings=settings, best=best, best_knn=best_knn, matrix=matrix, confusions=confusions,
                  files=[f.name for f in files], thumb=thumbnails, size=thumbnails.size, version=__version__)
