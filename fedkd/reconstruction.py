"""A history-reconstruction attack on uploaded updates: which items did this client train on?

An item's embedding row changes in local training when the item is in the client's history:
as an input (its row is read and gets a gradient) and as a target (the tied output scores pull
the target's row towards the history's representation). Every other row changes too, through
the full softmax, the distillation loss on the proxy batch and the quantisation noise, but less.
So an honest-but-curious server that sees one client's update can rank the items by the L2
norm of their row of ``item_emb.weight`` in that update and read the top of the ranking as
the client's history (the "which items were touched" leak of Zhu et al.'s gradient attacks,
here on a recommender's embedding table, where it is especially direct).

Scored against the truth: the distinct items of the client's training histories (``s[:-2]``
of each of its users: leave-one-out keeps the last two items off the device's training), ``H``.
With ``k = |H|`` the attacker guesses as many items as the history holds; precision@k is the
share of the guesses that are in ``H``, recall@k the share of ``H`` guessed. With ``k = |H|``
distinct items the two are equal by construction; both are kept so that the numbers read the
same as elsewhere (and would differ if ``k`` were chosen otherwise).

What an attacker gets without looking at the update at all: the same ``k`` most popular
items (popularity counted on the cloud users' training histories, which the server holds
anyway), and chance (``k / N`` expected precision). The attack means something only above
those baselines.

Pure numpy; :mod:`server.attacks` runs it on what the server decodes in each round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

TABLE = "item_emb.weight"  # (N + 1, d): row 0 is padding, rows 1..N the items


def row_change(update: Mapping[str, np.ndarray], key: str = TABLE) -> np.ndarray:
    """``(N + 1,)`` L2 norm of every row of the item table in ``update`` (float64; row 0 padding)."""
    table = np.asarray(update[key], np.float64)
    return np.sqrt(np.sum(np.square(table.reshape(len(table), -1)), axis=1))


def rank_items(scores: np.ndarray) -> np.ndarray:
    """Item ids 1..N by score, highest first; ties by the smaller id (the padding row never ranks)."""
    scores = np.asarray(scores, np.float64)[1:]
    return np.argsort(-scores, kind="stable") + 1


def history_items(sequences: Sequence[np.ndarray], users: Iterable[int]) -> np.ndarray:
    """Sorted distinct items a client trains on: ``s[:-2]`` of each of its users' histories."""
    parts = [np.asarray(sequences[int(u)])[:-2] for u in users]
    return np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def popularity_ranking(sequences: Sequence[np.ndarray], users: Iterable[int], num_items: int) -> np.ndarray:
    """Items 1..N by their count in these users' training histories (the cloud's), most popular
    first, ties by the smaller id: the ranking of an attacker who ignores the update."""
    train = [np.asarray(sequences[int(u)])[:-2] for u in users]
    items = np.concatenate(train).astype(np.int64) if train else np.zeros(0, np.int64)
    counts = np.bincount(items, minlength=num_items + 1).astype(np.float64)
    return rank_items(counts)


def precision_recall(ranking: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    """Precision@k and recall@k of the top ``k`` of ``ranking`` against the item set ``truth``."""
    if k <= 0 or len(truth) == 0:
        return float("nan"), float("nan")
    hits = int(np.isin(ranking[:k], truth).sum())
    return hits / k, hits / len(truth)


def attack(update: Mapping[str, np.ndarray], truth: np.ndarray, popular: np.ndarray) -> dict[str, float]:
    """One attack at ``k = |truth|``: the update's ranking, the popularity baseline and chance."""
    scores = row_change(update)
    num_items = len(scores) - 1
    k = len(truth)
    p, r = precision_recall(rank_items(scores), truth, k)
    pp, pr = precision_recall(popular, truth, k)
    return {"k": k, "precision": p, "recall": r, "popularity_precision": pp, "popularity_recall": pr,
            "random_precision": k / num_items if num_items else float("nan")}


FIELDS = ("k", "precision", "recall", "popularity_precision", "popularity_recall", "random_precision")


class Tally:
    """Attack results summed per attacked unit (a client, or a round's sum), so that each unit
    counts once however often it was attacked; JSON-able state for checkpoints."""

    def __init__(self) -> None:
        self.units: dict[str, dict[str, float]] = {}  # unit -> {"n": count, field: sum}

    def add(self, unit: str | int, result: Mapping[str, float]) -> None:
        acc = self.units.setdefault(str(unit), {"n": 0, **{f: 0.0 for f in FIELDS}})
        acc["n"] += 1
        for f in FIELDS:
            acc[f] += float(result[f])

    def summary(self) -> dict:
        """Each field averaged over a unit's attacks, then over units; plus how many there were."""
        if not self.units:
            return {"units": 0, "attacks": 0}
        means = {f: float(np.mean([a[f] / a["n"] for a in self.units.values()])) for f in FIELDS}
        return {"units": len(self.units), "attacks": int(sum(a["n"] for a in self.units.values())),
                "mean_k": means.pop("k"), **{f"{f}@k": v for f, v in means.items()}}

    def state_dict(self) -> dict:
        return {u: dict(a) for u, a in self.units.items()}

    def load_state_dict(self, state: Mapping) -> None:
        self.units = {str(u): dict(a) for u, a in state.items()}
