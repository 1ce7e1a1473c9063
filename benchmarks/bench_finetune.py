"""Fine-tuning on a data set whose classes are not ImageNet's: Fashion-MNIST.

Prints held-out kNN top-1 and linear top-1 for the frozen base encoder, the
fine-tuned head alone (an embedding on frozen features) and the fine-tuned
top layers, with the training time of each, all measured through imgsearch
itself: `finetune`, then `index` with the saved-model encoder, then
`train-classifier` and `evaluate --test`.

Fashion-MNIST comes from Debian's package (apt-get install dataset-fashion-mnist),
read from /usr/share/datasets/fashion-mnist (or --data).  The split: a seeded
sample of --train-per-class images of each class from its training set
(fine-tuning holds 20% of those out for validation and early stopping, and
the index holds all of them) and --test-per-class images of each class from
its separate test set, never seen in training.  The 28x28 grey images are
written as PNG files in class folders in a temporary folder.

    nice -n 10 python benchmarks/bench_finetune.py --train-per-class 500 --test-per-class 200
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def _read(folder: Path, kind: str):
    with gzip.open(folder / f"{kind}-images-idx3-ubyte.gz") as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / f"{kind}-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    return images, labels


def write_split(folder: Path, kind: str, root: Path, per_class: int, seed: int) -> int:
    from PIL import Image

    images, labels = _read(folder, kind)
    rng = np.random.default_rng(seed)
    for number, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in rng.permutation(np.flatnonzero(labels == number))[:per_class]:
            Image.fromarray(images[i]).save(root / name / f"{kind}-{i:05d}.png")
    return per_class * len(CLASSES)


def measure(name: str, encoder: str, weights: str | None, train: Path, test: Path, work: Path, seconds: float):
    """Index the training images with the encoder and evaluate on the test images."""
    from imgsearch import Index
    from imgsearch.evaluation import evaluate

    started = time.monotonic()
    with Index.build(work / f"ix-{name}", encoder=encoder, weights=weights) as index:
        index.add([train])
    indexing = time.monotonic() - started
    with Index.open(work / f"ix-{name}", writable=True) as index:
        index.train_classifier(method="logreg", seed=0)
    with Index.open(work / f"ix-{name}") as index:
        result = evaluate(index, mode="held-out", test_paths=[test], ks=(1, 10, 20), votes=("weighted",))
    top1 = {(s.method, s.k): s.top1 for s in result.scores}
    return {"setting": name, "knn1": top1[("knn", 1)], "knn10": top1[("knn", 10)],
            "knn20": top1[("knn", 20)], "linear": top1.get(("linear", None)),
            "train_s": seconds, "index_s": indexing, "n_test": result.scores[0].n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--input-size", type=int, default=64, help="fine-tuning input size")
    parser.add_argument("--unfreeze", type=int, default=34,
                        help="top layers with weights to fine-tune (34: efficientnet-lite0's last 11 blocks and its head)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the data, models and indexes in this folder")
    parser.add_argument("--settings", default="frozen,frozen-small,head,top",
                        help="rows to measure: frozen (the base at its own size), frozen-small (the base "
                             "unchanged at --input-size), head, top")
    args = parser.parse_args()
    if not (args.data / "train-images-idx3-ubyte.gz").is_file():
        print(f"Fashion-MNIST not found in {args.data}: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from imgsearch.encoders import load_registry
    from imgsearch.finetune import FinetuneOptions, examples_from_folders, finetune

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    train, test = work / "train", work / "test"
    try:
        if not train.exists():
            write_split(args.data, "train", train, args.train_per_class, args.seed)
            write_split(args.data, "t10k", test, args.test_per_class, args.seed + 1)
        print(f"Fashion-MNIST: {args.train_per_class * 10} training images (20% of them validation for "
              f"fine-tuning), {args.test_per_class * 10} test images; base {args.encoder}; "
              f"fine-tuning at {args.input_size} px", file=sys.stderr)
        wanted = args.settings.split(",")
        rows = []
        if "frozen" in wanted:
            rows.append(measure("frozen base", args.encoder, None, train, test, work, 0.0))
            print(rows[-1], file=sys.stderr)
        examples = examples_from_folders([train])
        # frozen-small: no embedding layer, so the export is the base itself
        # at the smaller size (its one head epoch changes nothing exported).
        runs = {"frozen-small": (f"frozen base, {args.input_size} px", 0, 0, 1),
                "head": ("head only", 0, 256, args.epochs),
                "top": (f"top {args.unfreeze} layers", args.unfreeze, 256, args.epochs)}
        for key in [k for k in runs if k in wanted]:
            name, unfreeze, embedding_dim, epochs = runs[key]
            options = FinetuneOptions(input_size=args.input_size, unfreeze=unfreeze, embedding_dim=embedding_dim,
                                      epochs=epochs, finetune_epochs=args.finetune_epochs, seed=args.seed)
            encoder = load_registry().create(args.encoder)
            started = time.monotonic()
            report = finetune(encoder, examples, work / f"model-{key}", options)
            seconds = time.monotonic() - started
            stages = ", ".join(f"{s.name}: {s.epochs_run} epochs, best {s.best_epoch} "
                               f"(val {s.val_accuracy:.4f}), {s.seconds:.0f} s" for s in report.stages)
            print(f"{name}: features {report.cache_seconds:.0f} s; {stages}", file=sys.stderr)
            rows.append(measure(name, "saved-model", str(report.spec), train, test, work,
                                0.0 if key == "frozen-small" else seconds))
            print(rows[-1], file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("| setting | kNN top-1 (k=1) | kNN top-1 (k=10) | kNN top-1 (k=20) | linear top-1 | training s | indexing s |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        linear = f"{r['linear']:.4f}" if r["linear"] is not None else "-"
        print(f"| {r['setting']} | {r['knn1']:.4f} | {r['knn10']:.4f} | {r['knn20']:.4f} | {linear} | "
              f"{r['train_s']:.0f} | {r['index_s']:.0f} |")
    return 0


if __name__ == "__main__":
    from imgsearch.errors import ImgsearchError

    try:
        sys.exit(main())
    except ImgsearchError as exc:  # a setting finetune refuses, e.g. too many layers to unfreeze
        sys.exit(f"error: {exc}")
