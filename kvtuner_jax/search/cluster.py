"""Clustering layers by sensitivity profile: k-means (k-means++ init, several restarts) on log-loss vectors.

Each layer is described by log10(max(loss, floor)) over all candidate pairs; layers whose losses respond alike to
the bit widths land in one group, and the search then picks one pair per group. Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np

LOSS_FLOOR = 1e-6  # nats; below this a loss is measurement noise, and log(0) must not dominate distances


def log_features(losses: np.ndarray, floor: float = LOSS_FLOOR) -> np.ndarray:
    """losses [L, C] (nats) -> features [L, C] = log10(max(loss, floor))."""
    return np.log10(np.maximum(np.asarray(losses, np.float64), floor))


def _kmeans_once(x: np.ndarray, k: int, rng: np.random.Generator, iters: int) -> tuple[np.ndarray, float]:
    n = len(x)
    centers = [x[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: next center with probability proportional to squared distance
        d2 = np.min(((x[:, None] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
    c = np.array(centers)
    labels = np.zeros(n, int)
    for _ in range(iters):
        d2 = ((x[:, None] - c[None]) ** 2).sum(-1)  # [n, k]
        new = d2.argmin(1)
        for j in range(k):
            if np.any(new == j):
                c[j] = x[new == j].mean(0)
            else:  # empty cluster: restart it at the point farthest from its center
                far = d2[np.arange(n), new].argmax()
                c[j] = x[far]
                new[far] = j
        if np.array_equal(new, labels):
            break
        labels = new
    inertia = float(((x - c[labels]) ** 2).sum())
    return labels, inertia


def canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel groups 0, 1, ... in order of their first layer, so equal partitions get equal labels."""
    order = {}
    for g in labels:
        order.setdefault(int(g), len(order))
    return np.array([order[int(g)] for g in labels])


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = 10, iters: int = 100) -> np.ndarray:
    """Labels [n] of the best (least inertia) of `restarts` k-means++ runs, canonically numbered."""
    x = np.asarray(x, np.float64)
    if not 1 <= k <= len(x):
        raise ValueError(f"number of groups {k} must be between 1 and the number of layers ({len(x)})")
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        labels, inertia = _kmeans_once(x, k, rng, iters)
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return canonical(best)


def cluster_layers(losses: np.ndarray, num_groups: int, seed: int = 0) -> list[list[int]]:
    """Groups of layer indices (each sorted, groups ordered by first layer) from per-layer losses [L, C]."""
    labels = kmeans(log_features(losses), num_groups, seed)
    return [sorted(np.flatnonzero(labels == g).tolist()) for g in range(labels.max() + 1)]
