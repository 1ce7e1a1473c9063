"""k-nearest-neighbour voting over labelled neighbours."""

from __future__ import annotations

import math
from dataclasses import dataclass

VOTES = ("weighted", "majority")
DEFAULT_TEMPERATURE = 0.07


@dataclass(frozen=True)
class Vote:
    label: str | None
    confidence: float
    tally: dict[str, float]


def vote(neighbours, method: str = "weighted", temperature: float = DEFAULT_TEMPERATURE) -> Vote:
    """The winning label among ``(label, similarity)`` pairs.

    ``weighted`` gives each neighbour exp(similarity / temperature), as in the
    DINO kNN protocol, so close neighbours count for far more than distant
    ones; ``majority`` counts each neighbour once.  Unlabelled neighbours do
    not vote.  ``confidence`` is the winner's share of all votes.  Ties go to
    the label whose nearest neighbour is closest.
    """
    if method not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    tally: dict[str, float] = {}
    best: dict[str, float] = {}
    labelled = [(label, float(score)) for label, score in neighbours if label is not None]
    if not labelled:
        return Vote(None, 0.0, {})
    # Shifting by the top similarity keeps exp() finite for any temperature
    # and leaves the shares unchanged.
    top = max(score for _, score in labelled)
    for label, score in labelled:
        weight = math.exp((score - top) / temperature) if method == "weighted" else 1.0
        tally[label] = tally.get(label, 0.0) + weight
        best[label] = max(best.get(label, -math.inf), score)
    winner = max(tally, key=lambda label: (tally[label], best[label]))
    total = sum(tally.values())
    return Vote(winner, tally[winner] / total, tally)
