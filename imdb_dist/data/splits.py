"""Seeded partitions of a source's reviews into training and validation: a fraction, or one fold of k.

Index arithmetic only: :mod:`imdb_dist.data.sources` applies it to the
reviews. With the reviews' movies (``groups``), a movie's reviews all land
on one side, so validation measures reviews of movies training never saw.
"""

from __future__ import annotations

import numpy as np


def split_indices(
    n: int, fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded partition of ``range(n)`` into (train, validation) index arrays.

    With ``groups`` (one group number per index), whole groups go to one
    side: groups in seeded order fill the validation part until it holds at
    least ``round(n * fraction)`` indices.
    """
    n_val = round(n * fraction)
    if groups is None:
        order = np.random.default_rng(seed).permutation(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])
    members = _members(groups, seed)
    sizes = np.cumsum([len(m) for m in members])
    taken = int(np.searchsorted(sizes, n_val)) + 1 if n_val else 0
    val = np.sort(np.concatenate(members[:taken])) if taken else np.empty(0, np.int64)
    rest = members[taken:]
    train = np.sort(np.concatenate(rest)) if rest else np.empty(0, np.int64)
    return train, val


def fold_indices(
    n: int, folds: int, fold: int, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) index arrays for ``fold`` of a seeded ``folds``-fold partition of ``range(n)``.

    The folds of one seed are disjoint, cover ``range(n)`` and differ in size
    by at most one; fold ``k``'s training part is every other fold. With
    ``groups``, every group lies in one fold, and each group in seeded order
    joins the fold that holds the fewest indices so far (so sizes differ by
    at most the largest group).
    """
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} is not in [0, {folds})")
    if groups is None:
        parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    else:
        chosen: list[list[np.ndarray]] = [[] for _ in range(folds)]
        filled = np.zeros(folds, np.int64)
        for member in _members(groups, seed):
            k = int(np.argmin(filled))  # the first of the emptiest folds
            chosen[k].append(member)
            filled[k] += len(member)
        parts = [np.concatenate(c) if c else np.empty(0, np.int64) for c in chosen]
    val = np.sort(parts[fold])
    train = np.sort(np.concatenate([part for k, part in enumerate(parts) if k != fold]))
    return train, val


def _members(groups: np.ndarray, seed: int) -> list[np.ndarray]:
    """The indices of each group, the groups in an order drawn from ``seed``."""
    numbers, inverse = np.unique(groups, return_inverse=True)
    by_group = np.argsort(inverse, kind="stable")
    members = np.split(by_group, np.cumsum(np.bincount(inverse, minlength=len(numbers)))[:-1])
    order = np.random.default_rng(seed).permutation(len(numbers))
    return [members[g] for g in order]
