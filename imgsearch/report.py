"""Writing an evaluation to a folder: predictions, confusion matrices, metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .evaluation import Evaluation, Scores
from .tables import columns


def write_report(evaluation: Evaluation, folder, entries_by_id=None) -> list[Path]:
    """predictions.csv, metrics.json, and confusion-<setting>.csv/.png for
    every evaluated setting; with ``entries_by_id`` (ids -> {id: Entry} of
    the index evaluated against), also index.html, the page that shows
    them with the images behind the most frequent confusions.  Returns the
    files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    path = folder / "predictions.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["path", "label", *[s.name for s in evaluation.scores]])
        for row, (image, truth) in enumerate(zip(evaluation.paths, evaluation.truth)):
            out.writerow([image, truth, *[s.predictions[row] or "" for s in evaluation.scores]])
    written.append(path)

    for scores in evaluation.scores:
        path = folder / f"confusion-{scores.name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            out = csv.writer(handle)
            out.writerow(["true \\ predicted", *scores.classes])
            for label, row in zip(scores.classes, scores.confusion):
                out.writerow([label, *row.tolist()])
        written.append(path)
        written.append(confusion_png(scores, folder / f"confusion-{scores.name}.png"))

    path = folder / "metrics.json"
    metrics = {
        "mode": evaluation.mode,
        "n": len(evaluation.paths),
        "near_duplicates": evaluation.near_duplicates,
        "seconds": round(evaluation.seconds, 3),
        "notes": evaluation.notes,
        "skipped": [{"path": str(s.path), "reason": s.reason} for s in evaluation.skipped],
        "settings": [
            {**s.summary(), "per_class": s.per_class,
             "confusion_pairs": [{"true": t, "predicted": p, "count": c} for t, p, c in s.confusion_pairs()]}
            for s in evaluation.scores
        ],
    }
    path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    written.append(path)
    if entries_by_id is not None:
        from .sheets import write_page
        from .sheets.evaluation import evaluation_page

        written.append(write_page(folder / "index.html", evaluation_page(evaluation, entries_by_id, written)))
    return written


def confusion_png(scores: Scores, path: Path) -> Path:
    """A confusion matrix a person can read: class names on both axes,
    counts in the cells, darker for more (the diagonal in blue, the errors
    in red, each on its own scale)."""
    from PIL import Image, ImageDraw, ImageFont

    classes = scores.classes
    n = len(classes)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(measure.textlength(c, font=font)) for c in classes) + 12
    cell = max(36, int(measure.textlength(str(int(scores.confusion.max(initial=0))), font=font)) + 12)
    title_height = 30
    title = f"{scores.name}: rows true, columns predicted (top-1 {scores.top1:.3f})"
    width = max(label_width + n * cell + 10, int(measure.textlength(title, font=font)) + 20)
    height = title_height + label_width + n * cell + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black", font=font)
    top = title_height + label_width
    # The errors get their own scale: against the diagonal's counts they
    # would all be near white, and they are what a reader looks for.
    diagonal = np.diag(scores.confusion)
    errors = scores.confusion - np.diag(diagonal)
    peaks = (max(int(diagonal.max(initial=0)), 1), max(int(errors.max(initial=0)), 1))
    for i, true in enumerate(classes):
        y = top + i * cell
        draw.text((label_width - 6, y + cell / 2), true, fill="black", font=font, anchor="rm")
        for j in range(n):
            x = label_width + j * cell
            count = int(scores.confusion[i, j])
            shade = int(255 - 200 * count / peaks[i != j])
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(200, 200, 200))
            ink = "white" if shade < 120 else "black"
            draw.text((x + cell / 2, y + cell / 2), str(count), fill=ink, font=font, anchor="mm")
    for j, predicted in enumerate(classes):
        # Column names are written sideways: draw on a strip, then turn it.
        strip = Image.new("RGB", (label_width, cell), "white")
        ImageDraw.Draw(strip).text((6, cell / 2), predicted, fill="black", font=font, anchor="lm")
        image.paste(strip.rotate(90, expand=True), (label_width + j * cell, title_height))
    image.save(path)
    return path


def format_table(evaluation: Evaluation) -> str:
    """The readable summary the CLI prints."""
    lines = [f"{evaluation.mode}: {len(evaluation.paths)} labelled images, "
             f"{evaluation.seconds:.1f} s"]
    header = ["method", "k", "vote", "top1", "top5", "balanced", "precision@k", "map@k"]
    rows = []
    for s in evaluation.scores:
        k = s.k if s.k is not None else "-"
        rows.append([s.method, k, s.vote or "-", f"{s.top1:.4f}", f"{s.top5:.4f}",
                     f"{s.balanced_accuracy:.4f}",
                     f"{s.retrieval.get(f'precision@{s.k}', float('nan')):.4f}" if s.k else "-",
                     f"{s.retrieval.get(f'map@{s.k}', float('nan')):.4f}" if s.k else "-"])
    lines.append(columns(header, rows))
    best = max(evaluation.scores, key=lambda s: s.top1)
    lines.append("")
    lines.append(f"per class, best setting ({best.name}):")
    lines.append(columns(["label", "precision", "recall", "f1", "support"], [
        [label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
        for label, m in best.per_class.items()
    ]))
    pairs = best.confusion_pairs()
    if pairs:
        lines.append("most frequent confusions (true -> predicted: count): "
                     + "; ".join(f"{t} -> {p}: {c}" for t, p, c in pairs))
    lines.append(f"near-duplicates: {evaluation.near_duplicates} test images have a neighbour "
                 f"at cosine >= 0.98 in the index")
    return "\n".join(lines)
