"""Fine-tuning an encoder on labelled images, exported for the saved-model encoder.

Two stages, both on activations computed once (a CPU spends nearly all of
its time in the frozen layers, so running them once instead of every epoch is
what makes training fit in minutes):

1. **head**: the base encoder's features, frozen and cached, feed a small
   head: an embedding layer (``embedding_dim``, ReLU) and a classifier.
2. **fine-tune** (``unfreeze`` > 0): the top ``unfreeze`` layers that hold
   weights (convolutions, dense; batch-norm layers keep their statistics)
   train with the head at a learning rate that falls along a cosine to zero
   over ``finetune_epochs``.  The activations entering them are cached, cut
   where the network is one tensor wide.

Each stage keeps the weights of its best epoch on a validation split
(stratified, seeded); the head stage stops when that has not improved for
``patience`` epochs, the fine-tune stage runs all its epochs (its rate
reaches zero at the end).  Ctrl-C stops either, and the best model so far
is exported.  The
export is the (fine-tuned) base with its pooling and the embedding layer, a
``.keras`` file and a model spec beside it, which the ``saved-model``
encoder reads; ``keep_head`` exports the class probabilities instead.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import images as imgs
from .errors import ImgsearchError, Interrupted, UsageError
from .model_spec import write_spec
from .preprocessing import Preprocessing

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
SPEC_FILE = "model.json"
CLASSES_FILE = "classes.json"
DECODE_BATCH = 32


@dataclass(frozen=True)
class FinetuneOptions:
    """Choices of a fine-tuning run (the CLI's options, with its defaults)."""

    input_size: int | None = None  # None: the base encoder's own
    unfreeze: int = 0
    embedding_dim: int = 256
    epochs: int = 30
    finetune_epochs: int = 20
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 5e-4
    batch_size: int = 64
    validation: float = 0.2
    patience: int = 5
    dropout: float = 0.2
    seed: int = 0
    keep_head: bool = False

    def check(self) -> None:
        if not 0.0 < self.validation < 1.0:
            raise UsageError(f"the validation share must be between 0 and 1, not {self.validation}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', ' ')} must be at least 1")
        if self.unfreeze < 0 or self.embedding_dim < 0 or self.finetune_epochs < 0:
            raise UsageError("unfreeze, embedding dim and fine-tune epochs cannot be negative")
        if self.input_size is not None and not 16 <= self.input_size <= 1024:
            raise UsageError(f"input size must be from 16 to 1024 pixels, not {self.input_size}")
        if self.learning_rate <= 0 or self.finetune_learning_rate <= 0:
            raise UsageError("learning rates must be positive")


@dataclass(frozen=True)
class Example:
    path: Path
    label: str


@dataclass(frozen=True)
class TrainingProgress:
    """One step of a stage.  ``stage`` is "features" (caching), "head" or
    "fine-tune"; at an epoch's end ``step == steps`` and the validation
    figures are set."""

    stage: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None = None
    accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    best: bool = False


@dataclass
class StageResult:
    name: str
    epochs_run: int = 0
    best_epoch: int = 0
    val_accuracy: float = 0.0
    val_loss: float = float("inf")
    seconds: float = 0.0
    stopped_early: bool = False


@dataclass
class FinetuneReport:
    spec: Path
    model: Path
    classes: list[str]
    train: int
    validation: int
    dim: int
    input_size: int
    stages: list[StageResult] = field(default_factory=list)
    cache_seconds: float = 0.0
    skipped: list[imgs.Skipped] = field(default_factory=list)
    interrupted: bool = False


Progress = Callable[[TrainingProgress], None]


# -- the labelled images ----------------------------------------------------

def examples_from_index(index) -> list[Example]:
    """The labelled images of an open :class:`~imgsearch.index.Index`."""
    found = [Example(Path(e.path), e.label) for e in index.store.entries() if e.label]
    if not found:
        raise UsageError(f"index {index.store.directory} has no labelled images; index class folders "
                         "(root/<label>/image.jpg) or pass --labels CSV")
    return found


def examples_from_folders(paths) -> list[Example]:
    """Images in class folders (``ROOT/LABEL/image.jpg``) below ``paths``."""
    files, _ = imgs.discover(paths)
    found = [Example(f.path, f.label) for f in files if f.label]
    if not found:
        raise UsageError("no labelled images in " + ", ".join(str(p) for p in paths)
                         + "; put them in class folders (root/<label>/image.jpg)")
    return found


def base_and_examples(*, index_dir=None, paths=(), encoder: str | None = None, weights: str | None = None,
                      default_encoder: str | None = None, plugins_dir=None):
    """The base encoder and the labelled images: those of an index (whose
    encoder is the default base) or those in class folders below ``paths``."""
    from .encoders import load_registry
    from .index import DEFAULT_ENCODER, Index, recorded_weights

    if bool(index_dir) == bool(paths):
        raise UsageError("give either an index (--index) or folders of labelled images, not both")
    registry = load_registry(plugins_dir)
    if index_dir:
        with Index.open(index_dir, registry=registry) as index:
            examples = examples_from_index(index)
            recorded = index.store.manifest["encoder"]
        if not encoder or encoder == recorded["name"]:
            encoder, weights = recorded["name"], weights or recorded_weights(recorded)
    else:
        examples = examples_from_folders(paths)
    return registry.create(encoder or default_encoder or DEFAULT_ENCODER, weights), examples


def split(examples: list[Example], validation: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A stratified, seeded split: each label gives ``validation`` of its
    images (at least one) to validation."""
    by_label: dict[str, list[Example]] = {}
    for example in sorted(examples, key=lambda e: str(e.path)):
        by_label.setdefault(example.label, []).append(example)
    if len(by_label) < 2:
        only = next(iter(by_label))
        raise UsageError(f"fine-tuning needs at least two labels; all {len(examples)} images are {only!r}")
    small = sorted(label for label, group in by_label.items() if len(group) < 2)
    if small:
        raise UsageError(f"label {small[0]!r} has one image; each label needs at least two "
                         "(one is held out for validation)")
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in sorted(by_label):
        group = by_label[label]
        order = rng.permutation(len(group))
        count = min(len(group) - 1, max(1, round(len(group) * validation)))
        held += [group[i] for i in order[:count]]
        train += [group[i] for i in order[count:]]
    return train, held


# -- the network ------------------------------------------------------------

def _base_model(encoder, input_size: int):
    """The encoder's Keras model, rebuilt for ``input_size`` if need be."""
    import keras

    if not encoder.offers_model():
        raise UsageError(f"encoder {encoder.name!r} offers no Keras model to fine-tune")
    model = encoder.build_model()
    if tuple(model.input.shape[1:3]) in ((input_size, input_size), (None, None)):
        return model
    try:
        resized = keras.models.clone_model(model, input_tensors=keras.Input((input_size, input_size, 3)))
        resized.set_weights(model.get_weights())
    except Exception as exc:
        raise UsageError(f"encoder {encoder.name!r} cannot take {input_size}x{input_size} images "
                         f"({type(exc).__name__}); leave --input-size out") from None
    return resized


def _weighted_layers(model) -> list[int]:
    """Positions of the layers that hold trainable weights, batch-norm aside."""
    import keras

    return [i for i, layer in enumerate(model.layers)
            if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]


def _split_model(model, unfreeze: int):
    """(bottom, top): the frozen part and the part that trains, cut where
    one tensor carries everything (Keras refuses a cut that another tensor
    crosses).  ``top`` is None when nothing unfreezes."""
    import keras

    if unfreeze == 0:
        return model, None
    weighted = _weighted_layers(model)
    if unfreeze > len(weighted):
        raise UsageError(f"the base has {len(weighted)} layers with weights; cannot unfreeze {unfreeze}")
    for cut in range(weighted[-unfreeze] - 1, 0, -1):
        tensor = model.layers[cut].output
        try:
            top = keras.Model(tensor, model.output)
        except Exception:
            continue  # another tensor crosses here: a residual branch
        return keras.Model(model.input, tensor), top
    raise UsageError("found no place to cut the base below the unfrozen layers; unfreeze fewer")


def _head(keras, dim_in: int, classes: int, options: FinetuneOptions):
    """Every random part seeded by its own seed: the same run gives the same
    model without touching the process-wide random state."""
    seed = options.seed * 10

    def dense(units, name, offset, activation=None):
        return keras.layers.Dense(units, activation=activation, name=name,
                                  kernel_initializer=keras.initializers.GlorotUniform(seed=seed + offset))

    inputs = keras.Input((dim_in,))
    x = keras.layers.Dropout(options.dropout, seed=seed + 1)(inputs)
    if options.embedding_dim:
        x = dense(options.embedding_dim, "embedding", 2, "relu")(x)
        x = keras.layers.Dropout(options.dropout, seed=seed + 3)(x)
    logits = dense(classes, "classes", 4)(x)
    return keras.Model(inputs, logits, name="head")


# -- training ---------------------------------------------------------------

class _Stage:
    """One stage's epochs with early stopping on validation accuracy (then
    loss), keeping the best weights; Ctrl-C ends it with them."""

    def __init__(self, name, model, learning_rate, options: FinetuneOptions, progress: Progress,
                 baseline: StageResult | None = None, decay_steps: int = 0):
        import keras

        self.name, self.model, self.options, self.progress = name, model, options, progress
        # A decaying stage runs all its epochs: its rate falls along a cosine
        # to zero, and its last epochs, at the lowest rates, are often the
        # best; early stopping would end it on the noise of a small
        # validation split while the rate is still high.
        self.decaying = decay_steps > 0
        if self.decaying:
            learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        self.result = StageResult(name)
        self.best_weights = None
        if baseline is not None:
            # The weights it starts from count as epoch 0: a stage that only
            # makes things worse leaves them as they were.
            self.best_weights = model.get_weights()
            self.result.val_accuracy, self.result.val_loss = baseline.val_accuracy, baseline.val_loss

    def run(self, x_train, y_train, x_val, y_val, epochs: int) -> bool:
        """Train; False when Ctrl-C stopped it (best weights restored)."""
        options, started = self.options, time.monotonic()
        rng = np.random.default_rng(options.seed)
        steps = _steps(len(y_train), options.batch_size)
        # Patience counts from the stage's own best epoch: a fine-tune stage
        # often starts below the head's accuracy and needs epochs to pass it.
        waited, own_best = 0, (-1.0, 0.0)
        try:
            for epoch in range(1, epochs + 1):
                order = rng.permutation(len(y_train))
                seen = loss_sum = correct = 0
                for step in range(steps):
                    chosen = np.sort(order[step * options.batch_size:(step + 1) * options.batch_size])
                    loss, accuracy = self.model.train_on_batch(
                        _as_float(x_train[chosen]), y_train[chosen], return_dict=False)
                    seen += len(chosen)
                    loss_sum += float(loss) * len(chosen)
                    correct += float(accuracy) * len(chosen)
                    if step + 1 < steps:
                        self.progress(TrainingProgress(self.name, epoch, epochs, step + 1, steps,
                                                       loss_sum / seen, correct / seen))
                val_loss, val_accuracy = _evaluate(self.model, x_val, y_val, options.batch_size)
                better = (val_accuracy, -val_loss) > (self.result.val_accuracy, -self.result.val_loss)
                self.result.epochs_run = epoch
                if better or self.best_weights is None:
                    self.best_weights = self.model.get_weights()
                    self.result.best_epoch, self.result.val_accuracy, self.result.val_loss = epoch, val_accuracy, val_loss
                waited = 0 if (val_accuracy, -val_loss) > own_best else waited + 1
                own_best = max(own_best, (val_accuracy, -val_loss))
                self.progress(TrainingProgress(self.name, epoch, epochs, steps, steps, loss_sum / seen,
                                               correct / seen, val_loss, val_accuracy, better))
                if waited >= options.patience and not self.decaying:
                    self.result.stopped_early = epoch < epochs
                    break
            return True
        except KeyboardInterrupt:
            return False
        finally:
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)
            self.result.seconds = time.monotonic() - started


def _steps(count: int, batch_size: int) -> int:
    """Training steps of an epoch (the last batch may be short): what a
    stage runs, and what a decaying rate is spread over."""
    return -(-count // batch_size)


def _as_float(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _evaluate(model, x, y, batch_size) -> tuple[float, float]:
    import keras

    logits = np.concatenate([np.asarray(model(_as_float(x[i:i + batch_size]), training=False))
                             for i in range(0, len(y), batch_size)])
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)))
    return loss, float(np.mean(np.argmax(logits, axis=1) == y))


def _cache(bottom, examples, prep: Preprocessing, stage_progress, skipped) -> tuple[np.ndarray, np.ndarray]:
    """Decode the images and run the frozen layers once: (activations
    stored as float16, the positions of the images that decoded)."""
    from .keras_support import inference_function

    run = inference_function(bottom, prep.input_size)
    out, kept = [], []
    for start in range(0, len(examples), DECODE_BATCH):
        pixels, positions = [], []
        for position in range(start, min(start + DECODE_BATCH, len(examples))):
            path = examples[position].path
            try:
                pixels.append(imgs.to_pixels(imgs.read_bytes(path), prep)[0])
                positions.append(position)
            except (imgs.DecodeError, OSError) as exc:
                skipped.append(imgs.Skipped(path, imgs.skip_reason(exc)))
        if pixels:
            out.append(run(prep.normalize(np.stack(pixels))).astype(np.float16))
            kept += positions
        stage_progress(min(start + DECODE_BATCH, len(examples)), len(examples))
    if not out:
        raise UsageError("none of the labelled images could be read")
    return np.concatenate(out), np.asarray(kept)


def finetune(encoder, examples: list[Example], out_dir, options: FinetuneOptions = FinetuneOptions(),
             progress: Progress | None = None) -> FinetuneReport:
    """Fine-tune ``encoder`` (an :class:`~imgsearch.encoders.Encoder` that
    offers a Keras model) on ``examples`` and export it to ``out_dir``.
    Raises :class:`Interrupted` after exporting when Ctrl-C stopped training."""
    options.check()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output folder {out} exists and is not empty; choose a new one")
    progress = progress or (lambda event: None)
    train, held = split(examples, options.validation, options.seed)
    classes = sorted({e.label for e in examples})

    from .keras_support import import_keras

    keras = import_keras()
    size = options.input_size or encoder.preprocessing.input_size
    prep = replace(encoder.preprocessing, input_size=size,
                   resize_to=round(encoder.preprocessing.resize_to * size / encoder.preprocessing.input_size))
    base = _base_model(encoder, size)
    bottom, top = _split_model(base, options.unfreeze)

    skipped: list[imgs.Skipped] = []
    started = time.monotonic()
    everything = train + held

    def cache_progress(done, total):
        progress(TrainingProgress("features", 1, 1, done, total))

    cached, kept = _cache(bottom, everything, prep, cache_progress, skipped)
    labels = np.asarray([classes.index(everything[i].label) for i in kept])
    is_train = kept < len(train)
    if top is not None:
        # The head stage trains on the pooled features the frozen top gives.
        pooled = np.concatenate([np.asarray(top(_as_float(cached[i:i + 256]), training=False))
                                 for i in range(0, len(cached), 256)])
    else:
        pooled = cached
    cache_seconds = time.monotonic() - started

    head = _head(keras, pooled.shape[1], len(classes), options)
    report = FinetuneReport(spec=out / SPEC_FILE, model=out / MODEL_FILE, classes=classes,
                            train=int(is_train.sum()), validation=int((~is_train).sum()), dim=0,
                            input_size=size, cache_seconds=cache_seconds, skipped=skipped)
    _check_split(labels, is_train, classes)
    stage = _Stage("head", head, options.learning_rate, options, progress)
    completed = stage.run(pooled[is_train], labels[is_train], pooled[~is_train], labels[~is_train], options.epochs)
    report.stages.append(stage.result)
    if completed and top is not None and options.finetune_epochs:
        for layer in top.layers:
            # Batch-norm statistics stay those of the base: a frozen layer
            # also runs in inference mode, which small batches need.
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        inputs = keras.Input(cached.shape[1:])
        whole = keras.Model(inputs, head(top(inputs)))
        stage = _Stage("fine-tune", whole, options.finetune_learning_rate, options, progress,
                       baseline=report.stages[-1],
                       decay_steps=_steps(report.train, options.batch_size) * options.finetune_epochs)
        completed = stage.run(cached[is_train], labels[is_train], cached[~is_train], labels[~is_train],
                              options.finetune_epochs)
        report.stages.append(stage.result)
    if stage.best_weights is None:
        raise Interrupted("interrupted before the first epoch ended; nothing was saved")
    report.dim = _export(keras, base, head, prep, out, classes, options, encoder)
    report.interrupted = not completed
    if report.interrupted:
        best = report.stages[-1]
        raise Interrupted(f"interrupted; the best model so far ({best.name} epoch {best.best_epoch}, "
                          f"validation accuracy {best.val_accuracy:.4f}) is saved in {out}")
    return report


def _check_split(labels, is_train, classes) -> None:
    """Unreadable images may leave a label without training or validation images."""
    for part, mask in (("training", is_train), ("validation", ~is_train)):
        missing = sorted(set(range(len(classes))) - set(labels[mask].tolist()))
        if missing:
            raise UsageError(f"label {classes[missing[0]]!r} has no readable {part} images")


def _export(keras, base, head, prep: Preprocessing, out: Path, classes, options, encoder) -> int:
    """Write the encoder: pixels to the embedding (or to class
    probabilities with ``keep_head``), as .keras and a model spec."""
    inputs = keras.Input((prep.input_size, prep.input_size, 3), name="pixels")
    features = base(inputs)
    if options.keep_head:
        outputs = keras.layers.Softmax(name="probabilities")(head(features))
    elif options.embedding_dim:
        outputs = head.get_layer("embedding")(features)
    else:
        outputs = features
    model = keras.Model(inputs, outputs, name="finetuned_encoder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.save(out / MODEL_FILE)
        (out / CLASSES_FILE).write_text(json.dumps(classes, indent=1) + "\n", encoding="utf-8")
        kind = "class probabilities" if options.keep_head else "embedding"
        write_spec(out / SPEC_FILE, out / MODEL_FILE, prep,
                   description=f"{encoder.name} fine-tuned on {len(classes)} labels ({kind})")
    except OSError as exc:
        raise ImgsearchError(f"cannot write the model to {out}: {exc.strerror or exc}") from None
    return int(model.output.shape[-1])
