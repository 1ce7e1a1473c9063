"""Evaluation metrics against scikit-learn and brute force, and the
evaluate / train-classifier commands end to end."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from imgsearch.evaluation import knn_ranked, retrieval, score, stratified_folds

from conftest import PLUGINS_DIR, SAMPLE_DATA, run

CLASSES = ["church", "english_springer", "garbage_truck", "parachute", "tench"]


def test_metrics_equal_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    truth = list(rng.choice(labels, 300))
    predicted = [t if rng.random() < 0.7 else rng.choice(labels) for t in truth]
    ranked = [[p] + [l for l in labels if l != p] for p in predicted]
    ours = score("knn", 5, "weighted", truth, ranked)
    assert ours.top1 == pytest.approx(np.mean(np.array(truth) == np.array(predicted)))
    assert ours.balanced_accuracy == pytest.approx(balanced_accuracy_score(truth, predicted))
    np.testing.assert_array_equal(ours.confusion, confusion_matrix(truth, predicted, labels=labels))
    p, r, f, s = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        assert ours.per_class[label]["precision"] == pytest.approx(p[i])
        assert ours.per_class[label]["recall"] == pytest.approx(r[i])
        assert ours.per_class[label]["f1"] == pytest.approx(f[i])
        assert ours.per_class[label]["support"] == s[i]
    assert ours.top5 == 1.0  # every label is within the first five of four


def test_retrieval_metrics_by_hand():
    truth = ["a", "b"]
    neighbours = [["a", "x", "a"], ["x", "x", "x"]]
    result = retrieval(truth, neighbours, 3)
    assert result["precision@3"] == pytest.approx((2 / 3 + 0) / 2)
    # AP of [1, 0, 1] = (1/1 + 2/3) / 2; AP of nothing relevant = 0
    assert result["map@3"] == pytest.approx(((1 + 2 / 3) / 2 + 0) / 2)


def test_stratified_folds_are_disjoint_balanced_and_seeded():
    labels = ["a"] * 10 + ["b"] * 6 + ["c"] * 5
    folds = stratified_folds(labels, 5, seed=1)
    joined = np.concatenate(folds)
    assert sorted(joined.tolist()) == list(range(len(labels)))
    for fold in folds:
        counts = {c: sum(labels[i] == c for i in fold) for c in "abc"}
        assert counts["a"] == 2 and counts["b"] in (1, 2) and counts["c"] == 1
    assert [f.tolist() for f in stratified_folds(labels, 5, seed=1)] == [f.tolist() for f in folds]
    assert [f.tolist() for f in stratified_folds(labels, 5, seed=2)] != [f.tolist() for f in folds]


def test_leave_one_out_equals_brute_force_knn(index_dir):
    from imgsearch.index import Index
    from imgsearch.knn import vote

    lines = run("evaluate", "--index", index_dir, "--leave-one-out", "-k", "1,3", "--vote", "both",
                "--format", "json").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["k"], r["vote"]) for r in records] == [(1, "weighted"), (1, "majority"), (3, "weighted"), (3, "majority")]
    assert all(r["method"] == "knn" and r["n"] == 50 and r["mode"] == "leave-one-out" for r in records)

    with Index.open(index_dir, plugins_dir=PLUGINS_DIR) as index:
        entries, vectors = index.labelled_vectors()
    labels = [e.label for e in entries]
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)  # each image is left out of its own neighbours
    for record in records:
        correct = 0
        for row in range(len(entries)):
            order = np.argsort(-similarity[row])[: record["k"]]
            decision = vote([(labels[j], similarity[row, j]) for j in order], record["vote"], 0.07)
            correct += decision.label == labels[row]
        assert record["top1"] == pytest.approx(correct / len(entries))


def test_cross_validation_and_held_out_with_a_report(index_dir, tmp_path):
    table = run("evaluate", "--index", index_dir, "--cv", "5", "-k", "1,5").stdout
    assert table.startswith("cv-5: 50 labelled images")
    assert "per class, best setting" in table and "near-duplicates:" in table

    report = tmp_path / "report"
    out = run("evaluate", "--index", index_dir, "--test", SAMPLE_DATA / "labelled", "-k", "1",
              "--format", "json", "--report", report).stdout
    record = json.loads(out)
    # the test images are the indexed ones: each finds itself at cosine 1
    assert record["top1"] == 1.0 and record["near_duplicates"] == 50
    with open(report / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 50 and all(r["knn-k1-weighted"] == r["label"] for r in rows)
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == 50 and metrics["settings"][0]["top1"] == 1.0
    assert set(metrics["settings"][0]["per_class"]) == set(CLASSES)
    with open(report / "confusion-knn-k1-weighted.csv", newline="") as handle:
        matrix = list(csv.reader(handle))
    assert matrix[0][1:] == CLASSES and [int(matrix[i + 1][i + 1]) for i in range(5)] == [10] * 5
    with Image.open(report / "confusion-knn-k1-weighted.png") as picture:
        assert picture.size[0] > 200 and picture.size[1] > 200


def test_evaluate_usage_errors(index_dir):
    run("evaluate", "--index", index_dir, code=2)
    run("evaluate", "--index", index_dir, "--cv", "5", "--leave-one-out", code=2)
    run("evaluate", "--index", index_dir, "--leave-one-out", "-k", "0", code=2)
    run("evaluate", "--index", index_dir, "--leave-one-out", "-k", "one", code=2)
    assert "at least 11 images" in run("evaluate", "--index", index_dir, "--cv", "11", code=2).stderr


def test_linear_classifier_is_trained_used_compared_and_refused_when_stale(index_dir, tmp_path):
    trained = run("train-classifier", "--index", index_dir, "--method", "logreg").stdout
    assert trained.startswith("trained logreg on 5 labels with C=")
    assert (index_dir / "classifier.npz").exists()
    queries = sorted(str(p) for p in (SAMPLE_DATA / "queries").iterdir())
    records = [json.loads(line) for line in run("classify", *queries, "--index", index_dir, "--method", "linear",
                                                 "--format", "json").stdout.splitlines()]
    assert all(r["label"] in CLASSES and 0 < r["confidence"] <= 1 for r in records)

    lines = run("evaluate", "--index", index_dir, "--cv", "5", "-k", "5", "--format", "json").stdout.splitlines()
    methods = [json.loads(line)["method"] for line in lines]
    assert methods == ["knn", "linear"]

    extra = tmp_path / "extra"
    extra.mkdir()
    Image.new("RGB", (50, 50), (1, 2, 3)).save(extra / "new.png")
    run("index", extra, "--index", index_dir)
    err = run("classify", queries[0], "--index", index_dir, "--method", "linear", code=2).stderr
    assert "trained on another state of this index" in err
    run("train-classifier", "--index", index_dir, "--method", "svm", "--C", "1")
    assert json.loads(run("classify", queries[0], "--index", index_dir, "--method", "linear",
                          "--format", "json").stdout)["label"] in CLASSES


def test_linear_classifier_matches_scikit_learn_predictions(index_dir):
    from sklearn.linear_model import LogisticRegression

    from imgsearch.index import Index
    from imgsearch.linear import fit

    with Index.open(index_dir, plugins_dir=PLUGINS_DIR) as index:
        entries, vectors = index.labelled_vectors()
    labels = [e.label for e in entries]
    ours = fit(vectors, labels, method="logreg", C=10.0)
    reference = LogisticRegression(C=10.0, max_iter=2000, random_state=0).fit(vectors, labels)
    ranked, confidence = ours.predict(vectors)
    assert [r[0] for r in ranked] == list(reference.predict(vectors))
    np.testing.assert_allclose(confidence, reference.predict_proba(vectors).max(axis=1), rtol=1e-5)


def test_c_is_chosen_as_scikit_learn_s_grid_search_would_with_progress(index_dir):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from imgsearch.index import Index
    from imgsearch.linear import C_GRID, fit

    with Index.open(index_dir, plugins_dir=PLUGINS_DIR) as index:
        entries, vectors = index.labelled_vectors()
    labels = [e.label for e in entries]
    calls = []
    ours = fit(vectors, labels, method="logreg", C="auto", seed=3, progress=lambda done, total: calls.append((done, total)))
    search = GridSearchCV(LogisticRegression(max_iter=2000, random_state=3), {"C": list(C_GRID)},
                          cv=StratifiedKFold(3, shuffle=True, random_state=3)).fit(vectors, labels)
    assert ours.C == search.best_params_["C"]
    assert ours.cv_accuracy == pytest.approx(search.best_score_)
    assert calls == [(done, 18) for done in range(1, 19)]  # 6 values of C, 3 folds each


def test_a_solver_that_does_not_converge_is_logged_not_printed(caplog):
    import warnings

    from imgsearch.linear import fit

    # Near-copies with opposite labels: the SVM's solver cannot finish.
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 100))
    vectors = np.vstack([base, base + 1e-3 * rng.normal(size=base.shape)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning printed would fail here
        fit(vectors, ["a"] * 20 + ["b"] * 20, method="svm", C=1000.0)
    assert "the svm solver stopped before converging at C=1000" in caplog.text


def test_without_scikit_learn_training_says_how_to_install(index_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    err = run("train-classifier", "--index", index_dir, code=1).stderr
    assert "pip install 'imgsearch[linear]'" in err


def test_average_precision_counts_the_relevant_images_that_were_missed():
    # one relevant image found at rank 1, another that could have been found was not
    assert retrieval(["a"], [["a", "x", "x"]], 3, available=[2])["map@3"] == pytest.approx(0.5)
    assert retrieval(["a"], [["a", "x", "a"]], 3, available=[2])["map@3"] == pytest.approx((1 + 2 / 3) / 2)


def test_damaged_classifier_and_unreadable_test_images(index_dir, tmp_path):
    run("train-classifier", "--index", index_dir, "--C", "1")
    (index_dir / "classifier.npz").write_bytes(b"PK\x03\x04 not really a zip")
    query = str(sorted((SAMPLE_DATA / "queries").iterdir())[0])
    assert "is damaged" in run("classify", query, "--index", index_dir, "--method", "linear", code=1).stderr
    out = run("evaluate", "--index", index_dir, "--cv", "5", "-k", "1", "--format", "json")
    assert [json.loads(line)["method"] for line in out.stdout.splitlines()] == ["knn"]
    assert "no linear classifier row" in out.stderr and "is damaged" in out.stderr
    bad = tmp_path / "test" / "church"
    bad.mkdir(parents=True)
    (bad / "broken.jpg").write_bytes(b"nope")
    assert "could be read" in run("evaluate", "--index", index_dir, "--test", tmp_path / "test", code=2).stderr


def _brute_force_held_out(train_vectors, train_labels, test_vectors, test_labels, k, temperature=0.07):
    """top-1, top-5, precision@k and AP@k of a weighted kNN, from scratch:
    cosine similarities of every test image with every indexed one."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    similarity = unit(test_vectors) @ unit(train_vectors).T
    train_labels = np.asarray(train_labels)
    top1 = top5 = 0
    precisions, aps = [], []
    for row, true in enumerate(test_labels):
        order = np.argsort(-similarity[row], kind="stable")[:k]
        weights = np.exp(similarity[row, order] / temperature)
        tally = {label: weights[train_labels[order] == label].sum() for label in set(train_labels[order])}
        ranked = sorted(tally, key=lambda label: -tally[label])
        top1 += ranked[0] == true
        top5 += true in ranked[:5]
        hits = train_labels[order] == true
        precisions.append(hits.sum() / k)
        # AP@k: mean over the relevant images the search could return
        # (min(k, same-label images indexed)) of the precision at the rank
        # where each was found; one never found counts 0.
        found_at = np.flatnonzero(hits) + 1
        precision_at_hits = [(n + 1) / rank for n, rank in enumerate(found_at)]
        aps.append(sum(precision_at_hits) / min(k, int((train_labels == true).sum())))
    n = len(test_labels)
    return {"top1": top1 / n, "top5": top5 / n, f"precision@{k}": np.mean(precisions), f"map@{k}": np.mean(aps)}


def test_held_out_metrics_on_unseen_images_equal_brute_force(tmp_path):
    """Six images of each class indexed, the other four as test images: the
    scores are not trivially 1.0 and must equal an independent computation."""
    import shutil

    from imgsearch.index import Index

    train, test = tmp_path / "train", tmp_path / "test"
    for label in CLASSES:
        files = sorted((SAMPLE_DATA / "labelled" / label).iterdir())
        for folder, chosen in ((train, files[:6]), (test, files[6:])):
            (folder / label).mkdir(parents=True)
            for path in chosen:
                shutil.copy(path, folder / label / path.name)
    index_dir = tmp_path / "ix"
    run("index", train, "--index", index_dir, "--encoder", "tiny-color")
    records = [json.loads(line) for line in run("evaluate", "--index", index_dir, "--test", test, "-k", "1,3,10",
                                                 "--vote", "weighted", "--format", "json").stdout.splitlines()]
    assert [(r["method"], r["k"], r["n"]) for r in records] == [("knn", 1, 20), ("knn", 3, 20), ("knn", 10, 20)]

    with Index.open(index_dir, plugins_dir=PLUGINS_DIR) as index:
        entries, train_vectors = index.labelled_vectors()
        from imgsearch import images as imgs

        files, _ = imgs.discover([test])
        test_vectors, kept, bad = index.embed_images(files)
    assert not bad and len(kept) == 20
    for record in records:
        expected = _brute_force_held_out(train_vectors, [e.label for e in entries], test_vectors,
                                         [f.label for f in kept], record["k"])
        for key, value in expected.items():
            assert record[key] == pytest.approx(value, abs=1e-6), (record["k"], key)
    # the case is not a trivial one: unseen images are often misclassified
    assert records[0]["top1"] < 1.0 and records[1]["top5"] < 1.0
    assert all(r[f"map@{r['k']}"] < 1.0 and r[f"precision@{r['k']}"] < 1.0 for r in records)
    print({r["k"]: {key: r[key] for key in r if key[:3] in ("top", "pre", "map")} for r in records})


def test_top5_precision_and_map_with_many_classes_equal_brute_force():
    """Twelve overlapping classes of synthetic vectors and k up to 20, so the
    true label is often neither first nor absent from the top five."""
    rng = np.random.default_rng(7)
    classes = [f"c{i}" for i in range(12)]
    centres = rng.standard_normal((12, 16))
    train_labels = np.repeat(np.arange(12), 15)
    test_labels = np.repeat(np.arange(12), 5)
    train = centres[train_labels] + 1.2 * rng.standard_normal((len(train_labels), 16))
    test = centres[test_labels] + 1.2 * rng.standard_normal((len(test_labels), 16))
    train_names = [classes[i] for i in train_labels]
    truth = [classes[i] for i in test_labels]
    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    unit_test = test / np.linalg.norm(test, axis=1, keepdims=True)
    order = np.argsort(-(unit_test @ unit_train.T), axis=1, kind="stable")[:, :20]
    neighbour_labels = [[train_names[j] for j in row] for row in order]
    neighbour_scores = [[float(unit_test[i] @ unit_train[j]) for j in row] for i, row in enumerate(order)]
    for k in (3, 10, 20):
        ranked = knn_ranked(neighbour_labels, neighbour_scores, k, "weighted", 0.07)
        ours = score("knn", k, "weighted", truth, ranked)
        ours.retrieval = retrieval(truth, neighbour_labels, k, [15] * len(truth))
        expected = _brute_force_held_out(train, train_names, test, truth, k)
        assert ours.top1 == pytest.approx(expected["top1"]) and ours.top5 == pytest.approx(expected["top5"])
        for key in (f"precision@{k}", f"map@{k}"):
            assert ours.retrieval[key] == pytest.approx(expected[key]), key
        assert 0 < ours.top1 < ours.top5 < 1 and 0 < ours.retrieval[f"map@{k}"] < 1
