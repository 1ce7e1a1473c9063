"""`imgsearch finetune`: real training of efficientnet-lite0 (its packaged
ImageNet weights) on the labelled sample photos, at a small input size so
that each run takes seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgsearch import Index
from imgsearch.errors import Interrupted, UsageError

from conftest import SAMPLE_DATA, run

pytestmark = pytest.mark.slow

LABELLED = SAMPLE_DATA / "labelled"
FAST = ("--encoder", "efficientnet-lite0", "--input-size", "64")


def _weights(path):
    import keras

    return keras.saving.load_model(path, safe_mode=True).get_weights()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One run with the top 4 layers unfrozen, through the CLI."""
    out = tmp_path_factory.mktemp("tuned") / "encoder"
    # Seed 2: with ten validation images, whether fine-tuning beats the head
    # is luck; with this seed it does here (see test_only_the_unfrozen_layers_change).
    result = run("finetune", LABELLED, "--out", out, *FAST, "--unfreeze", "4", "--epochs", "6",
                 "--finetune-epochs", "3", "--seed", "2")
    return out, result


def test_finetune_exports_an_encoder_that_index_uses(tuned, tmp_path):
    out, result = tuned
    assert f"saved {out / 'model.json'} (256-d, 64 px, 5 labels, 40 training and 10 validation images)" \
        in result.stdout
    spec = json.loads((out / "model.json").read_text())
    # The base's own preprocessing, scaled to the chosen input size.
    assert spec == {"model": "model.keras", "input_size": 64, "resize": "shorter-side", "resize_to": 73,
                    "interpolation": "bilinear", "channel_order": "RGB", "mean": [127.0] * 3,
                    "std": [128.0] * 3, "description": "efficientnet-lite0 fine-tuned on 5 labels (embedding)"}
    assert json.loads((out / "classes.json").read_text()) == sorted(p.name for p in LABELLED.iterdir())
    # Each stage's epochs are shown with their validation figures.
    assert "head epoch 1: loss" in result.stderr and "fine-tune epoch 1: loss" in result.stderr
    ix = tmp_path / "ix"
    run("index", LABELLED, "--index", ix, "--encoder", "saved-model", "--weights", out / "model.json")
    with Index.open(ix) as index:
        assert index.info()["dim"] == 256
        # Trained on these photos, its neighbours agree with the labels.
        photos = sorted(LABELLED.glob("*/*.jpg"))
        decisions = index.classify(photos, k=5)
    assert np.mean([d.label == p.parent.name for d, p in zip(decisions, photos)]) >= 0.8


def test_only_the_unfrozen_layers_change(tuned):
    from imgsearch.encoders import load_registry
    from imgsearch.finetune import _base_model, _weighted_layers

    import keras

    out, result = tuned
    exported = keras.saving.load_model(out / "model.keras", safe_mode=True)
    tuned_base = next(layer for layer in exported.layers if isinstance(layer, keras.Model))
    original = _base_model(load_registry().create("efficientnet-lite0"), 64)
    weighted = _weighted_layers(original)
    changed = [i for i, (a, b) in enumerate(zip(original.layers, tuned_base.layers))
               if any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.weights, b.weights))]
    # Layers below the top four never change; the top four do when the
    # fine-tune stage beat the head (else its starting weights are kept).
    kept_an_epoch = "fine-tune: best epoch 0 " not in result.stderr
    assert changed == (weighted[-4:] if kept_an_epoch else [])


def test_the_same_seed_gives_the_same_model_and_another_seed_another(tmp_path):
    from imgsearch.encoders import load_registry
    from imgsearch.finetune import FinetuneOptions, examples_from_folders, finetune

    examples = examples_from_folders([LABELLED])
    outputs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        options = FinetuneOptions(input_size=64, epochs=3, seed=seed)
        finetune(load_registry().create("efficientnet-lite0"), examples, tmp_path / name, options)
        outputs[name] = _weights(tmp_path / name / "model.keras")
    assert all(np.array_equal(a, b) for a, b in zip(outputs["a"], outputs["b"]))
    assert not all(np.array_equal(a, c) for a, c in zip(outputs["a"], outputs["c"]))


def test_keep_head_exports_class_probabilities(tmp_path):
    from PIL import Image

    from imgsearch.encoders import load_registry

    run("finetune", LABELLED, "--out", tmp_path / "out", *FAST, "--epochs", "2", "--keep-head")
    encoder = load_registry().create("saved-model", str(tmp_path / "out" / "model.json"))
    vectors = encoder.embed_images([Image.open(p).convert("RGB") for p in sorted(LABELLED.glob("*/*.jpg"))[:3]])
    assert vectors.shape == (3, 5)
    np.testing.assert_allclose(vectors.sum(axis=1), 1.0, rtol=1e-5)


def test_ctrl_c_saves_the_best_model_so_far(tmp_path):
    from imgsearch.encoders import load_registry
    from imgsearch.finetune import FinetuneOptions, examples_from_folders, finetune

    seen = []

    def progress(event):
        # Ctrl-C raises KeyboardInterrupt wherever the main thread is; here
        # it arrives during the third epoch, inside the training loop.
        seen.append(event)
        if event.stage == "head" and event.epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="the best model so far .* is saved in"):
        finetune(load_registry().create("efficientnet-lite0"), examples_from_folders([LABELLED]),
                 tmp_path / "out", FinetuneOptions(input_size=64, epochs=10, batch_size=16), progress)
    assert (tmp_path / "out" / "model.json").is_file()
    ends = [e for e in seen if e.stage == "head" and e.val_accuracy is not None]
    assert len(ends) == 2  # two epochs finished before the interruption
    encoder = load_registry().create("saved-model", str(tmp_path / "out" / "model.json"))
    assert encoder.dim == 256


def test_interrupted_before_any_epoch_saves_nothing(tmp_path):
    from imgsearch.encoders import load_registry
    from imgsearch.finetune import FinetuneOptions, examples_from_folders, finetune

    def progress(event):
        if event.stage == "head":
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="nothing was saved"):
        finetune(load_registry().create("efficientnet-lite0"), examples_from_folders([LABELLED]),
                 tmp_path / "out", FinetuneOptions(input_size=64, batch_size=8), progress)
    assert not (tmp_path / "out").exists()


def _labelled_tree(root, counts):
    photos = sorted(LABELLED.glob("*/*.jpg"))
    for number, (label, count) in enumerate(counts.items()):
        (root / label).mkdir(parents=True)
        for photo in photos[number * 10:number * 10 + count]:
            (root / label / photo.name).symlink_to(photo)
    return root


def test_bad_input_gets_one_line_errors(tmp_path):
    one_class = _labelled_tree(tmp_path / "one", {"tench": 3})
    lonely = _labelled_tree(tmp_path / "lonely", {"tench": 3, "church": 1})
    cases = [
        (["finetune", one_class, "--out", tmp_path / "o1", *FAST], 2, "needs at least two labels; all 3 images are 'tench'"),
        (["finetune", lonely, "--out", tmp_path / "o2", *FAST], 2, "label 'church' has one image"),
        (["finetune", "--out", tmp_path / "o3", *FAST], 2, "give either an index (--index) or folders"),
        (["finetune", LABELLED, "--out", LABELLED, *FAST], 2, "exists and is not empty"),
        (["finetune", LABELLED, "--out", tmp_path / "o4", "--encoder", "tiny-color"], 2,
         "encoder 'tiny-color' offers no Keras model to fine-tune"),
    ]
    for args, code, message in cases:
        assert message in run(*args, code=code).stderr, args
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4"))


def test_an_index_gives_its_labelled_images(tmp_path):
    unlabelled = tmp_path / "unlabelled"
    run("index", *sorted(LABELLED.glob("*/*.jpg"))[:4], "--index", unlabelled, "--encoder", "tiny-color")
    result = run("finetune", "--index", unlabelled, "--out", tmp_path / "o1", *FAST, code=2)
    assert "has no labelled images" in result.stderr
    labelled = tmp_path / "labelled"
    run("index", LABELLED, "--index", labelled, "--encoder", "tiny-color")
    # The index's own encoder is the default base; tiny-color cannot be trained.
    assert "offers no Keras model" in run("finetune", "--index", labelled, "--out", tmp_path / "o2", code=2).stderr
    result = run("finetune", "--index", labelled, "--out", tmp_path / "o3", *FAST, "--epochs", "1")
    assert "40 training and 10 validation images" in result.stdout


def test_split_is_stratified_and_seeded():
    from imgsearch.finetune import examples_from_folders, split

    examples = examples_from_folders([LABELLED])
    train, held = split(examples, 0.2, seed=0)
    assert sorted(e.label for e in held) == sorted(list({e.label for e in examples}) * 2)
    assert {e.path for e in train}.isdisjoint(e.path for e in held)
    assert split(examples, 0.2, seed=0) == (train, held)
    assert split(examples, 0.2, seed=1) != (train, held)
    with pytest.raises(UsageError):
        split(examples[:1] * 3, 0.2, seed=0)


def test_the_cut_never_crosses_a_residual_branch():
    from imgsearch.encoders import load_registry
    from imgsearch.finetune import _base_model, _split_model

    base = _base_model(load_registry().create("efficientnet-lite0"), 64)
    bottom, top = _split_model(base, 5)
    # The fifth layer from the top is block 14's projection, whose output is
    # added to block 13's: the cut falls below that whole block.
    assert top.layers[1].name == "_blocks.14._expand_conv"
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(top(bottom(pixels))), np.asarray(base(pixels)), atol=1e-5)


def test_the_fine_tune_stage_decays_its_rate_to_zero_and_runs_every_epoch():
    """The head stops after `patience` epochs without progress; the
    fine-tune stage runs all its epochs while its rate falls along a cosine."""
    import keras

    from imgsearch.finetune import FinetuneOptions, _Stage

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.integers(0, 2, 64)  # random labels: validation never improves for long
    options = FinetuneOptions(batch_size=16, patience=1)

    def model():
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(2, kernel_initializer=keras.initializers.GlorotUniform(seed=1))(inputs))

    head = _Stage("head", model(), 1e-2, options, lambda event: None)
    head.run(x[:48], y[:48], x[48:], y[48:], epochs=8)
    assert head.result.epochs_run < 8 and head.result.stopped_early

    steps = 3 * 2  # 48 images in batches of 16, two epochs
    tuned = _Stage("fine-tune", model(), 1e-2, options, lambda event: None, decay_steps=steps * 4)
    rates = []
    for _ in range(4):
        tuned.run(x[:48], y[:48], x[48:], y[48:], epochs=2)
        rates.append(float(tuned.model.optimizer.learning_rate))
    assert tuned.result.epochs_run == 2 and not tuned.result.stopped_early
    # Half a cosine from 1e-2 to zero, read after each quarter of the steps.
    np.testing.assert_allclose(rates, [1e-2 * (1 + np.cos(np.pi * q / 4)) / 2 for q in (1, 2, 3, 4)], atol=1e-6)
