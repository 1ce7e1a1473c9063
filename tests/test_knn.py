import math

import pytest

from imgsearch.knn import vote


def test_weighted_vote_lets_close_neighbours_outweigh_many_far_ones():
    neighbours = [("cat", 0.95), ("dog", 0.60), ("dog", 0.59), ("dog", 0.58)]
    weighted = vote(neighbours, "weighted", 0.07)
    assert weighted.label == "cat"
    expected = math.exp(0.95 / 0.07) / sum(math.exp(s / 0.07) for _, s in neighbours)
    assert weighted.confidence == pytest.approx(expected)
    majority = vote(neighbours, "majority")
    assert majority.label == "dog"
    assert majority.confidence == pytest.approx(0.75)


def test_unlabelled_neighbours_do_not_vote():
    result = vote([(None, 0.99), ("a", 0.5), ("b", 0.4)], "majority")
    assert result.label == "a"
    assert result.confidence == pytest.approx(0.5)
    assert vote([(None, 0.9)]).label is None


def test_ties_go_to_the_closest_neighbour():
    assert vote([("a", 0.5), ("b", 0.9), ("a", 0.4), ("b", 0.1)], "majority").label == "b"


def test_bad_arguments():
    with pytest.raises(ValueError):
        vote([("a", 1.0)], "plurality")
    with pytest.raises(ValueError):
        vote([("a", 1.0)], "weighted", 0)
